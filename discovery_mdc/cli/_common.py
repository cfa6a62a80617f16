"""Shared CLI plumbing: the parser class, exit codes, value types, env-backed options.

Every option that an environment variable can also set is declared once here, in
:data:`ENV_OPTIONS`, and added to a subcommand with :func:`add_env_option`; the variables
themselves (names, parsers, defaults) live in :mod:`discovery_mdc._env`. The flag beats the
variable, which beats the default. Variables are read after parsing, by
:func:`apply_env_options`, so a bad value is reported as a usage error (exit 2) naming the
variable, not as a traceback while the parser is being built. Checks that need the outside
world (a host name that must resolve, a cache dir that must not be a file) run there too,
for flags and variables alike, before any subcommand does anything.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias, TypeVar

import msgspec

from discovery_mdc import _env
from discovery_mdc._lifecycle import cancel_and_wait
from discovery_mdc.card import ModelDeploymentCard, decode_card, decode_envelope
from discovery_mdc.cli._logging import final_line
from discovery_mdc.errors import CardDecodeError
from discovery_mdc.etcd import EtcdClient

__all__ = [
    "ENV_OPTIONS",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "LOG_FORMATS",
    "CliParser",
    "EnvOption",
    "HelpFormatter",
    "Subcommands",
    "UsageError",
    "add_env_option",
    "apply_env_options",
    "argtype",
    "etcd_client",
    "examples",
    "load_card_file",
    "model_path",
    "port_number",
    "seconds",
    "stop_on_signals",
    "until_stopped",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
# 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C.
EXIT_INTERRUPTED: Final = 130

LOG_FORMATS: Final = ("text", "json")

_T = TypeVar("_T")

#: What ``add_subparsers`` returns; each subcommand module's ``register`` adds to one.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


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


# --------------------------------------------------------------------------- value types


def argtype(parse: Callable[[str], _T], name: str | None = None) -> Callable[[str], _T]:
    """An argparse ``type`` from one of :mod:`discovery_mdc._env`'s parsers."""

    def convert(text: str) -> _T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name or getattr(parse, "__name__", "value").lstrip("_")
    return convert


port_number = argtype(_env.parse_port, "port")


def seconds(*, minimum: float = 0.0, above: bool = False) -> Callable[[str], float]:
    """An argparse type for a finite number of seconds, at least ``minimum`` (more than it
    if ``above``): ``nan``, ``inf`` and negative values are refused."""

    def parse(text: str) -> float:
        value = _env.parse_seconds(text, minimum=-math.inf if above else minimum)
        if above and value <= minimum:
            raise ValueError(f"must be more than {minimum:g} seconds, got {text.strip()}")
        return value

    return argtype(parse, "seconds")


def _model_path(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(text)
        raise ValueError(
            f"{shown!r} is not valid UTF-8; a card's source_path must be UTF-8 text"
        ) from None
    if not text.strip():
        raise ValueError("the model path is empty")
    return text


#: ``--model-path`` (and ``card inspect PATH``): any path or HF repo id that is UTF-8.
model_path = argtype(_model_path, "model path")


def load_card_file(path: Path) -> ModelDeploymentCard:
    """A card from a JSON file holding either a card or a ``{"type": "Model"}`` envelope
    (``card inspect`` and ``card fetch`` take both)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CardDecodeError(f"cannot read {path}: {exc.strerror}") from None
    try:
        obj = msgspec.json.decode(data, type=dict[str, msgspec.Raw])
    except msgspec.DecodeError as exc:
        raise CardDecodeError(f"{path} is not a JSON object: {exc}") from None
    if "card_json" in obj:
        return decode_envelope(data).card
    return decode_card(data)


def _resolvable(value: str) -> None:
    host = value.strip("[]")
    try:
        socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"host {value!r} does not resolve ({reason})") from None


def _not_a_file(value: str) -> None:
    path = Path(value)
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            what = "is" if candidate == path else f"is inside {str(candidate)!r}, which is"
            raise ValueError(f"{value!r} {what} not a directory")
    return None


# --------------------------------------------------------------------------- parser


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (exit 2) and which takes the logging
    options itself, so ``--log-level``/``--log-format`` work before or after any subcommand.

    Subparsers inherit the class (``add_subparsers`` uses ``type(self)``). Only the root
    (``root=True``) has real defaults (None: then ``DYN_LOG``/``DYN_LOGGING_JSONL``, else the
    subcommand's default); on subcommands the options default to ``SUPPRESS`` so an option
    given before the subcommand is not reset by the subcommand's parser.
    """

    def __init__(self, *args: Any, root: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--log-level",
            type=argtype(_env.parse_log_level, "log level"),
            default=None if root else argparse.SUPPRESS,
            metavar="LEVEL",
            help="log verbosity on stderr: debug, info, warning or error, any case (default: "
            "DYN_LOG, else info; warning for demo); debug also prints the traceback of an "
            "unexpected error",
        )
        self.add_argument(
            "--log-format",
            type=str.lower,
            choices=LOG_FORMATS,
            default=None if root else argparse.SUPPRESS,
            help="log line format on stderr: text, or json for one JSON object per line "
            "(default: json if DYN_LOGGING_JSONL is 1/true/on/yes, else text)",
        )

    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, exit 2: argparse's default prints the whole usage block.
        final_line(message, EXIT_USAGE, program=self.prog)
        raise SystemExit(EXIT_USAGE)


# --------------------------------------------------------------------------- env options


@dataclass(frozen=True, slots=True)
class EnvOption:
    """A flag that an environment variable also sets (flag > variable > default)."""

    dest: str
    flag: str
    var: _env.EnvVar[Any]
    #: None: the variable's own ``doc``, word for word.
    help: str | None = None
    metavar: str | None = None
    #: A flag that stores a constant (``--no-self-host``) instead of taking a value.
    const: Any = None
    #: A check on the final value that needs the outside world (DNS, the file system).
    check: Callable[[Any], None] | None = None

    @property
    def env(self) -> str:
        return self.var.name

    @property
    def help_text(self) -> str:
        return self.var.doc if self.help is None else self.help


#: Every env-backed option of the CLI, by ``dest``.
ENV_OPTIONS: Final[Mapping[str, EnvOption]] = {
    o.dest: o
    for o in (
        EnvOption(
            "etcd", "--etcd", _env.ETCD_ENDPOINTS,
            "comma-separated etcd endpoints, http(s)://host:port. Auth and TLS come from "
            "ETCD_AUTH_USERNAME/ETCD_AUTH_PASSWORD and "
            "ETCD_AUTH_CA/ETCD_AUTH_CLIENT_CERT/ETCD_AUTH_CLIENT_KEY",
            metavar="URLS",
        ),
        EnvOption(
            "startup_timeout", "--etcd-startup-timeout", _env.STARTUP_CONNECT_TIMEOUT,
            "seconds to wait for an unreachable etcd at start, retrying with backoff, before "
            "giving up with exit 1 (0: do not wait)",
            metavar="S",
        ),
        EnvOption(
            "lease_ttl", "--lease-ttl", _env.ETCD_LEASE_TTL,
            "lease TTL in whole seconds (at most etcd's 9000000000); keys vanish this long "
            "after the worker dies",
            metavar="S",
        ),
        EnvOption(
            "system_port", "--system-port", _env.SYSTEM_PORT,
            "status server port (metadata, /health, /live, /metrics); 0 picks a free one; "
            "unset: no status server, so no self-hosting",
            metavar="PORT",
        ),
        EnvOption(
            "system_host", "--system-host", _env.SYSTEM_HOST,
            metavar="HOST",
            check=_resolvable,
        ),
        EnvOption(
            "self_host", "--no-self-host", _env.SELF_HOST_METADATA,
            "publish local file paths instead of serving the files from the status server "
            "(the variable turns self-hosting off with 0, false, no, off or empty)",
            const=False,
        ),
        EnvOption(
            "shutdown_timeout", "--graceful-shutdown-timeout", _env.GRACEFUL_SHUTDOWN_TIMEOUT,
            "the most a stopping worker spends revoking its lease and finishing metadata "
            "downloads in flight, in whole seconds",
            metavar="S",
        ),
        EnvOption(
            "namespace", "--namespace", _env.NAMESPACE,
            "namespace (worker default: dynamo, with -SUFFIX appended when "
            "DYN_NAMESPACE_WORKER_SUFFIX is set; frontend: admit only this namespace, exact "
            "match; empty or 'dynamo' = all)",
            metavar="NS",
        ),
        EnvOption(
            "namespace_prefix", "--namespace-prefix", _env.NAMESPACE_PREFIX,
            "admit namespaces starting with this string (the variable wins over "
            "DYN_NAMESPACE)",
            metavar="P",
        ),
        EnvOption(
            "component", "--component", _env.COMPONENT,
            "component (default backend)",
            metavar="C",
        ),
        EnvOption(
            "endpoint", "--endpoint", _env.ENDPOINT,
            "endpoint: a name (default generate), or dyn://namespace.component.endpoint as "
            "Dynamo backends take it",
            metavar="E",
        ),
        EnvOption(
            "http_host", "--http-host", _env.HTTP_HOST,
            "address to serve the HTTP API on",
            metavar="HOST",
            check=_resolvable,
        ),
        EnvOption(
            "http_port", "--http-port", _env.HTTP_PORT,
            "port for the HTTP API; 0 picks a free one",
            metavar="PORT",
        ),
        EnvOption(
            "cache_dir", "--cache-dir", _env.CACHE_DIR,
            "metadata cache root (default $HOME/.cache/dynamo/mdc)",
            metavar="DIR",
            check=_not_a_file,
        ),
    )
}  # fmt: skip


def add_env_option(parser: argparse.ArgumentParser | Any, dest: str) -> None:
    """Add the env-backed option ``dest`` (a key of :data:`ENV_OPTIONS`) to ``parser`` (or
    an argument group)."""
    opt = ENV_OPTIONS[dest]
    default = opt.var.default
    shown = "" if default is None or isinstance(default, bool) else f"; default {default}"
    text = f"{opt.help_text} (env {opt.env}{shown})"
    if opt.const is not None:
        parser.add_argument(
            opt.flag, dest=dest, action="store_const", const=opt.const, default=None, help=text
        )
    else:
        parser.add_argument(
            opt.flag,
            dest=dest,
            type=argtype(opt.var.parse, opt.flag),
            default=None,
            metavar=opt.metavar,
            help=text,
        )


def apply_env_options(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> set[str]:
    """Fill every env-backed option the flag left unset from its variable, else its default,
    then run each option's check. Returns the ``dest`` of the options set by a variable.

    Raises :class:`~discovery_mdc.errors.ConfigError` naming the variable when its value is
    bad, and :class:`UsageError` naming the flag or variable when a check fails.
    """
    from_env: set[str] = set()
    for dest, opt in ENV_OPTIONS.items():
        current = getattr(args, dest, "absent")
        if current == "absent":
            continue  # not an option of this subcommand
        source = opt.flag
        if current is None:
            raw = opt.var.raw(env)
            setattr(args, dest, opt.var.get(env))
            if raw is not None:
                from_env.add(dest)
                source = f"{opt.env}={raw!r}"
        value = getattr(args, dest)
        if opt.check is not None and value is not None:
            try:
                opt.check(value)
            except ValueError as exc:
                raise UsageError(f"{source}: {exc}") from None
    return from_env


def etcd_client(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> EtcdClient:
    """A client for ``--etcd``, with auth and TLS from the ``ETCD_AUTH_*`` variables.

    Raises :class:`UsageError` for a TLS file that cannot be read or a password without a
    user, before any connection is tried.
    """
    for var in (_env.ETCD_AUTH_CA, _env.ETCD_AUTH_CLIENT_CERT, _env.ETCD_AUTH_CLIENT_KEY):
        path = var.get(env)
        if path and not os.access(path, os.R_OK):
            raise UsageError(f"{var.name}={path!r}: no such readable file")
    try:
        return EtcdClient.from_env(env, endpoints=args.etcd)
    except ValueError as exc:
        raise UsageError(f"ETCD_AUTH_USERNAME/ETCD_AUTH_PASSWORD: {exc}") from None


# --------------------------------------------------------------------------- signals


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (the long-running subcommands wait on it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def until_stopped(work: Awaitable[_T], stop: asyncio.Event) -> tuple[bool, _T | None]:
    """Run ``work`` until it finishes or ``stop`` is set, whichever comes first.

    Returns ``(True, result)`` when it finished (re-raising its error), ``(False, None)``
    when ``stop`` came first; the work is then cancelled and awaited, so a startup wait on
    an unreachable or hung etcd never delays a SIGTERM.
    """
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if task.done():
        return True, task.result()
    await cancel_and_wait(task)
    return False, None
