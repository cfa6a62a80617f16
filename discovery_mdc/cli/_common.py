"""Shared CLI plumbing: the parser class, logging setup, exit codes, env-backed options.

Every option that an environment variable can also set is declared once here, in
:data:`ENV_OPTIONS`, and added to a subcommand with :func:`add_env_option`. The flag beats the
variable, which beats the default. Variables are read after parsing, by
:func:`apply_env_options`, so a bad value is reported as a usage error (exit 2) naming the
variable, not as a traceback while the parser is being built.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from discovery_mdc.etcd import DEFAULT_ENDPOINT, DEFAULT_LEASE_TTL, EtcdClient, lease_ttl_from_env
from discovery_mdc.worker import self_host_enabled

__all__ = [
    "ENV_OPTIONS",
    "ETCD_TLS_FILES",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "CliParser",
    "EnvOption",
    "HelpFormatter",
    "UsageError",
    "add_env_option",
    "apply_env_options",
    "configure_logging",
    "etcd_client",
    "examples",
    "stop_on_signals",
    "etcd_endpoints",
    "lease_ttl",
    "port_number",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
# 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C.
EXIT_INTERRUPTED: Final = 130

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")


class UsageError(Exception):
    """Bad flags, variables or input detected by the CLI itself: exit 2 with one line."""


_EXAMPLES: Final = "examples:\n"


def examples(*commands: tuple[str, str]) -> str:
    """An ``--help`` epilog: ``(command, what it does)`` pairs, shown as written."""
    return _EXAMPLES + "".join(f"  {cmd}\n      {what}\n" for cmd, what in commands)


class HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual but prints an :func:`examples` epilog line by line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(_EXAMPLES):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


# --------------------------------------------------------------------------- parser


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (exit 2) and which takes the logging
    options itself, so ``--log-level``/``--log-format`` work before or after any subcommand.

    Subparsers inherit the class (``add_subparsers`` uses ``type(self)``). Only the root
    (``root=True``) has real defaults; on subcommands the options default to ``SUPPRESS`` so
    an option given before the subcommand is not reset by the subcommand's parser.
    """

    def __init__(self, *args: Any, root: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--log-level",
            choices=LOG_LEVELS,
            # None at the root: main() then uses the subcommand's default_log_level, else info.
            default=None if root else argparse.SUPPRESS,
            help="log verbosity on stderr (default info; warning for demo); debug also prints "
            "the traceback of an unexpected error",
        )
        self.add_argument(
            "--log-format",
            choices=LOG_FORMATS,
            default="text" if root else argparse.SUPPRESS,
            help="log line format on stderr: text (default), or json for one JSON object per line",
        )

    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, exit 2: argparse's default prints the whole usage block.
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


# --------------------------------------------------------------------------- logging


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Log to stderr at ``level`` as text or one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is noisy at info level.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


# --------------------------------------------------------------------------- value types


def etcd_endpoints(text: str) -> str:
    """Comma-separated etcd URLs (``http(s)://host:port``; a bare ``host:port`` means http)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("no etcd endpoint given")
    for part in parts:
        url = part if "://" in part else f"http://{part}"
        try:
            split = urlsplit(url)
            port = split.port
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"bad etcd endpoint {part!r}: {exc}") from None
        if split.scheme not in ("http", "https"):
            raise argparse.ArgumentTypeError(
                f"bad etcd endpoint {part!r}: the scheme must be http or https"
            )
        if not split.hostname or port is None:
            raise argparse.ArgumentTypeError(
                f"bad etcd endpoint {part!r}: expected http(s)://host:port"
            )
        if split.path not in ("", "/") or split.query or split.fragment:
            raise argparse.ArgumentTypeError(
                f"bad etcd endpoint {part!r}: an endpoint has no path, e.g. http://host:2379"
            )
    return ",".join(parts)


def lease_ttl(text: str) -> int:
    """A lease TTL: a whole number of seconds, at least 1."""
    try:
        return lease_ttl_from_env({"ETCD_LEASE_TTL": text})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("ETCD_LEASE_TTL ", "")) from None


def port_number(text: str) -> int:
    """A TCP port 0..65535 (0 picks a free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range 0-65535")
    return value


def _host(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the host is empty")
    return text.strip()


def _self_host(text: str) -> bool:
    return self_host_enabled(None, env={"DYN_SELF_HOST_METADATA": text})


# --------------------------------------------------------------------------- env options


@dataclass(frozen=True, slots=True)
class EnvOption:
    """A flag that an environment variable also sets (flag > variable > default)."""

    dest: str
    flag: str
    env: str
    convert: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None
    # For DYN_SELF_HOST_METADATA an empty value means "off"; elsewhere it means unset.
    empty_is_unset: bool = True
    # A flag that stores a constant (``--no-self-host``) instead of taking a value.
    const: Any = None


#: Every env-backed option of the CLI, by ``dest``. The wire-format environment table.
ENV_OPTIONS: Final[Mapping[str, EnvOption]] = {
    o.dest: o
    for o in (
        EnvOption(
            "etcd",
            "--etcd",
            "ETCD_ENDPOINTS",
            etcd_endpoints,
            DEFAULT_ENDPOINT,
            "comma-separated etcd endpoints, http(s)://host:port. Auth and TLS come from "
            "ETCD_AUTH_USERNAME/ETCD_AUTH_PASSWORD and "
            "ETCD_AUTH_CA/ETCD_AUTH_CLIENT_CERT/ETCD_AUTH_CLIENT_KEY",
            metavar="URLS",
        ),
        EnvOption(
            "lease_ttl",
            "--lease-ttl",
            "ETCD_LEASE_TTL",
            lease_ttl,
            DEFAULT_LEASE_TTL,
            "lease TTL in whole seconds; keys vanish this long after the worker dies",
            metavar="S",
        ),
        EnvOption(
            "system_port",
            "--system-port",
            "DYN_SYSTEM_PORT",
            port_number,
            None,
            "status server port (metadata, /health, /metrics); 0 picks a free one; "
            "unset: no status server, so no self-hosting",
            metavar="PORT",
        ),
        EnvOption(
            "system_host",
            "--system-host",
            "DYN_SYSTEM_HOST",
            _host,
            None,
            "status server bind address (default 0.0.0.0); a wildcard is advertised as "
            "this host's routable IP",
            metavar="HOST",
        ),
        EnvOption(
            "self_host",
            "--no-self-host",
            "DYN_SELF_HOST_METADATA",
            _self_host,
            True,
            "publish local file paths instead of serving the files from the status server "
            "(the variable turns self-hosting off with 0, false, no, off or empty)",
            empty_is_unset=False,
            const=False,
        ),
        EnvOption(
            "cache_dir",
            "--cache-dir",
            "DYN_MDC_CACHE_DIR",
            str,
            None,
            "metadata cache root (default $HOME/.cache/dynamo/mdc)",
            metavar="DIR",
        ),
    )
}


def add_env_option(parser: argparse.ArgumentParser, dest: str) -> None:
    """Add the env-backed option ``dest`` (a key of :data:`ENV_OPTIONS`) to ``parser``."""
    opt = ENV_OPTIONS[dest]
    default = "" if opt.default is None else f"; default {opt.default}"
    text = f"{opt.help} (env {opt.env}{default})"
    if opt.const is not None:
        parser.add_argument(
            opt.flag, dest=dest, action="store_const", const=opt.const, default=None, help=text
        )
    else:
        parser.add_argument(
            opt.flag, dest=dest, type=opt.convert, default=None, metavar=opt.metavar, help=text
        )


def apply_env_options(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> None:
    """Fill every env-backed option the flag left unset from its variable, else its default.

    Raises :class:`UsageError` naming the variable when its value is bad.
    """
    environ = os.environ if env is None else env
    for dest, opt in ENV_OPTIONS.items():
        if getattr(args, dest, "absent") is not None:
            continue  # given as a flag, or not an option of this subcommand
        value = opt.default
        raw = environ.get(opt.env)
        if raw is not None and (raw.strip() or not opt.empty_is_unset):
            try:
                value = opt.convert(raw)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise UsageError(f"{opt.env}={raw!r}: {exc}") from None
        setattr(args, dest, value)


#: Variables naming files the etcd client reads for TLS.
ETCD_TLS_FILES: Final = ("ETCD_AUTH_CA", "ETCD_AUTH_CLIENT_CERT", "ETCD_AUTH_CLIENT_KEY")


def etcd_client(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> EtcdClient:
    """A client for ``--etcd``, with auth and TLS from the ``ETCD_AUTH_*`` variables.

    Raises :class:`UsageError` for a TLS file that cannot be read or a password without a
    user, before any connection is tried.
    """
    environ = os.environ if env is None else env
    for name in ETCD_TLS_FILES:
        path = environ.get(name)
        if path and not os.access(path, os.R_OK):
            raise UsageError(f"{name}={path!r}: no such readable file")
    try:
        return EtcdClient.from_env({**environ, "ETCD_ENDPOINTS": args.etcd})
    except ValueError as exc:
        raise UsageError(f"ETCD_AUTH_USERNAME/ETCD_AUTH_PASSWORD: {exc}") from None


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (the long-running subcommands wait on it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
