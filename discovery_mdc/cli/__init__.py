"""The ``discovery-mdc`` command line (entry point :func:`main`).

Nothing heavy is imported until :func:`main` runs, inside its Ctrl-C handling: an interrupt
while the command is still starting up exits 130 with one line, never a traceback.
"""

from __future__ import annotations

import argparse
import collections.abc

__all__ = ["build_parser", "forget_handled_interrupt", "main"]

_INTERRUPTED = 130


def main(argv: collections.abc.Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failed, 2 usage or bad input, 130
    interrupted)."""
    try:
        from discovery_mdc.cli._main import main as run

        return run(argv)
    except KeyboardInterrupt:
        from discovery_mdc.cli._logging import final_line

        forget_handled_interrupt()
        final_line("interrupted", _INTERRUPTED, prefix="")
        return _INTERRUPTED


def forget_handled_interrupt() -> None:
    """Let the process exit with its own code after a Ctrl-C it handled.

    CPython remembers a KeyboardInterrupt that escaped code run from a string (namedtuple and
    dataclass creation run such code, so an import can be hit there) and, at exit, kills the
    process with SIGINT even though the interrupt was caught. Running any string resets it.
    """
    exec("")


def build_parser() -> argparse.ArgumentParser:
    """The ``discovery-mdc`` argument parser."""
    from discovery_mdc.cli._main import build_parser as build

    return build()
