"""Shared CLI plumbing: logging setup, exit codes, env-backed defaults."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Final

from discovery_mdc.etcd import EtcdClient

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "add_etcd_args",
    "configure_logging",
    "env_default",
    "etcd_client",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


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


def env_default(name: str, default: str | None = None) -> str | None:
    """The environment variable's value, or ``default`` when unset."""
    return os.environ.get(name, default)


def add_etcd_args(parser: argparse.ArgumentParser) -> None:
    """``--etcd`` (ETCD_ENDPOINTS), shared by every subcommand that talks to etcd."""
    parser.add_argument(
        "--etcd",
        metavar="URLS",
        default=env_default("ETCD_ENDPOINTS", "http://127.0.0.1:2379"),
        help="comma-separated etcd endpoints (env ETCD_ENDPOINTS; default %(default)s). "
        "Auth and TLS come from ETCD_AUTH_USERNAME/ETCD_AUTH_PASSWORD and "
        "ETCD_AUTH_CA/ETCD_AUTH_CLIENT_CERT/ETCD_AUTH_CLIENT_KEY.",
    )


def etcd_client(args: argparse.Namespace) -> EtcdClient:
    """A client for ``--etcd``, with auth and TLS from the ``ETCD_AUTH_*`` variables."""
    return EtcdClient.from_env({**os.environ, "ETCD_ENDPOINTS": args.etcd})
