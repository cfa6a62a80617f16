"""A 3-member etcd cluster: kill the leader, then the member each client is connected to.

A worker and a frontend both get every endpoint. Across the faults models are published and
unpublished one after another; the frontend has no periodic reconcile, so it can only end
with exactly the right set if its resumed watch missed no event (in particular no delete).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from discovery_mdc.etcd import EtcdClient, EtcdCluster
from testkit import (
    FrontendProcess,
    WorkerProcess,
    card_keys_are,
    model_dirs,
    tcp_peer_ports,
    wait_until,
)

DEADLINE = 60.0
TTL = 5


@pytest.fixture
async def client(etcd_cluster: EtcdCluster) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(etcd_cluster.client_urls, request_timeout=2.0) as c:
        yield c


async def connected_member(etcd_cluster: EtcdCluster, pid: int) -> int:
    """The index of the (running) member process ``pid`` holds a connection to."""
    ports = {m.client_port: i for i, m in enumerate(etcd_cluster.members) if m.running}

    def member() -> tuple[int, ...]:  # a tuple: member 0 must count as found
        hits = {ports[p] for p in tcp_peer_ports(pid) if p in ports}
        return (hits.pop(),) if len(hits) == 1 else ()

    (index,) = await wait_until(member, timeout=DEADLINE, message=f"pid {pid} connections")
    return index


async def test_publish_and_watch_continue_through_killed_members_with_no_lost_events(
    etcd_cluster: EtcdCluster, client: EtcdClient, tmp_path: Path
) -> None:
    endpoints = ",".join(etcd_cluster.client_urls)
    models = model_dirs(tmp_path, 4)
    procs: list[WorkerProcess | FrontendProcess] = []

    def worker(i: int) -> WorkerProcess:
        w = WorkerProcess.serving(endpoints, models[i], ttl=TTL, log_path=tmp_path / f"w{i}.log")
        procs.append(w)
        return w

    async def expect(fe: FrontendProcess, live: WorkerProcess) -> None:
        key = (await live.wait_registered()).key
        await wait_until(lambda: card_keys_are(client, {key}), timeout=DEADLINE)

        async def frontend_has_exactly_it() -> bool:
            return (
                await fe.ready_instances() == {key}
                and (await fe.metrics()).get("discovery_mdc_instances") == 1
            )

        await wait_until(frontend_has_exactly_it, timeout=DEADLINE, message=fe.describe)

    async def handover(fe: FrontendProcess, old: WorkerProcess, new: int) -> WorkerProcess:
        """Publish model ``new``, then unpublish ``old`` (a delete the frontend must see)."""
        w = worker(new)
        await w.wait_registered()
        old.signal(signal.SIGTERM)
        assert await old.wait_exit() == 0
        await expect(fe, w)
        return w

    try:
        fe = FrontendProcess(endpoints, tmp=tmp_path, reconcile_interval=0)
        procs.append(fe)
        await fe.wait_listening()
        w = worker(0)
        await expect(fe, w)

        # 1. The leader dies.
        leader = await asyncio.to_thread(etcd_cluster.leader_index)
        await asyncio.to_thread(etcd_cluster.kill_member, leader)
        w = await handover(fe, w, 1)
        await asyncio.to_thread(etcd_cluster.start_member, leader)

        # 2. The member the frontend's watch is connected to dies.
        watched = await connected_member(etcd_cluster, fe.pid)
        await asyncio.to_thread(etcd_cluster.kill_member, watched)
        w = await handover(fe, w, 2)
        await asyncio.to_thread(etcd_cluster.start_member, watched)

        # 3. The member the worker keeps its lease alive through dies: the lease and its key
        #    survive (keepalives fail over), and publishing goes on.
        key, lease = w.keys()[-1]
        used = await connected_member(etcd_cluster, w.pid)
        await asyncio.to_thread(etcd_cluster.kill_member, used)
        await wait_until(lambda: _keepalive_failed_over(w), timeout=DEADLINE, message=w.describe)
        assert await client.lease_keepalive(lease) > 0
        assert w.keys() == [(key, lease)]  # never re-registered
        w = await handover(fe, w, 3)
        await asyncio.to_thread(etcd_cluster.start_member, used)

        metrics = await fe.metrics()
        assert metrics['discovery_mdc_relists_total{reason="compaction"}'] == 0
        assert metrics['discovery_mdc_relists_total{reason="reconcile"}'] == 0
        assert metrics['discovery_mdc_watch_events_total{type="delete"}'] >= 3
        assert metrics["discovery_mdc_watch_reconnects_total"] >= 1  # the watch really moved
        assert await fe.model_ids() == {"model-3"}
    finally:
        for p in procs:
            p.stop()


def _keepalive_failed_over(w: WorkerProcess) -> bool:
    return "now using endpoint" in w.log() or "keepalive for etcd lease" in w.log()
