"""``discovery-mdc frontend`` and ``discovery-mdc ls``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from discovery_mdc.card import decode_envelope, mdcsum, parse_card_key
from discovery_mdc.cli._common import (
    EXIT_OK,
    add_env_option,
    etcd_client,
    seconds,
    stop_on_signals,
    until_stopped,
)
from discovery_mdc.errors import CardDecodeError
from discovery_mdc.etcd import KeyValue
from discovery_mdc.frontend import (
    Change,
    ChangeKind,
    EventKind,
    ModelWatcher,
    Registry,
    build_app,
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


def _rejections(kvs: Sequence[KeyValue]) -> dict[str, str]:
    """Why a frontend would reject each card it would reject: the same admission, fed the
    keys in the order etcd wrote them (as a running frontend's watch sees them)."""
    registry = Registry()
    reasons: dict[str, str] = {}
    for kv in sorted(kvs, key=lambda kv: kv.mod_revision):
        out = registry.apply(Change(ChangeKind.PUT, kv.key, kv.value, kv.mod_revision))
        reasons.update(
            (e.key, e.detail) for e in out.events if e.kind is EventKind.REJECTED and e.key
        )
    return reasons


async def _list_cards(args: argparse.Namespace) -> int:
    async with etcd_client(args) as client:
        result = await client.range_prefix_all("v1/mdc/")
    # Rejections are logged here too; the table says them once, so keep the log quiet.
    logging.getLogger("discovery_mdc.frontend").disabled = True
    try:
        rejected = _rejections(result.kvs)
    finally:
        logging.getLogger("discovery_mdc.frontend").disabled = False
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
    table = [("KEY", "MODEL", "MDCSUM", "LEASE", "NOTE" if rejected else "")]
    table += [(*r, f"REJECTED: {rejected[r[0]]}" if r[0] in rejected else "") for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for row in table:
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
        sys.stdout.write(f"{line}  {row[4]}".rstrip() + "\n")
    return EXIT_OK


def _ls(args: argparse.Namespace) -> int:
    return asyncio.run(_list_cards(args))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fe = sub.add_parser(
        "frontend",
        help="watch etcd for cards, verify and cache their metadata, serve /v1/models",
        description="Watch v1/mdc/ in etcd, admit workers into worker sets by mdcsum, fetch "
        "and verify every metadata file into the cache, and serve the ready models on "
        "GET /v1/models (plus /v1/models/{id}, /v1/models/{id}/ready, /health, /live and "
        "/metrics). While etcd is unreachable at start it waits, up to "
        "--etcd-startup-timeout.",
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
        default=30.0,
        metavar="S",
        help="seconds between full relists that correct any drift; 0 turns it off (default 30)",
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
