"""The ``discovery-mdc`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from discovery_mdc.cli._common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, configure_logging
from discovery_mdc.errors import CardError, DiscoveryError, ModelDirError

__all__ = ["build_parser", "main"]

# Each module defines register(subparsers). Listed by name so subcommands stay independent.
_SUBCOMMAND_MODULES = ("_card", "_worker", "_frontend", "_ls", "_cache", "_demo")

log = logging.getLogger("discovery_mdc.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, exit 2: argparse's default prints the whole usage block.
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="discovery-mdc",
        description="Publish and discover LLM model deployment cards through etcd.",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="log line format on stderr: text, or one JSON object per line",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"discovery_mdc.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"discovery_mdc.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failed, 2 usage or bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        code: int = args.func(args)
    except (CardError, ModelDirError) as exc:
        sys.stderr.write(f"discovery-mdc: error: {exc}\n")
        return EXIT_USAGE
    except DiscoveryError as exc:
        sys.stderr.write(f"discovery-mdc: error: {exc}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
