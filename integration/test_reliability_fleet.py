"""Fleet behaviour, end to end: real etcd, real worker and frontend processes.

- a fleet of frontends spreads its metadata GETs over a model's replicas (one GET per blob
  per frontend, each from the replica its spread ordering picks);
- a dead replica costs a failover, not the model;
- a frontend whose etcd connections freeze (no error, no bytes) converges within seconds;
- a reconcile repairs a put and a delete the watch lost, without a full relist;
- a compaction past a cut-off frontend's revision still relists, with the default reconcile.

Every wait polls a condition under a generous deadline; nothing asserts on elapsed time.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from discovery_mdc.cache._plan import spread_sources
from discovery_mdc.card import decode_envelope, from_dir
from discovery_mdc.etcd import EtcdClient, EtcdServer, WatchResponse
from discovery_mdc.frontend import ModelWatcher
from discovery_mdc.frontend._watcher import default_frontend_id
from testkit import (
    FrontendProcess,
    Process,
    Spawn,
    TcpProxy,
    WorkerProcess,
    converged,
    envelope_kv,
    model_dirs,
    start_frontend,
    wait_until,
)

DEADLINE = 60.0


async def _sources(client: EtcdClient) -> dict[str, list[str]]:
    """Every blob of the cards in etcd -> the URLs of the replicas serving it."""
    urls: dict[str, list[str]] = {}
    for kv in (await client.range_prefix_all("v1/mdc/")).kvs:
        for _, f in decode_envelope(kv.value).card.files():
            urls.setdefault(f.checksum.hex, []).append(f.path)
    return urls


def _first_choices(urls: dict[str, list[str]], cache_dir: Path) -> Counter[int]:
    """How many blobs a frontend on ``cache_dir`` fetches first from each replica port."""
    ordered = spread_sources(urls, default_frontend_id(cache_dir))
    return Counter(urlsplit(uris[0]).port or 0 for uris in ordered.values())


async def _start_replicas(spawn_worker: Spawn, model: Path, n: int) -> list[WorkerProcess]:
    workers = [spawn_worker(model, ttl=60, name=f"replica{i}") for i in range(n)]
    for w in workers:
        await w.wait_registered()
    return workers


# --------------------------------------------------------------------------- spread


async def test_a_fleet_of_frontends_spreads_its_gets_over_the_replicas(
    etcd_server: EtcdServer,
    client: EtcdClient,
    spawn_worker: Spawn,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    (model,) = model_dirs(tmp_path, 1)
    workers = await _start_replicas(spawn_worker, model, 4)
    urls = await _sources(client)
    assert all(len(u) == 4 for u in urls.values())
    # Started together, each with its own cache (so its own replica preference).
    fes = [FrontendProcess(etcd_server.client_url, tmp=tmp_path, name=f"fe{i}") for i in range(4)]
    procs.extend(fes)
    for fe in fes:
        await fe.wait_listening()
    for fe in fes:
        await wait_until(functools.partial(fe.lists_only, "model-0"), timeout=DEADLINE)
    expected: Counter[int] = Counter()
    for fe in fes:
        expected += _first_choices(urls, fe.cache_dir)
    served = {w.status_port(): await w.metadata_gets() for w in workers}
    # One GET per blob per frontend, each from the replica its own ranking put first.
    assert served == {port: float(expected[port]) for port in served}
    assert sum(served.values()) == len(fes) * len(urls)
    assert sum(1 for n in served.values() if n) >= 3, served  # not all from one worker


async def test_a_dead_replica_costs_a_failover_not_the_model(
    etcd_server: EtcdServer,
    client: EtcdClient,
    spawn_worker: Spawn,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    (model,) = model_dirs(tmp_path, 1)
    workers = await _start_replicas(spawn_worker, model, 3)
    urls = await _sources(client)
    cache = tmp_path / "fe-cache"
    firsts = _first_choices(urls, cache)
    victim = max(workers, key=lambda w: firsts[w.status_port()])  # ranked first most often
    dead_port = victim.status_port()
    assert firsts[dead_port] >= 1
    victim.signal(signal.SIGKILL)
    victim.popen.wait()
    # Its key outlives it (lease TTL 60 s): the frontend still lists it as a source.
    fe = await start_frontend(etcd_server.client_url, tmp_path, procs, cache_dir=cache)
    await wait_until(lambda: fe.lists_only("model-0"), timeout=DEADLINE)
    assert len(await _sources(client)) == len(urls)  # the dead replica's card is still there
    failed = await fe.metric(
        "discovery_mdc_source_fetches_total", source=f"127.0.0.1:{dead_port}", result="failed"
    )
    assert failed == firsts[dead_port]
    live = [w for w in workers if w is not victim]
    assert sum([await w.metadata_gets() for w in live]) == len(urls)  # still one GET per blob


# --------------------------------------------------------------------------- silent watch


async def test_a_frozen_etcd_connection_converges_with_the_default_reconcile(
    etcd_server: EtcdServer,
    client: EtcdClient,
    spawn_worker: Spawn,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    first, second = model_dirs(tmp_path, 2)
    with TcpProxy("127.0.0.1", etcd_server.client_port) as proxy:
        w0 = spawn_worker(first, ttl=30)
        await w0.wait_registered()
        fe = await start_frontend(proxy.url, tmp_path, procs)  # default reconcile interval
        await wait_until(lambda: fe.lists_only("model-0"), timeout=DEADLINE)
        accepted = proxy.accepted
        proxy.freeze()  # the watch and the pooled connection go silent, without an error
        w1 = spawn_worker(second, ttl=30)
        await w1.wait_registered()
        w0.signal(signal.SIGTERM)  # revokes its lease: model-0's key goes at once
        assert await w0.wait_exit() == 0
        await wait_until(lambda: fe.lists_only("model-1"), timeout=DEADLINE)
        assert await converged(fe, client) == {w1.current_key()}
        assert proxy.accepted > accepted  # it came back over new connections
    await fe.wait_log(r"restarting the watch on v1/mdc/ from revision \d+: etcd changed")
    assert await fe.metric("discovery_mdc_watch_reconnects_total") >= 1
    for reason in ("compaction", "reconcile"):
        assert await fe.metric("discovery_mdc_relists_total", reason=reason) == 0


# --------------------------------------------------------------------------- lost events


class _LossyWatch:
    """An EtcdClient whose watch loses the events of ``lost`` keys (later ones arrive): what
    a watch that drops events looks like from the outside."""

    def __init__(self, inner: EtcdClient) -> None:
        self._inner = inner
        self.lost: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def watch(self, key: str, **kwargs: Any) -> AsyncIterator[WatchResponse]:
        async for resp in self._inner.watch(key, **kwargs):
            kept = tuple(e for e in resp.events if e.kv.key not in self.lost)
            yield dataclasses.replace(resp, events=kept)


async def test_a_reconcile_repairs_a_lost_put_and_a_lost_delete_without_a_relist(
    client: EtcdClient, tmp_path: Path
) -> None:
    cards = [from_dir(d) for d in model_dirs(tmp_path, 4)]
    kvs = [envelope_kv(card, 0x100 + i) for i, card in enumerate(cards)]
    store = _LossyWatch(client)
    watcher = ModelWatcher(
        store,
        cache_dir=tmp_path / "cache",
        reconcile_interval=3600,  # reconciled on demand below
    )
    async with watcher:
        for key, value in kvs[:2]:
            await client.put(key, value)
        await wait_until(lambda: len(watcher.models()) == 2, timeout=DEADLINE)
        store.lost = {kvs[0][0], kvs[2][0]}
        await client.delete(kvs[0][0])  # lost: model-0 would stay forever
        await client.put(*kvs[2])  # lost: model-2 would never appear
        await client.put(*kvs[3])  # delivered, so the watch moves past both
        await wait_until(lambda: watcher.model("model-3") is not None, timeout=DEADLINE)
        assert {m.name for m in watcher.models()} == {"model-0", "model-1", "model-3"}
        store.lost = set()
        assert await watcher.reconcile() == "repaired"
        await wait_until(
            lambda: {m.name for m in watcher.models()} == {"model-1", "model-2", "model-3"},
            timeout=DEADLINE,
        )
        assert watcher.instance_keys() == {k for k, _ in kvs[1:]}
        stats = watcher.informer.stats
        assert stats.relists == {"start": 1, "compaction": 0, "reconcile": 0, "history_lost": 0}
        assert stats.repairs == {"put": 1, "delete": 1}
        assert stats.checks["exact"] == 1 and stats.checks["listing"] == 0


# --------------------------------------------------------------------------- compaction


async def test_a_compaction_past_a_cut_off_frontend_still_relists_with_the_default_reconcile(
    etcd_server: EtcdServer, client: EtcdClient, procs: list[Process], tmp_path: Path
) -> None:
    cards = [from_dir(d) for d in model_dirs(tmp_path, 3)]
    kvs = [envelope_kv(cards[i % 3], 0x200 + i) for i in range(6)]
    for key, value in kvs[:4]:
        await client.put(key, value)
    with TcpProxy("127.0.0.1", etcd_server.client_port) as proxy:
        fe = await start_frontend(proxy.url, tmp_path, procs)
        assert await converged(fe, client) == {k for k, _ in kvs[:4]}
        proxy.cut()
        for key, _ in kvs[:2]:
            await client.delete(key)
        for key, value in kvs[4:]:
            await client.put(key, value)
        await client.compact(await client.put("unrelated/bump", b"x"))
        proxy.restore()
        assert await converged(fe, client) == {k for k, _ in kvs[2:]}
    assert await fe.metric("discovery_mdc_relists_total", reason="compaction") >= 1
