"""The ``discovery-mdc`` command line (entry point :func:`main`)."""

from discovery_mdc.cli._main import build_parser, main

__all__ = ["build_parser", "main"]
