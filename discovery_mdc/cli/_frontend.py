"""``discovery-mdc frontend`` and ``discovery-mdc ls``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from aiohttp import web

from discovery_mdc.card import decode_envelope, mdcsum, parse_card_key
from discovery_mdc.cli._common import (
    EXIT_OK,
    add_env_option,
    etcd_client,
    port_number,
    stop_on_signals,
)
from discovery_mdc.errors import CardDecodeError
from discovery_mdc.etcd import DEFAULT_RECONCILE_INTERVAL
from discovery_mdc.frontend import ModelWatcher, build_app, model_id

__all__ = ["register"]

log = logging.getLogger("discovery_mdc.cli")


async def _serve_frontend(args: argparse.Namespace) -> int:
    stop = stop_on_signals()
    async with (
        etcd_client(args) as client,
        ModelWatcher(
            client,
            namespace=args.namespace,
            namespace_prefix=args.namespace_prefix,
            cache_dir=args.cache_dir,
            reconcile_interval=args.reconcile_interval,
        ) as watcher,
    ):
        runner = web.AppRunner(build_app(watcher), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.http_host, args.http_port)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else args.http_port
        log.info(
            "frontend listening on http://%s:%d (watching etcd %s)", args.http_host, port, args.etcd
        )
        if args.port_file:
            Path(args.port_file).write_text(str(port))  # noqa: ASYNC240 (a few bytes, once)
        try:
            await stop.wait()
        finally:
            log.info("frontend stopping")
            await runner.cleanup()
    return EXIT_OK


def _frontend(args: argparse.Namespace) -> int:
    return asyncio.run(_serve_frontend(args))


async def _list_cards(args: argparse.Namespace) -> int:
    async with etcd_client(args) as client:
        result = await client.range_prefix_all("v1/mdc/")
    rows = []
    for kv in result.kvs:
        if parse_card_key(kv.key) is None:
            rows.append((kv.key, "(not a card key)", "-", f"{kv.lease:x}"))
            continue
        try:
            env = decode_envelope(kv.value)
        except CardDecodeError as exc:
            rows.append((kv.key, f"(malformed: {exc})", "-", f"{kv.lease:x}"))
            continue
        rows.append((kv.key, model_id(env.card), mdcsum(env.card), f"{kv.lease:x}"))
    header = ("KEY", "MODEL", "MDCSUM", "LEASE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)))
        sys.stdout.write(f"  {row[3]}\n")
    return EXIT_OK


def _ls(args: argparse.Namespace) -> int:
    return asyncio.run(_list_cards(args))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fe = sub.add_parser(
        "frontend",
        help="watch etcd for cards, verify and cache their metadata, serve /v1/models",
        description="Watch v1/mdc/ in etcd, admit workers into worker sets by mdcsum, fetch "
        "and verify every metadata file into the cache, and serve the ready models on "
        "GET /v1/models (plus /v1/models/{id}, /health and /metrics).",
    )
    add_env_option(fe, "etcd")
    fe.add_argument(
        "--http-host",
        default="127.0.0.1",
        help="address to serve the HTTP API on (default %(default)s)",
    )
    fe.add_argument(
        "--http-port",
        type=port_number,
        default=8000,
        help="port for the HTTP API; 0 picks a free one (default %(default)s)",
    )
    scope = fe.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        default=None,
        help="admit only this namespace (exact match; empty or 'dynamo' = all)",
    )
    scope.add_argument(
        "--namespace-prefix", default=None, help="admit namespaces starting with this string"
    )
    add_env_option(fe, "cache_dir")
    fe.add_argument(
        "--reconcile-interval",
        type=float,
        default=DEFAULT_RECONCILE_INTERVAL,
        help="seconds between checks of the registry against etcd; a check reads only what "
        "changed, repairs what the watch missed and restarts a silent watch; 0 turns them off "
        "(default %(default)g)",
    )
    fe.add_argument(
        "--port-file", default=None, help="write the bound HTTP port to this file once listening"
    )
    fe.set_defaults(func=_frontend)

    ls = sub.add_parser(
        "ls",
        help="list the cards in etcd without downloading anything",
        description="List every key under v1/mdc/ with its model, mdcsum and lease.",
    )
    add_env_option(ls, "etcd")
    ls.set_defaults(func=_ls)
