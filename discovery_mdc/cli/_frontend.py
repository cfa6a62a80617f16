"""``discovery-mdc frontend`` and ``discovery-mdc ls``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from discovery_mdc.card import decode_envelope, mdcsum, parse_card_key
from discovery_mdc.cli._common import (
    EXIT_OK,
    add_env_option,
    etcd_client,
    examples,
    port_number,
    stop_on_signals,
)
from discovery_mdc.errors import CardDecodeError
from discovery_mdc.etcd import DEFAULT_RECONCILE_INTERVAL, KeyValue
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


def _card_rows(kvs: Sequence[KeyValue]) -> list[dict[str, Any]]:
    """One row per key under ``v1/mdc/``: what it is and, for a card, its model and mdcsum.
    ``status`` is ``ok``, ``malformed`` or ``not_a_card_key``; ``reason`` says why."""
    rows = []
    for kv in kvs:
        parsed = parse_card_key(kv.key)
        row: dict[str, Any] = {
            "key": kv.key,
            "namespace": parsed.namespace if parsed else None,
            "component": parsed.component if parsed else None,
            "endpoint": parsed.endpoint if parsed else None,
            "model": None,
            "mdcsum": None,
            "lease": f"{kv.lease:x}",
            "status": "ok",
            "reason": None,
        }
        if parsed is None:
            row.update(
                status="not_a_card_key", reason="not v1/mdc/{ns}/{component}/{endpoint}/{id:x}"
            )
        else:
            try:
                env = decode_envelope(kv.value)
            except CardDecodeError as exc:
                row.update(status="malformed", reason=str(exc))
            else:
                row.update(model=model_id(env.card), mdcsum=mdcsum(env.card))
        rows.append(row)
    return rows


async def _list_cards(args: argparse.Namespace) -> int:
    async with etcd_client(args) as client:
        result = await client.range_prefix_all("v1/mdc/")
    rows = _card_rows(result.kvs)
    if args.json:
        sys.stdout.write(json.dumps({"revision": result.revision, "cards": rows}, indent=2) + "\n")
        return EXIT_OK
    if args.quiet:
        for row in rows:
            sys.stdout.write(row["key"] + "\n")
        return EXIT_OK
    table = [("KEY", "MODEL", "MDCSUM", "LEASE")]
    for row in rows:
        if row["status"] == "ok":
            table.append((row["key"], row["model"], row["mdcsum"], row["lease"]))
        else:
            what = "not a card key" if row["status"] == "not_a_card_key" else "malformed"
            label = f"({what}: {row['reason']})" if row["status"] == "malformed" else f"({what})"
            table.append((row["key"], label, "-", row["lease"]))
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for cells in table:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)))
        sys.stdout.write(f"  {cells[3]}\n")
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
        epilog=examples(
            ("discovery-mdc frontend --http-port 8000", "every namespace, on 127.0.0.1:8000"),
            (
                "discovery-mdc frontend --namespace prod --cache-dir /var/cache/mdc",
                "one namespace, a shared cache",
            ),
            ("curl -s localhost:8000/v1/models | jq '.data[].id'", "what it serves"),
        ),
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
        description="List every key under v1/mdc/ with its model, mdcsum and lease (a "
        "malformed value or a key that is not a card key is listed with the reason).",
        epilog=examples(
            ("discovery-mdc ls --etcd http://etcd-0:2379", "a table: KEY MODEL MDCSUM LEASE"),
            ("discovery-mdc ls -q", "only the keys, one per line"),
            ("discovery-mdc ls --json | jq '.cards[] | select(.status != \"ok\")'", "problems"),
        ),
    )
    add_env_option(ls, "etcd")
    shape = ls.add_mutually_exclusive_group()
    shape.add_argument("-q", "--quiet", action="store_true", help="print only the keys")
    shape.add_argument(
        "--json",
        action="store_true",
        help="print the revision and every key as one JSON document (fields in docs/operations.md)",
    )
    ls.set_defaults(func=_ls)
