"""Log setup for the CLI: text or JSON lines on stderr, levels from flags or ``DYN_LOG``, and
the one final line a failing command prints.

In JSON every line is one object: ``ts``, ``level``, ``logger``, ``msg``, and the structured
fields a log call passes with ``extra=`` (:data:`FIELDS`) as keys of their own, so a log
pipeline can filter on ``model`` or ``key`` without parsing ``msg``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

__all__ = [
    "FIELDS",
    "JsonFormatter",
    "configure_logging",
    "final_line",
    "guess_format",
    "level_number",
]

#: Structured fields the library passes with ``extra=`` (e.g. ``extra={"model": name}``).
FIELDS: Final = (
    "model",
    "key",
    "lease",
    "mdcsum",
    "uri",
    "namespace",
    "endpoint",
    "reason",
    "diff",
    "exit_code",
)

_OFF: Final = logging.CRITICAL + 10

# The format the final line uses; set by configure_logging (or guessed before parsing).
_format = "text"


def _timestamp(created: float, msecs: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, structured fields as their own keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                # Lists and objects (a rejection's diff) stay structured; anything else that
                # JSON cannot take becomes its str().
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes (as ``logging.lastResort``
    does), not to the stream that was ``sys.stderr`` when logging was configured: ``main()``
    run in a process that swaps stderr (a test capturing it) must not leave a handler on a
    stream that is closed later ("--- Logging error --- ... I/O operation on closed file")."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        """Ignored: the stream is always the current ``sys.stderr``."""


def level_number(level: str) -> int:
    """A level name (debug, info, warning, error, off) as a logging level number."""
    return _OFF if level == "off" else int(logging.getLevelName(level.upper()))


def configure_logging(
    level: str = "info", fmt: str = "text", targets: Sequence[tuple[str, str]] = ()
) -> None:
    """Log to stderr at ``level`` as text or one JSON object per line; ``targets`` sets the
    level of single loggers (``("discovery_mdc.frontend", "debug")``)."""
    global _format
    _format = fmt
    handler = _StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_number(level))
    # aiohttp's access log is noisy at info level.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for name, target_level in targets:
        logging.getLogger(name).setLevel(level_number(target_level))


def guess_format(argv: Sequence[str], jsonl_env: bool) -> None:
    """Before the arguments are parsed: pick the final line's format from ``argv`` (or
    ``DYN_LOGGING_JSONL``), so even a usage error is a JSON line when JSON was asked for."""
    global _format
    fmt = "json" if jsonl_env else "text"
    for i, arg in enumerate(argv):
        if arg == "--log-format" and i + 1 < len(argv):
            fmt = argv[i + 1].lower()
        elif arg.startswith("--log-format="):
            fmt = arg.split("=", 1)[1].lower()
    _format = "json" if fmt == "json" else "text"


def final_line(
    message: str, exit_code: int, *, program: str = "discovery-mdc", prefix: str = "error: "
) -> None:
    """The single line a failing (or interrupted) command ends with, on stderr: text
    (``discovery-mdc: error: ...``) or, with JSON logs, a JSON object like every other line."""
    if _format == "json":
        now = time.time()
        line = json.dumps(
            {
                "ts": _timestamp(now, (now % 1) * 1000),
                "level": "error" if exit_code else "info",
                "logger": "discovery_mdc.cli",
                "msg": f"{prefix}{message}",
                "exit_code": exit_code,
            },
            ensure_ascii=False,
        )
    else:
        line = f"{program}: {prefix}{message}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
