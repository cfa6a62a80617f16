"""Soak: worker processes churn across 5 models while etcd restarts, the frontend is cut off
past a compaction, and a lease is revoked. The end state must be exact.

The churn is paced by the processes themselves (each step waits until its worker registered
or exited), never by fixed sleeps; the RNG is seeded (``CHURN_SEED`` overrides) so a failure
replays the same order of operations.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections import Counter
from pathlib import Path

import pytest

from discovery_mdc.etcd import EtcdClient, EtcdServer
from testkit import FrontendProcess, TcpProxy, WorkerProcess, card_keys, model_dirs, wait_until

SEED = int(os.environ.get("CHURN_SEED", "20250917"))
MAX_WORKERS = 6
STEPS = 160
TTL = 3
RECONCILE = 5.0
DEADLINE = 90.0

# step -> fault; the proxy stays cut from CUT to COMPACT while the churn goes on.
RESTART_1, CUT, COMPACT, REVOKE, RESTART_2 = 25, 50, 75, 100, 125


class Churn:
    def __init__(self, etcd: str, models: list[Path], logs: Path, rng: random.Random) -> None:
        self.etcd = etcd
        self.models = models
        self.logs = logs
        self.rng = rng
        self.workers: list[WorkerProcess] = []
        self.counts: Counter[str] = Counter()

    def live(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive]

    async def step(self) -> None:
        live = self.live()
        choices = ["spawn"] * (MAX_WORKERS - len(live)) + ["term", "kill"] * bool(live)
        action = self.rng.choice(choices or ["spawn"])
        self.counts[action] += 1
        if action == "spawn":
            model = self.rng.choice(self.models)
            w = WorkerProcess.serving(
                self.etcd, model, ttl=TTL, log_path=self.logs / f"w{len(self.workers)}.log"
            )
            self.workers.append(w)
            await wait_until(lambda: w.keys() or not w.alive, timeout=DEADLINE, message=w.describe)
            if not w.alive:  # e.g. started while etcd was restarting: it says why and exits
                self.counts["start_failed"] += 1
        else:
            w = self.rng.choice(live)
            w.signal(signal.SIGTERM if action == "term" else signal.SIGKILL)
            await w.wait_exit(timeout=DEADLINE)

    def close(self) -> None:
        for w in self.workers:
            w.stop()


@pytest.mark.slow
async def test_churn_under_faults_ends_with_exactly_the_live_keys(
    etcd_server: EtcdServer, client: EtcdClient, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    models = model_dirs(tmp_path / "models", 5)
    churn = Churn(etcd_server.client_url, models, tmp_path, rng)
    restarts: list[asyncio.Task[None]] = []
    fe: FrontendProcess | None = None
    try:
        with TcpProxy("127.0.0.1", etcd_server.client_port) as proxy:
            fe = FrontendProcess(proxy.url, tmp=tmp_path, reconcile_interval=RECONCILE)
            await fe.wait_listening()
            fe_rev = 0
            for i in range(STEPS):
                if i in (RESTART_1, RESTART_2):
                    # Concurrent with the churn: workers starting now may fail and exit.
                    restarts.append(asyncio.create_task(asyncio.to_thread(etcd_server.restart)))
                elif i == CUT:
                    await restarts[0]  # one fault at a time
                    _, health = await fe.get_json("/health")
                    fe_rev = int(health["revision"])
                    proxy.cut()
                elif i == COMPACT:
                    rev = await client.put("churn/bump", b"x")
                    assert rev > fe_rev
                    await client.compact(rev)
                    proxy.restore()
                elif i == REVOKE:
                    registered = [w for w in churn.live() if w.keys()]
                    if registered:
                        victim = rng.choice(registered)
                        before = len(victim.keys())
                        _, lease = victim.keys()[-1]
                        churn.counts["revoked"] += await client.lease_revoke(lease)
                        # It notices (keepalive TTL=0) and re-registers under a new lease.
                        await wait_until(
                            lambda: len(victim.keys()) > before,  # noqa: B023 - awaited here
                            timeout=DEADLINE,
                            message=victim.describe,
                        )
                await churn.step()
                if restarts and restarts[-1].done():
                    await restarts[-1]  # surface a failed restart here
            for task in restarts:
                await task

            # Every surviving worker is registered and etcd holds exactly their keys: dead
            # workers' keys are revoked (SIGTERM) or expire with their TTL (kill -9).
            live = churn.live()

            def expected() -> set[str]:
                return {k for w in live if (k := w.current_key()) is not None}

            async def etcd_matches() -> bool:
                return len(expected()) == len(live) and await card_keys(client) == expected()

            await wait_until(
                etcd_matches,
                timeout=DEADLINE,
                message=lambda: f"live workers' keys {sorted(expected())}",
            )
            truth = await card_keys(client)
            assert all(w.alive for w in live)

            # The frontend converges to exactly that: no ghost, nothing missing, no pending.
            seen: list[object] = []

            async def frontend_matches() -> bool:
                assert fe is not None
                ready = await fe.ready_instances()
                gauge = (await fe.metrics()).get("discovery_mdc_instances")
                seen[:] = [sorted(ready ^ truth), gauge]
                return ready == truth and gauge == len(truth)

            await wait_until(
                frontend_matches,
                timeout=DEADLINE,
                message=lambda: f"ghosts/missing, gauge: {seen}\n{fe.describe() if fe else ''}",
            )
            assert await card_keys(client) == truth  # nothing moved while we looked
            metrics = await fe.metrics()
    finally:
        churn.close()
        if fe is not None:
            fe.stop()
    events = sum(v for k, v in metrics.items() if k.startswith("discovery_mdc_watch_events_total"))
    relists = {k: int(v) for k, v in metrics.items() if k.startswith("discovery_mdc_relists_total")}
    reregistrations = sum(w.reregistrations() for w in churn.workers)
    print(
        f"\nchurn seed={SEED} steps={STEPS} actions={dict(churn.counts)} "
        f"live_at_end={len(truth)} events={int(events)} "
        f"reconnects={int(metrics['discovery_mdc_watch_reconnects_total'])} relists={relists} "
        f"re-registrations={reregistrations}"
    )
