"""Child processes of the benchmarks: ``python -m bench._child ROLE [options]``.

Roles that take commands read one JSON object per line on stdin and answer one JSON object per
line on stdout (``{"error": ...}`` on failure). Each exits cleanly on ``{"op": "quit"}``, on
stdin EOF, or on SIGTERM, so a profiler wrapped around it can write its report.

Timestamps are ``time.monotonic()`` (CLOCK_MONOTONIC, shared by all processes on Linux), so
the parent can compare them with its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Final

log = logging.getLogger("bench.child")

#: The one variable the benchmarks read: a child's log level (default WARNING). The parent
#: passes it on with the rest of its environment (``bench._util.child_env``), so
#: ``BENCH_CHILD_LOG=DEBUG python -m bench P4`` turns it up for every child.
LOG_LEVEL_VAR: Final = "BENCH_CHILD_LOG"


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _rss_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


async def _commands(handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]) -> None:
    """Serve JSON commands from stdin until quit, EOF or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while not stop.is_set():
        line_task = asyncio.ensure_future(reader.readline())
        stop_task = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({line_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if stop_task not in done:
            stop_task.cancel()
        if line_task not in done:
            line_task.cancel()
            break
        line = line_task.result()
        if not line:
            break
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            _emit({"ok": True})
            break
        try:
            reply = await handle(cmd)
        except Exception as exc:
            log.exception("command %s failed", cmd.get("op"))
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        _emit(reply or {"ok": True})


# --------------------------------------------------------------------------- P1 worker


class _TimedStore:
    """Delegates to an EtcdClient; remembers when the first create of a registration was
    sent and when the last one was acknowledged."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.first_sent: float | None = None
        self.last_ack: float | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> bool:
        if self.first_sent is None:
            self.first_sent = time.monotonic()
        ok: bool = await self._inner.create(key, value, lease=lease)
        self.last_ack = time.monotonic()
        return ok


async def _worker(args: argparse.Namespace) -> None:
    from discovery_mdc.etcd import EtcdClient
    from discovery_mdc.worker import Worker

    async with EtcdClient(args.etcd) as client:
        store = _TimedStore(client)
        async with Worker(
            store,
            system_port=0,
            system_host="127.0.0.1",
            lease_ttl=30,
        ) as worker:
            published: list[Any] = []

            async def handle(cmd: dict[str, Any]) -> dict[str, Any]:
                if cmd["op"] == "register":
                    store.first_sent = store.last_ack = None
                    t_call = time.monotonic()
                    pub = await worker.register_model(
                        cmd["dir"],
                        model_name=cmd["name"],
                        instance_transport=cmd.get("transport"),
                    )
                    published.append(pub)
                    return {
                        "t_call": t_call,
                        "t_sent": store.first_sent,
                        "t_ack": store.last_ack,
                        "key": pub.key,
                    }
                if cmd["op"] == "unregister":
                    while published:
                        await worker.unregister(published.pop())
                    return {"ok": True}
                raise ValueError(f"unknown op {cmd['op']!r}")

            _emit({"ready": True, "base_url": worker.server.base_url if worker.server else None})
            await _commands(handle)


# --------------------------------------------------------------------------- P3 publisher


async def _publisher(args: argparse.Namespace) -> None:
    from discovery_mdc.card import ModelEnvelope, card_key, encode_envelope, from_dir
    from discovery_mdc.etcd import EtcdClient
    from discovery_mdc.worker import MetadataRegistry, StatusServer, move_to_self_host

    registry = MetadataRegistry()
    server = StatusServer("127.0.0.1", 0, registry=registry)
    await server.start()
    cards = []
    for d in args.models:
        card = await asyncio.to_thread(from_dir, d, include_extra_files=True)
        prepared = move_to_self_host(
            card, server.base_url, namespace="dynamo", component="backend", endpoint="generate"
        )
        prepared.register(registry)
        cards.append(prepared.card)
    blobs = sorted({f.checksum.hex for c in cards for _, f in c.files()})
    leases: list[int] = []
    sem = asyncio.Semaphore(args.concurrency)

    async with EtcdClient(args.etcd, request_timeout=30.0) as client:

        async def publish_one(i: int) -> None:
            async with sem:
                lease = await client.lease_grant(args.ttl)
                leases.append(lease.id)
                card = cards[(args.index * args.instances + i) % len(cards)]
                env = ModelEnvelope(
                    namespace="dynamo",
                    component="backend",
                    endpoint="generate",
                    instance_id=lease.id,
                    card=card,
                )
                key = card_key("dynamo", "backend", "generate", lease.id)
                if not await client.create(key, encode_envelope(env), lease=lease.id):
                    raise RuntimeError(f"key {key} already exists")

        async def revoke_one(lease_id: int) -> None:
            async with sem:
                await client.lease_revoke(lease_id)

        async def handle(cmd: dict[str, Any]) -> dict[str, Any]:
            if cmd["op"] == "go":
                t0 = time.monotonic()
                await asyncio.gather(*(publish_one(i) for i in range(args.instances)))
                return {"t_first": t0, "t_done": time.monotonic(), "leases": len(leases)}
            if cmd["op"] == "revoke":
                t0 = time.monotonic()
                await asyncio.gather(*(revoke_one(lid) for lid in leases))
                leases.clear()
                return {"t_first": t0, "t_done": time.monotonic()}
            raise ValueError(f"unknown op {cmd['op']!r}")

        _emit(
            {
                "ready": True,
                "base_url": server.base_url,
                "blobs": blobs,
                "models": [c.display_name for c in cards],
            }
        )
        try:
            await _commands(handle)
        finally:
            await server.close()


# --------------------------------------------------------------------------- P4/P5 server


async def _serve(args: argparse.Namespace) -> None:
    from discovery_mdc.card import hash_file
    from discovery_mdc.worker import MetadataRegistry, StatusServer

    registry = MetadataRegistry()
    checksum, size, _ = await asyncio.to_thread(hash_file, args.file)
    registry.register(args.key, args.file, checksum, size)
    async with StatusServer("127.0.0.1", 0, registry=registry) as server:
        url = f"{server.base_url}/v1/metadata/{args.key}"
        _emit(
            {
                "url": url,
                "checksum": checksum.hex,
                "size": size,
                "metrics": f"{server.base_url}/metrics",
            }
        )

        async def handle(cmd: dict[str, Any]) -> dict[str, Any]:
            raise ValueError(f"unknown op {cmd['op']!r}")

        await _commands(handle)


# --------------------------------------------------------------------------- P4 fetcher


async def _fetch(args: argparse.Namespace) -> None:
    from discovery_mdc.cache import CacheStats, resolve_metadata_files
    from discovery_mdc.card import decode_card

    card = decode_card(Path(args.card).read_bytes())  # noqa: ASYNC240 - once, before timing
    stats = CacheStats()
    base = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    resolved = await resolve_metadata_files(
        card, cache_dir=args.cache_dir, stats=stats, total_timeout=600.0
    )
    elapsed = time.perf_counter() - t0
    _emit(
        {
            "elapsed": elapsed,
            "bytes": stats.bytes_fetched,
            "fetches": stats.fetches,
            "rss_base_kb": base,
            "hwm_kb": _rss_kb("VmHWM"),
            "files": [str(p) for p in resolved.files],
        }
    )


# --------------------------------------------------------------------------- P5 load


async def _load(args: argparse.Namespace) -> None:
    """A keep-alive aiohttp load generator (used only when wrk is missing)."""
    import aiohttp

    done = 0
    errors = 0
    nbytes = 0
    deadline = time.monotonic() + args.duration
    connector = aiohttp.TCPConnector(limit=args.connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            nonlocal done, errors, nbytes
            while time.monotonic() < deadline:
                async with session.get(args.url) as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        done += 1
                        nbytes += len(body)
                    else:
                        errors += 1

        t0 = time.monotonic()
        await asyncio.gather(*(client() for _ in range(args.connections)))
        elapsed = time.monotonic() - t0
    _emit(
        {
            "requests": done,
            "errors": errors,
            "elapsed": elapsed,
            "rps": done / elapsed,
            "bytes": nbytes,
        }
    )


# --------------------------------------------------------------------------- P6 watchers


class _PinnedStore:
    """An EtcdClient whose first listing is taken at a fixed revision, so the watcher then
    replays the stream written after it from etcd's history as fast as it can."""

    def __init__(self, inner: Any, revision: int) -> None:
        self._inner = inner
        self._revision: int | None = revision

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def range_prefix_all(self, prefix: str, **kw: Any) -> Any:
        if self._revision is None:
            return await self._inner.range_prefix_all(prefix, **kw)
        from discovery_mdc.etcd import RangeResult

        rev, self._revision = self._revision, None
        listed = await self._inner.range(prefix, prefix=True, revision=rev)
        # The header revision is the store's current one; the snapshot is as of ``rev``.
        return RangeResult(listed.kvs, rev, listed.more, listed.count)


async def _watch_ours(args: argparse.Namespace) -> None:
    from discovery_mdc.etcd import EtcdClient
    from discovery_mdc.frontend import ModelWatcher

    async with EtcdClient(args.etcd) as client:
        store = _PinnedStore(client, args.rev)
        watcher = ModelWatcher(
            store,
            cache_dir=args.cache_dir,
            reconcile_interval=0,
        )
        t0 = time.perf_counter()
        await watcher.start()
        t_listed = time.perf_counter()
        deadline = time.monotonic() + args.timeout
        peak_keys = 0
        try:
            while time.monotonic() < deadline:
                peak_keys = max(peak_keys, len(watcher.instance_keys()))
                if watcher.revision >= args.until_rev and not watcher.instance_keys():
                    break
                await asyncio.sleep(0.002)
            else:
                raise TimeoutError(f"watcher at revision {watcher.revision}, want {args.until_rev}")
            t1 = time.perf_counter()
            events = sum(
                watcher.metrics.registry.get_sample_value(
                    "discovery_mdc_watch_events_total", {"type": t}
                )
                or 0.0
                for t in ("put", "delete")
            )
        finally:
            await watcher.close()
    _emit(
        {
            "elapsed": t1 - t_listed,
            "startup": t_listed - t0,
            "events": events,
            "peak_instances": peak_keys,
            "revision": watcher.revision,
        }
    )


async def _watch_informer(args: argparse.Namespace) -> None:
    """The informer alone: the same stream, as batches of changes, with no registry."""
    from discovery_mdc.etcd import EtcdClient, PrefixInformer

    async with EtcdClient(args.etcd) as client:
        informer = PrefixInformer(_PinnedStore(client, args.rev), args.prefix, reconcile_interval=0)
        await informer.start()
        t_listed = time.perf_counter()
        changes = 0
        keys: set[str] = set()
        try:
            async with asyncio.timeout(args.timeout):
                async for batch in informer.batches():
                    changes += len(batch.changes)
                    for c in batch.changes:
                        (keys.add if c.kind.value == "put" else keys.discard)(c.key)
                    if informer.revision >= args.until_rev and not keys:
                        break
            t1 = time.perf_counter()
        finally:
            await informer.close()
    stats = informer.stats
    _emit(
        {
            "elapsed": t1 - t_listed,
            "events": stats.events_put + stats.events_delete,
            "changes": changes,
            "revision": informer.revision,
        }
    )


async def _watch_raw(args: argparse.Namespace) -> None:
    """A bare gateway watch: read lines, parse JSON, base64-decode keys and values. It opens
    the same watch as the informer (from a revision, progress notifications, no prev_kv)."""
    import aiohttp

    prefix = args.prefix.encode()
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    body = {
        "create_request": {
            "key": base64.b64encode(prefix).decode(),
            "range_end": base64.b64encode(end).decode(),
            "start_revision": args.rev + 1,
            "progress_notify": True,
        }
    }
    events = 0
    decoded = 0
    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(args.etcd.rstrip("/") + "/v3/watch", json=body) as resp,
    ):
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                msg = json.loads(line)
                for ev in msg.get("result", {}).get("events", []):
                    kv = ev.get("kv", {})
                    decoded += len(base64.b64decode(kv.get("key", "")))
                    decoded += len(base64.b64decode(kv.get("value", "")))
                    events += 1
            if events >= args.events:
                break
    elapsed = time.perf_counter() - t0
    _emit({"elapsed": elapsed, "events": events, "decoded_bytes": decoded})


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._child")
    sub = parser.add_subparsers(dest="role", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--etcd", required=True)
    p = sub.add_parser("publisher")
    p.add_argument("--etcd", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--instances", type=int, required=True)
    p.add_argument("--ttl", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("models", nargs="+")
    s = sub.add_parser("serve")
    s.add_argument("--file", required=True)
    s.add_argument("--key", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("--card", required=True)
    f.add_argument("--cache-dir", required=True)
    ld = sub.add_parser("load")
    ld.add_argument("--url", required=True)
    ld.add_argument("--connections", type=int, default=32)
    ld.add_argument("--duration", type=float, default=5.0)
    for name in ("watch-ours", "watch-informer", "watch-raw"):
        wp = sub.add_parser(name)
        wp.add_argument("--etcd", required=True)
        wp.add_argument("--rev", type=int, required=True)
        wp.add_argument("--until-rev", type=int, default=0)
        wp.add_argument("--events", type=int, default=0)
        wp.add_argument("--cache-dir", default=None)
        wp.add_argument("--prefix", default="v1/mdc/")
        wp.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get(LOG_LEVEL_VAR) or "WARNING",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    roles: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, None]]] = {
        "worker": _worker,
        "publisher": _publisher,
        "serve": _serve,
        "fetch": _fetch,
        "load": _load,
        "watch-ours": _watch_ours,
        "watch-informer": _watch_informer,
        "watch-raw": _watch_raw,
    }
    try:
        asyncio.run(roles[args.role](args))
    except Exception as exc:
        log.exception("%s failed", args.role)
        with contextlib.suppress(OSError):
            _emit({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)


if __name__ == "__main__":
    main()
