"""P9: silent watch. The frontend's etcd connections freeze; keys change; how long until
``/v1/models`` is exact?

A frontend with default settings reaches etcd through a TCP proxy and lists model A (20
instances from one publisher process). Then the proxy freezes every open connection: no
bytes pass either way and nothing is closed, as when a middlebox drops the flows' state or a
host stops answering (new connections still pass). Right after, model B appears (20 new
instances) and model A goes (its 20 leases revoked). The metric is the time from the last of
those writes until ``/v1/models`` lists exactly B, polled every 50 ms. Each round waits a
different time (0-5 s, seeded) before the change, so the rounds see the reconcile timer at
different phases.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench._ctx import Ctx
from bench._util import (
    HOST,
    Row,
    ScenarioResult,
    Stats,
    http_json,
    start_our_frontend,
    start_publisher,
    write_bench_model,
)
from testkit import wait_until_sync

NAME = "P9"
TITLE = "Silent watch: frozen etcd connections, then keys change"
INSTANCES = 20
GOAL_S = 10.0
TIMEOUT = 120.0


def _models(base: str) -> set[str]:
    return {m["id"] for m in http_json(f"{base}/v1/models")["data"]}


def _round(work: Path, r: int, model_a: Path, model_b: Path) -> tuple[float, bool]:
    """One round: seconds from the last change to an exact /v1/models, and whether the
    frontend logged a silent-watch restart."""
    from discovery_mdc.etcd import EtcdServer
    from testkit import TcpProxy

    with (
        EtcdServer(log_path=work / f"etcd-{r}.log") as etcd,
        TcpProxy(HOST, etcd.client_port) as proxy,
    ):
        pubs = [
            start_publisher(
                etcd.client_url, work, f"pub-{r}-{i}", index=i, instances=INSTANCES, models=[m]
            )
            for i, m in enumerate((model_a, model_b))
        ]
        try:
            name_a, name_b = (p.recv(120)["models"][0] for p in pubs)
            pubs[0].call({"op": "go"}, 120)
            fe, port = start_our_frontend(proxy.url, work, f"frontend-{r}")
            base = f"http://{HOST}:{port}"
            wait_until_sync(lambda: _models(base) == {name_a}, timeout=TIMEOUT, message="model A")
            time.sleep(random.Random(9000 + r).uniform(0, 5))
            proxy.freeze()
            with ThreadPoolExecutor(2) as pool:
                added = pool.submit(pubs[1].call, {"op": "go"}, 120)
                gone = pool.submit(pubs[0].call, {"op": "revoke"}, 120)
                changed = max(added.result()["t_done"], gone.result()["t_done"])
            wait_until_sync(
                lambda: _models(base) == {name_b},
                timeout=TIMEOUT,
                message=f"P9: /v1/models never became exactly {name_b!r}",
            )
            seconds = time.monotonic() - changed
            restarted = "restarting the watch" in fe.log()
            fe.stop()
            return seconds, restarted
        finally:
            for p in pubs:
                p.stop()


def run(ctx: Ctx) -> ScenarioResult:
    result = ScenarioResult(NAME, TITLE)
    work = ctx.scenario_dir(NAME)
    model_a = write_bench_model(work / "silent-a", seed=9001)
    model_b = write_bench_model(work / "silent-b", seed=9002)
    rounds = [_round(work, r, model_a, model_b) for r in range(ctx.n(3, 1))]
    got = Stats.of([s for s, _ in rounds], "s")
    result.rows.append(
        Row(
            NAME,
            "frozen connections: last change → /v1/models exact",
            got,
            target=f"≤ {GOAL_S:.0f} s",
            met=got.max <= GOAL_S,
            note=f"the frontend logged a silent-watch restart in "
            f"{sum(r for _, r in rounds)} of {len(rounds)} round(s)",
        )
    )
    result.notes.append(
        f"{len(rounds)} round(s), each with a fresh etcd, proxy and frontend (default "
        f"settings); {INSTANCES} instances per model"
    )
    return result
