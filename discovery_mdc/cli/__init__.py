"""The ``discovery-mdc`` command line (entry point :func:`main`).

Nothing heavy is imported until :func:`main` runs, inside its Ctrl-C handling: an interrupt
while the command is still starting up exits 130 with one line, never a traceback.
"""

from __future__ import annotations

import argparse
import collections.abc

__all__ = ["build_parser", "main"]

_INTERRUPTED = 130


def main(argv: collections.abc.Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failed, 2 usage or bad input, 130
    interrupted)."""
    try:
        from discovery_mdc.cli._main import main as run

        return run(argv)
    except KeyboardInterrupt:
        from discovery_mdc.cli._logging import final_line

        final_line("interrupted", _INTERRUPTED, prefix="")
        return _INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    """The ``discovery-mdc`` argument parser."""
    from discovery_mdc.cli._main import build_parser as build

    return build()
