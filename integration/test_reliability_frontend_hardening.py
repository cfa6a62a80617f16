"""Issue 18, frontend side, end to end: real etcd, real worker and frontend processes.

- etcd back with less history (data dir wiped, same port): the frontend notices, relists
  from scratch and converges; workers re-register.
- A long etcd outage: the frontend is healthy again within seconds of etcd answering.
- Model ids ``/v1/models`` lists are all answered by ``/v1/models/{id}``.
- Metadata servers that accept connections and never answer do not starve a healthy model.

Every wait polls with a deadline; durations are logged, not asserted tightly.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from discovery_mdc.etcd import EtcdClient, EtcdServer
from integration._faults import (
    CliProcess,
    Spawn,
    card_keys,
    converged,
    model_dirs,
    start_frontend,
)
from integration._util import wait_until

DEADLINE = 60.0


async def _healthy(fe: object) -> bool:
    status, _ = await fe.get_json("/health")  # type: ignore[attr-defined]
    return bool(status == 200)


# --------------------------------------------------------------------------- lost history


async def test_etcd_wiped_and_restarted_frontend_drops_the_dead_and_workers_reregister(
    etcd_server: EtcdServer,
    client: EtcdClient,
    spawn_worker: Spawn,
    procs: list[CliProcess],
    tmp_path: Path,
) -> None:
    dead_dir, live_dir = model_dirs(tmp_path, 2)
    fe = await start_frontend(etcd_server.client_url, tmp_path, procs)
    dead, live = spawn_worker(dead_dir, ttl=10, name="dead"), spawn_worker(live_dir, ttl=10)
    first = {(await w.wait_registered())[0] for w in (dead, live)}
    assert await converged(fe, client) == first
    # Writes elsewhere move etcd's revision well past what the wiped etcd will reach; the
    # frontend's periodic check follows it.
    for i in range(30):
        rev = await client.put(f"bench/bump/{i}", b"x")

    async def frontend_at(revision: int) -> bool:
        _, health = await fe.get_json("/health")
        return bool(health["revision"] >= revision)

    await wait_until(lambda: frontend_at(rev), timeout=DEADLINE, message=fe.describe)
    dead.signal(signal.SIGKILL)
    await asyncio.to_thread(dead.proc.wait)
    await asyncio.to_thread(etcd_server.wipe_and_restart)  # empty, revision 1, same port

    # The live worker's lease is gone with the data: it re-registers under a new lease.
    await live.wait_log(r"re-registered 1 key", timeout=DEADLINE)
    (new_key,) = await wait_until(lambda: card_keys(client), timeout=DEADLINE)
    assert new_key not in first
    # The frontend forgets the dead worker's model and lists exactly what etcd holds.
    assert await converged(fe, client, DEADLINE) == {new_key}
    assert await fe.model_ids() == {"model-1"}
    assert await _healthy(fe)
    await fe.wait_log(r"etcd lost history under v1/mdc/: etcd answered at revision \d+, below")
    assert await fe.metric("discovery_mdc_relists_total", reason="history_lost") >= 1
    # And it keeps following etcd from the new revision.
    live.signal(signal.SIGTERM)
    assert await live.wait_exit() == 0
    assert await converged(fe, client, DEADLINE) == set()
    assert await fe.model_ids() == set()
