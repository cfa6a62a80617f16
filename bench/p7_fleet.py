"""P7: fleet spread. 12 frontends started together against 4 replicas of one model.

Four ``discovery-mdc worker`` processes self-host the same ~2.3 MB model (5 files) and
register. Then 12 ``discovery-mdc frontend`` processes, each with its own cache, are started
at once; each lists the 4 replicas and fetches every blob once. Each frontend ranks the
replicas by a rendezvous hash of (frontend id, replica) and hands its blobs (in digest order)
out round-robin in that order, so its 5 blobs land 2, 1, 1, 1 on the replicas, the 2 on its
own favourite (``cache/_plan.py::spread_sources``). The metric is the most metadata GETs
any one worker answered (its own ``discovery_mdc_metadata_requests_total``, status 200)
divided by the fair share (all GETs / 4); 1.00 is perfectly even. Each round starts 12 fresh
frontends (new caches, hence new ids) against the same workers.

Then one more round in which a replica is killed with -9 mid-run (as soon as the first
frontend is up, i.e. has listed etcd and started fetching): its key stays in etcd until its
lease (TTL 10 s) expires, so the others must fail over from it. The metric is the time until
all 12 list the model, and the fetches they report as failed against the dead replica
(``discovery_mdc_source_fetches_total{source="<its host:port>",result="failed"}``); the row
is met only if there was such a failover and all 12 converged.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from pathlib import Path

from bench._ctx import Ctx
from bench._util import (
    HOST,
    PY,
    Proc,
    Row,
    ScenarioResult,
    Stats,
    http_json,
    launch_our_frontend,
    prom_get,
    wait_our_frontend,
    write_bench_model,
)
from testkit import child_env, wait_until_sync

NAME = "P7"
TITLE = "Fleet spread: 12 frontends x 4 replicas of one model, started together"
FRONTENDS = 12
REPLICAS = 4
MODEL = "bench/fleet"
TIMEOUT = 180.0
_LISTENING = re.compile(r"status server listening on \S+:(?P<port>\d+)")


def _start_worker(etcd_url: str, model: Path, work: Path, i: int) -> tuple[Proc, int]:
    proc = Proc(
        f"worker-{i}",
        [PY, "-m", "discovery_mdc", "worker", "--etcd", etcd_url, "--model-path", str(model),
         "--model-name", MODEL, "--system-port", "0", "--system-host", HOST,
         "--lease-ttl", "10"],
        log=work / f"worker-{i}.log",
        env=child_env(),
    )  # fmt: skip

    def registered() -> int | None:
        text = proc.log()
        m = _LISTENING.search(text)
        return int(m["port"]) if m and "registered model" in text else None

    port = wait_until_sync(registered, timeout=60, message=f"worker-{i} registered", proc=proc)
    return proc, port


def _served(port: int) -> float:
    return prom_get(
        f"http://{HOST}:{port}", "discovery_mdc_metadata_requests_total", 'status="200"'
    )


def _lists_model(port: int) -> bool:
    return any(m["id"] == MODEL for m in http_json(f"http://{HOST}:{port}/v1/models")["data"])


def _fleet(
    etcd_url: str, work: Path, tag: str, *, kill: Proc | None = None
) -> tuple[list[Proc], list[int], float]:
    """Start the 12 frontends at once; return them, their ports and the seconds until all
    list the model. With ``kill``, that worker is killed -9 as soon as the first one is up."""
    t0 = time.monotonic()
    launched = [
        launch_our_frontend(etcd_url, work, f"fe-{tag}-{i}", log_level="warning")
        for i in range(FRONTENDS)
    ]
    fes = [p for p, _, _ in launched]
    if kill is not None:
        # Mid-run: as soon as the first frontend has listed etcd and started fetching.
        wait_until_sync(
            lambda: any(pf.exists() and pf.read_text().strip() for _, pf, _ in launched),
            timeout=TIMEOUT,
            message="the first frontend",
        )
        kill.popen.send_signal(signal.SIGKILL)
        kill.popen.wait()
    ports = [wait_our_frontend(*x) for x in launched]
    pending = set(ports)

    def all_listed() -> bool:
        for port in list(pending):
            with contextlib.suppress(OSError):
                if _lists_model(port):
                    pending.discard(port)
        return not pending

    wait_until_sync(
        all_listed,
        timeout=max(0.0, TIMEOUT - (time.monotonic() - t0)),
        interval=0.02,
        message=lambda: f"P7: {len(pending)} frontend(s) never listed {MODEL}",
    )
    return fes, ports, time.monotonic() - t0


def run(ctx: Ctx) -> ScenarioResult:
    from discovery_mdc.etcd import EtcdServer

    result = ScenarioResult(NAME, TITLE)
    work = ctx.scenario_dir(NAME)
    model = write_bench_model(work / "fleet-model", seed=7000)
    ratios: list[float] = []
    per_blob: list[float] = []
    converge: list[float] = []
    with EtcdServer(log_path=work / "etcd.log") as etcd:
        workers = [_start_worker(etcd.client_url, model, work, i) for i in range(REPLICAS)]
        blobs = 0
        for r in range(ctx.n(3, 1)):
            before = [_served(port) for _, port in workers]
            fes, _, seconds = _fleet(etcd.client_url, work, str(r))
            converge.append(seconds)
            gets = [_served(port) - b for (_, port), b in zip(workers, before, strict=True)]
            for fe in fes:
                fe.stop()
            fair = sum(gets) / REPLICAS
            ratios.append(max(gets) / fair)
            blobs = blobs or len(list(model.iterdir()))
            per_blob.append(sum(gets) / (FRONTENDS * blobs))
            result.notes.append(f"round {r}: GETs per worker {[int(g) for g in gets]}")
        victim, victim_port = workers[0]
        fes, ports, killed_s = _fleet(etcd.client_url, work, "kill", kill=victim)
        # Each frontend's fetches that failed against the dead replica, then went elsewhere.
        against_victim = (f'source="{HOST}:{victim_port}"', 'result="failed"')
        failed = sum(
            prom_get(f"http://{HOST}:{p}", "discovery_mdc_source_fetches_total", against_victim)
            for p in ports
        )
        converged = sum(1 for p in ports if _lists_model(p))
        for fe in fes:
            fe.stop()
    spread = Stats.of(ratios, "x fair share")
    result.rows.append(
        Row(
            NAME,
            f"max GETs by one worker / fair share ({FRONTENDS} frontends, {REPLICAS} replicas)",
            spread,
            target="≤ 1.5",
            met=spread.max <= 1.5,
            note="before spreading, every frontend took the first listed replica: 4.00",
        )
    )
    result.rows.append(
        Row(
            NAME,
            "GETs per blob per frontend",
            Stats.of(per_blob, "GETs"),
            target="exactly 1.00",
            met=all(abs(x - 1.0) < 1e-9 for x in per_blob),
        )
    )
    result.rows.append(
        Row(NAME, "all 12 list the model, from their start", Stats.of(converge, "s"))
    )
    result.rows.append(
        Row(
            NAME,
            "one replica killed -9 mid-run: all 12 list the model",
            Stats.of([killed_s], "s"),
            target=f"a failover; all {FRONTENDS} converge",
            met=failed > 0 and converged == FRONTENDS,
            note=f"{int(failed)} fetch(es) failed over from the dead replica; "
            f"{converged} of {FRONTENDS} frontends list the model",
        )
    )
    result.notes.append(
        f"{REPLICAS} worker processes (self-hosting, lease TTL 10 s) and {FRONTENDS} frontend "
        f"processes, each with its own cache; {len(ratios)} round(s) plus the kill round"
    )
    return result
