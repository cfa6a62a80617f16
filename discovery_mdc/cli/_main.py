"""The ``discovery-mdc`` command line.

Exit codes: 0 ok, 1 the operation failed, 2 usage or bad input (flags, variables, a model
directory or card file), 130 interrupted (Ctrl-C) before finishing.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from discovery_mdc import __version__, _env
from discovery_mdc.cli._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CliParser,
    UsageError,
    apply_env_options,
    examples,
)
from discovery_mdc.cli._logging import configure_logging, final_line, guess_format
from discovery_mdc.errors import (
    CardError,
    ConfigError,
    DiscoveryError,
    ModelDirError,
    RegistryError,
)

__all__ = ["build_parser", "main"]

# Each module defines register(subparsers). Listed by name so subcommands stay independent.
_SUBCOMMAND_MODULES = ("_card", "_worker", "_frontend", "_cache", "_demo")
# Errors in what the user gave us (a model dir, a card file, a name): exit 2, not 1.
_BAD_INPUT = (UsageError, ConfigError, CardError, ModelDirError, RegistryError)

log = logging.getLogger("discovery_mdc.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="discovery-mdc",
        description="Publish and discover LLM model deployment cards through etcd. "
        "Exit codes: 0 ok, 1 failed, 2 usage or bad input, 130 interrupted.",
        epilog=examples(
            ("discovery-mdc demo", "see the whole system work on loopback"),
            ("discovery-mdc worker --model-path /models/m --system-port 8081", "publish a model"),
            ("discovery-mdc frontend --http-port 8000", "discover, verify, cache and serve"),
        ),
        root=True,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"discovery-mdc {__version__}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(f"discovery_mdc.cli.{name}").register(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _configure_logging(args: argparse.Namespace, jsonl: bool) -> str:
    """Flags win; then ``DYN_LOG`` and ``DYN_LOGGING_JSONL`` (``jsonl``); then the defaults.
    Returns the level."""
    log_filter = _env.LOG.get()
    level = str(
        args.log_level
        or (log_filter.level if log_filter is not None else None)
        or getattr(args, "default_log_level", "info")
    )
    fmt = args.log_format or ("json" if jsonl else "text")
    targets = log_filter.targets if log_filter is not None and not args.log_level else ()
    configure_logging(level, fmt, targets)
    if log_filter is not None and log_filter.skipped:
        log.warning(
            "DYN_LOG: skipped directive(s) it cannot apply: %s", ", ".join(log_filter.skipped)
        )
    return level


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failed, 2 usage or bad input, 130
    interrupted)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    jsonl = _env.LOGGING_JSONL.get()
    guess_format(arguments, jsonl)
    parser = build_parser()
    args = parser.parse_args(arguments)
    debug = _configure_logging(args, jsonl) == "debug"
    try:
        args.from_env = apply_env_options(args)
        code: int = args.func(args)
    except _BAD_INPUT as exc:
        if debug:
            traceback.print_exc()
        final_line(_one_line(exc), EXIT_USAGE)
        return EXIT_USAGE
    except DiscoveryError as exc:
        if debug:
            traceback.print_exc()
        final_line(_one_line(exc), EXIT_FAILED)
        return EXIT_FAILED
    except BrokenPipeError:
        # stdout went away (`discovery-mdc ls | head`): not worth a message. Point stdout at
        # /dev/null so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        from discovery_mdc.cli import forget_handled_interrupt

        forget_handled_interrupt()
        final_line("interrupted", EXIT_INTERRUPTED, prefix="")
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (--log-level debug shows the traceback)"
        final_line(f"{type(exc).__name__}: {_one_line(exc)}{hint}", EXIT_FAILED)
        return EXIT_FAILED
    return code
