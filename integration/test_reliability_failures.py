"""The design's failure table, end to end: real etcd, worker and frontend processes.

Rows proven elsewhere are listed in docs/reliability.md (cache-level tampering, two fetchers
on one cache, status-server traversal). Every wait polls with a generous deadline; nothing
asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import functools
import signal
from pathlib import Path

from discovery_mdc.card import (
    CheckedFile,
    ModelDeploymentCard,
    Slot,
    SlotVariant,
    from_dir,
    hash_bytes,
)
from discovery_mdc.etcd import EtcdClient, EtcdServer
from testkit import (
    FrontendProcess,
    MetaServer,
    Process,
    Spawn,
    TcpProxy,
    card_keys,
    card_keys_are,
    converged,
    envelope_kv,
    model_dirs,
    start_frontend,
    wait_until,
)

DEADLINE = 60.0


# --------------------------------------------------------------------------- workers


async def test_worker_killed_with_9_keys_vanish_with_the_lease_and_frontend_drops_it(
    etcd_server: EtcdServer,
    client: EtcdClient,
    spawn_worker: Spawn,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    (model,) = model_dirs(tmp_path, 1)
    fe = await start_frontend(etcd_server.client_url, tmp_path, procs)
    w = spawn_worker(model, ttl=3)
    reg = await w.wait_registered()
    key, lease = reg.key, reg.lease
    assert await converged(fe, client) == {key}
    # The key is bound to a lease of exactly the configured TTL: that is what bounds "within
    # TTL plus a little" once nobody keeps it alive.
    info = await client.lease_time_to_live(lease)
    assert info.granted_ttl == 3 and key in info.keys
    w.signal(signal.SIGKILL)
    await w.wait_exit()
    await wait_until(lambda: card_keys_are(client, set()), timeout=DEADLINE)
    assert await converged(fe, client) == set()
    assert (await client.lease_time_to_live(lease)).ttl == -1
    assert await fe.model_ids() == set()


async def test_worker_stopping_cleanly_revokes_so_its_keys_vanish_at_once(
    etcd_server: EtcdServer, client: EtcdClient, spawn_worker: Spawn, tmp_path: Path
) -> None:
    (model,) = model_dirs(tmp_path, 1)
    w = spawn_worker(model, ttl=60)
    lease = (await w.wait_registered()).lease
    w.signal(signal.SIGTERM)
    assert await w.wait_exit() == 0
    # No polling: the worker revokes before it exits, so the key is already gone.
    assert await card_keys(client) == set()
    assert (await client.lease_time_to_live(lease)).ttl == -1


# --------------------------------------------------------------------------- etcd outages


async def test_etcd_restart_shorter_than_ttl_changes_nothing_visible(
    etcd_server: EtcdServer,
    client: EtcdClient,
    spawn_worker: Spawn,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    (model,) = model_dirs(tmp_path, 1)
    fe = await start_frontend(etcd_server.client_url, tmp_path, procs, reconcile_interval=2.0)
    w = spawn_worker(model, ttl=30)
    reg = await w.wait_registered()
    key, lease = reg.key, reg.lease
    assert await converged(fe, client) == {key}
    before = await fe.metrics()
    await asyncio.to_thread(etcd_server.restart)
    # The frontend notices the outage (its watch reconnects) and checks etcd again after it.
    await wait_until(
        lambda: _counter_above(fe, "discovery_mdc_watch_reconnects_total", before),
        timeout=DEADLINE,
    )
    after_restart = await fe.metrics()
    await wait_until(
        lambda: _counter_above(fe, "discovery_mdc_reconcile_checks_total", after_restart),
        timeout=DEADLINE,
    )
    assert await converged(fe, client) == {key}
    after = await fe.metrics()
    assert after['discovery_mdc_watch_events_total{type="delete"}'] == 0
    assert await client.lease_keepalive(lease) > 0  # the same lease survived
    assert w.keys() == [(key, lease)]
    assert "lost" not in w.log()


async def _counter_above(fe: FrontendProcess, prefix: str, before: dict[str, float]) -> bool:
    now = await fe.metrics()
    total = sum(v for k, v in now.items() if k.startswith(prefix))
    return total > sum(v for k, v in before.items() if k.startswith(prefix))


async def test_etcd_down_longer_than_ttl_workers_reregister_and_frontend_converges(
    etcd_server: EtcdServer,
    client: EtcdClient,
    spawn_worker: Spawn,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    models = model_dirs(tmp_path, 2)
    fe = await start_frontend(etcd_server.client_url, tmp_path, procs, reconcile_interval=2.0)
    workers = [spawn_worker(m, ttl=2) for m in models]
    first = {(await w.wait_registered()).key for w in workers}
    assert await converged(fe, client) == first
    await asyncio.to_thread(etcd_server.stop)
    for w in workers:
        await w.wait_log(r"lease [0-9a-f]+ lost")
    await asyncio.to_thread(etcd_server.start)
    for w in workers:
        await w.wait_log(r"re-registered 1 key")
    # The new keys (new lease = new instance id) replace the old ones, which are revoked.
    final = await converged(fe, client)
    assert len(final) == 2 and not final & first
    assert await fe.model_ids() == {"model-0", "model-1"}


# --------------------------------------------------------------------------- watch loss


async def test_frontend_cut_off_past_a_compaction_converges_with_no_lost_deletes(
    etcd_server: EtcdServer,
    client: EtcdClient,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    cards = [from_dir(d) for d in model_dirs(tmp_path, 4)]
    kvs = [envelope_kv(cards[i % 4], 0x100 + i) for i in range(8)]
    for key, value in kvs[:6]:
        await client.put(key, value)
    with TcpProxy("127.0.0.1", etcd_server.client_port) as proxy:
        # No periodic reconcile: only the compaction relist can repair this frontend.
        fe = await start_frontend(proxy.url, tmp_path, procs, reconcile_interval=0)
        assert await converged(fe, client) == {k for k, _ in kvs[:6]}
        _, health = await fe.get_json("/health")
        proxy.cut()
        await wait_until(lambda: _health_status(fe, 503), timeout=DEADLINE)
        for key, _ in kvs[:4]:  # deletes it must not miss: models 0..3 lose an instance
            await client.delete(key)
        for key, value in kvs[6:]:
            await client.put(key, value)
        rev = await client.put("unrelated/bump", b"x")
        assert rev > health["revision"]
        await client.compact(rev)
        proxy.restore()
        final = await converged(fe, client)
    assert final == {k for k, _ in kvs[4:]}
    metrics = await fe.metrics()
    assert metrics['discovery_mdc_relists_total{reason="compaction"}'] >= 1
    assert metrics['discovery_mdc_relists_total{reason="reconcile"}'] == 0
    assert await fe.model_ids() == {"model-0", "model-1", "model-2", "model-3"}


async def _health_status(fe: FrontendProcess, want: int) -> bool:
    status, _ = await fe.get_json("/health")
    return status == want


# --------------------------------------------------------------------------- frontend crashes


async def test_frontend_killed_mid_download_leaves_no_blob_and_the_next_start_completes(
    etcd_server: EtcdServer,
    client: EtcdClient,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    body = b'{"vocab_size": 32000}' + b" " * 200_000
    async with MetaServer() as server:
        server.files["/m/config.json"] = body
        server.gated.add("/m/config.json")
        url = server.url("/m/config.json")
        card = ModelDeploymentCard.new(
            "half-done",
            model_info=Slot(
                SlotVariant.HF_CONFIG_JSON, CheckedFile(url, hash_bytes(body), len(body))
            ),
        )
        await client.put(*envelope_kv(card, 0xABC))
        cache = tmp_path / "shared-cache"
        fe = await start_frontend(etcd_server.client_url, tmp_path, procs, cache_dir=cache)
        await wait_until(lambda: server.gets["/m/config.json"] >= 1, timeout=DEADLINE)
        fe.signal(signal.SIGKILL)
        fe.popen.wait()
        blobs = cache / "blobs"
        assert not blobs.exists() or list(blobs.iterdir()) == []
        server.release.set()
        fe2 = await start_frontend(
            etcd_server.client_url, tmp_path, procs, cache_dir=cache, name="frontend2"
        )
        await wait_until(lambda: fe2.lists("half-done"), timeout=DEADLINE)
    assert [p.name for p in blobs.iterdir()] == [hash_bytes(body).hex]
    assert (blobs / hash_bytes(body).hex).read_bytes() == body


async def test_two_frontend_processes_on_one_cache_fetch_each_blob_once(
    etcd_server: EtcdServer,
    client: EtcdClient,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    (model,) = model_dirs(tmp_path, 1)
    async with MetaServer() as server:
        local = from_dir(model)
        for _, f in local.files():
            server.files[f"/s/{Path(f.path).name}"] = Path(f.path).read_bytes()  # noqa: ASYNC240
        card = local.with_paths(lambda _, f: server.url(f"/s/{Path(f.path).name}"))
        await client.put(*envelope_kv(card, 0xDEF))
        cache = tmp_path / "shared-cache"
        fes = [
            await start_frontend(
                etcd_server.client_url, tmp_path, procs, cache_dir=cache, name=f"fe{i}"
            )
            for i in range(2)
        ]
        for fe in fes:
            await wait_until(functools.partial(fe.lists, "model-0"), timeout=DEADLINE)
    assert sorted(server.gets.values()) == [1] * len(list(card.files()))


# --------------------------------------------------------------------------- malformed input


async def test_malformed_cards_in_etcd_are_skipped_and_the_others_keep_being_served(
    etcd_server: EtcdServer,
    client: EtcdClient,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    good = [from_dir(d) for d in model_dirs(tmp_path, 2)]
    await client.put(*envelope_kv(good[0], 0x1))
    await client.put("v1/mdc/dynamo/backend/generate/2", b"{not json")
    await client.put("v1/mdc/dynamo/backend/generate/NOT-HEX", envelope_kv(good[1], 0x3)[1])
    await client.put("v1/mdc/dynamo/backend/generate/4", b'{"type":"Model","card_json":7}')
    # Nesting deeper than the recursion limit once escaped the decoder and wedged the watch.
    await client.put("v1/mdc/dynamo/backend/generate/7", b'{"a":' * 50_000)
    fe = await start_frontend(etcd_server.client_url, tmp_path, procs)
    await wait_until(lambda: fe.lists("model-0"), timeout=DEADLINE)
    # Still watching: a malformed PUT arriving live, then a good one, are both handled.
    await client.put("v1/mdc/dynamo/backend/generate/5", bytes(range(256)))
    await client.put(*envelope_kv(good[1], 0x6))
    await wait_until(lambda: fe.lists("model-1"), timeout=DEADLINE)
    metrics = await fe.metrics()
    assert metrics["discovery_mdc_malformed_cards_total"] >= 5
    assert await fe.model_ids() == {"model-0", "model-1"}
    assert "v1/mdc/dynamo/backend/generate/2" in fe.log()
