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

from discovery_mdc._hf import HfEnv
from discovery_mdc.card import MDC_PREFIX, decode_envelope, mdcsum, parse_card_key
from discovery_mdc.cli._common import (
    EXIT_OK,
    Subcommands,
    add_env_option,
    etcd_client,
    examples,
    seconds,
    stop_on_signals,
    until_stopped,
)
from discovery_mdc.errors import CardDecodeError
from discovery_mdc.etcd import DEFAULT_RECONCILE_INTERVAL, Change, ChangeKind, KeyValue
from discovery_mdc.frontend import (
    EventKind,
    ModelEvent,
    ModelWatcher,
    Registry,
    build_app,
    diff_json,
    model_id,
)

__all__ = ["register"]

log = logging.getLogger("discovery_mdc.cli")


def _scope(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(namespace, namespace prefix): a flag beats the other one's variable; of the two
    variables DYN_NAMESPACE_PREFIX wins, as in Dynamo."""
    namespace, prefix = args.namespace, args.namespace_prefix
    if namespace is not None and prefix is not None:
        if "namespace_prefix" not in args.from_env:
            namespace = None  # --namespace-prefix beats DYN_NAMESPACE
        elif "namespace" not in args.from_env:
            prefix = None  # --namespace beats DYN_NAMESPACE_PREFIX
        else:
            namespace = None
    return namespace, prefix


async def _serve_frontend(args: argparse.Namespace) -> int:
    stop = stop_on_signals()
    namespace, prefix = _scope(args)
    async with etcd_client(args) as client:
        watcher = ModelWatcher(
            client,
            namespace=namespace,
            namespace_prefix=prefix,
            cache_dir=args.cache_dir,
            reconcile_interval=args.reconcile_interval,
            startup_timeout=args.startup_timeout,
            hf=HfEnv.from_env(),
        )
        runner = web.AppRunner(build_app(watcher), access_log=None)
        await runner.setup()
        try:
            # Serve first: /live answers (and /health says 503) while etcd is awaited.
            site = web.TCPSite(runner, args.http_host, args.http_port)
            await site.start()
            port = runner.addresses[0][1] if runner.addresses else args.http_port
            log.info(
                "frontend listening on http://%s:%d (watching etcd %s)",
                args.http_host,
                port,
                args.etcd,
            )
            if args.port_file:
                Path(args.port_file).write_text(str(port))  # noqa: ASYNC240 (a few bytes, once)
            started, _ = await until_stopped(watcher.start(), stop)
            if started:
                await stop.wait()
            else:
                log.info("frontend stopped before its first listing of etcd")
        finally:
            log.info("frontend stopping")
            await watcher.close()
            await runner.cleanup()
    return EXIT_OK


def _frontend(args: argparse.Namespace) -> int:
    return asyncio.run(_serve_frontend(args))


def _rejections(kvs: Sequence[KeyValue]) -> dict[str, ModelEvent]:
    """The Rejected event a frontend would emit for each card it would reject: the same
    admission, fed the keys in the order etcd wrote them (as a running frontend's watch sees
    them)."""
    registry = Registry()
    rejected: dict[str, ModelEvent] = {}
    # The registry logs each rejection; `ls` reports them in its output instead.
    quiet = logging.getLogger("discovery_mdc.frontend")
    quiet.disabled = True
    try:
        for kv in sorted(kvs, key=lambda kv: kv.mod_revision):
            out = registry.apply(Change(ChangeKind.PUT, kv.key, kv.value, kv.mod_revision))
            rejected.update(
                (e.key, e) for e in out.events if e.kind is EventKind.REJECTED and e.key
            )
    finally:
        quiet.disabled = False
    return rejected


def _card_rows(kvs: Sequence[KeyValue]) -> list[dict[str, Any]]:
    """One row per key under ``v1/mdc/``: what it is and, for a card, its model and mdcsum.
    ``status`` is ``ok``, ``malformed``, ``not_a_card_key`` or ``rejected`` (a frontend would
    refuse it for an mdcsum mismatch); ``reason`` says why, and for a rejected card ``diff``
    lists each differing field with the worker set's and this card's value."""
    rejected = _rejections(kvs)
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
            "diff": None,
        }
        if parsed is None:
            row.update(
                status="not_a_card_key",
                reason=f"not {MDC_PREFIX}{{ns}}/{{component}}/{{endpoint}}/{{id:x}}",
            )
        else:
            try:
                env = decode_envelope(kv.value)
            except CardDecodeError as exc:
                row.update(status="malformed", reason=str(exc))
            else:
                row.update(model=model_id(env.card), mdcsum=mdcsum(env.card))
                event = rejected.get(kv.key)
                if event is not None:
                    row.update(
                        status="rejected",
                        reason=event.detail,
                        diff=diff_json(event.diff),
                    )
        rows.append(row)
    return rows


async def _list_cards(args: argparse.Namespace) -> int:
    async with etcd_client(args) as client:
        result = await client.range_prefix_all(MDC_PREFIX)
    rows = _card_rows(result.kvs)
    if args.json:
        sys.stdout.write(json.dumps({"revision": result.revision, "cards": rows}, indent=2) + "\n")
        return EXIT_OK
    if args.quiet:
        for row in rows:
            sys.stdout.write(row["key"] + "\n")
        return EXIT_OK
    notes = any(row["status"] == "rejected" for row in rows)
    table = [("KEY", "MODEL", "MDCSUM", "LEASE", "NOTE" if notes else "")]
    for row in rows:
        if row["status"] in ("ok", "rejected"):
            note = f"REJECTED: {row['reason']}" if row["status"] == "rejected" else ""
            table.append((row["key"], row["model"], row["mdcsum"], row["lease"], note))
        else:
            what = "not a card key" if row["status"] == "not_a_card_key" else "malformed"
            label = f"({what}: {row['reason']})" if row["status"] == "malformed" else f"({what})"
            table.append((row["key"], label, "-", row["lease"], ""))
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for cells in table:
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False))
        sys.stdout.write(f"{line}  {cells[4]}".rstrip() + "\n")
    return EXIT_OK


def _ls(args: argparse.Namespace) -> int:
    return asyncio.run(_list_cards(args))


def register(sub: Subcommands) -> None:
    fe = sub.add_parser(
        "frontend",
        help="watch etcd for cards, verify and cache their metadata, serve /v1/models",
        description="Watch v1/mdc/ in etcd, admit workers into worker sets by mdcsum, fetch "
        "and verify every metadata file into the cache, and serve the ready models on "
        "GET /v1/models (plus /v1/models/{id}, /v1/models/{id}/ready, /health, /live and "
        "/metrics). While etcd is unreachable at start it waits, up to "
        "--etcd-startup-timeout.",
        epilog=examples(
            ("discovery-mdc frontend --http-port 8000", "every namespace, on 127.0.0.1:8000"),
            (
                "discovery-mdc frontend --namespace prod --cache-dir /var/cache/mdc",
                "one namespace, a shared cache",
            ),
            ("curl -s localhost:8000/v1/models | jq '.data[].id'", "what it serves"),
        ),
    )
    for dest in ("etcd", "startup_timeout", "http_host", "http_port"):
        add_env_option(fe, dest)
    scope = fe.add_mutually_exclusive_group()
    add_env_option(scope, "namespace")
    add_env_option(scope, "namespace_prefix")
    add_env_option(fe, "cache_dir")
    fe.add_argument(
        "--reconcile-interval",
        type=seconds(minimum=0),
        default=DEFAULT_RECONCILE_INTERVAL,
        metavar="S",
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
        "malformed value or a key that is not a card key is listed with the reason, and a "
        "card a frontend would reject for an mdcsum mismatch with the fields that differ).",
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
