"""P3: fan-in. 500 instances of 5 models, then 10,000 of 50, published in a burst, then
revoked in a burst.

Four publisher processes each run a real status server hosting the models' files (~2.3 MB
each) and, on "go", grant their share of leases and create one card envelope per lease (each
pointing at its own server's URLs; ~2.3 KB), 32 requests in flight per process. Our frontend
(a subprocess with a fresh cache, default settings) converges when its gauges show every
model listed and every instance admitted, and then ``/v1/models`` and each model's
``/v1/models/{id}`` confirm every instance is ready. Polled every 20 ms (50 ms at 10,000).

Fetches per unique blob = metadata GETs answered 200 by all four status servers, divided by
the distinct blake3 digests across the cards. CPU is utime+stime of the frontend from just
before the burst to convergence; peak RSS is its VmHWM. Then every lease is revoked and the
time until ``/v1/models`` is empty and the instance gauge is 0 is measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench._ctx import Ctx
from bench._util import (
    HOST,
    Proc,
    Row,
    ScenarioResult,
    Stats,
    cpu_seconds,
    http_get,
    http_json,
    hwm_mb,
    prom_value,
    rss_mb,
    start_our_frontend,
    start_publishers,
    write_bench_model,
)
from testkit import wait_until_sync

NAME = "P3"
TITLE = "Fan-in: 500 instances / 5 models, then 10,000 / 50, in a burst, then revoke all"
PUBLISHERS = 4
TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class Size:
    instances: int
    models: int
    runs: int
    poll: float

    @property
    def label(self) -> str:
        return f"{self.instances:,} x {self.models}"


SMALL = Size(500, 5, 3, 0.02)
LARGE = Size(10_000, 50, 1, 0.05)


def _converged(base: str, names: list[str], want: int) -> bool:
    metrics = http_get(f"{base}/metrics").decode()
    if prom_value(metrics, "discovery_mdc_models_ready") < len(names):
        return False
    if prom_value(metrics, "discovery_mdc_instances") < want:
        return False
    listed = {m["id"] for m in http_json(f"{base}/v1/models")["data"]}
    if not set(names) <= listed:
        return False
    ready = 0
    for name in names:
        info = http_json(f"{base}/v1/models/{name}")
        ready += sum(len(ws["instances"]) for ws in info["worker_sets"] if ws["ready"])
    return ready >= want


def _empty(base: str) -> bool:
    if http_json(f"{base}/v1/models")["data"]:
        return False
    return prom_value(http_get(f"{base}/metrics").decode(), "discovery_mdc_instances") == 0


def _poll_until(pred: Callable[[], bool], what: str, poll: float) -> float:
    """The monotonic time at which ``pred`` was first seen true (polled every ``poll``)."""
    return wait_until_sync(
        lambda: time.monotonic() if pred() else None,
        timeout=TIMEOUT,
        interval=poll,
        message=f"P3: {what}",
    )


def _one_run(ctx: Ctx, work: Path, models: list[Path], size: Size, run_no: int) -> dict[str, float]:
    from discovery_mdc.etcd import EtcdServer

    procs: list[Proc] = []
    tag = f"{size.instances}-{run_no}"
    with EtcdServer(log_path=work / f"etcd-{tag}.log") as etcd:
        try:
            fe, port = start_our_frontend(
                etcd.client_url,
                work,
                f"frontend-{tag}",
                profile_to=ctx.profile_session(NAME) if run_no == 0 else None,
            )
            procs.append(fe)
            base = f"http://{HOST}:{port}"
            pubs, ready = start_publishers(
                etcd.client_url, work, tag, total=size.instances, models=models, count=PUBLISHERS
            )
            procs.extend(pubs)
            blobs = {b for r in ready for b in r["blobs"]}
            names = ready[0]["models"]
            time.sleep(0.3)  # let the frontend settle to idle before sampling it
            rss_idle = rss_mb(fe.pid)
            cpu0 = cpu_seconds(fe.pid)
            with ThreadPoolExecutor(PUBLISHERS) as pool:
                futs = [pool.submit(p.call, {"op": "go"}, TIMEOUT) for p in pubs]
                t_conv = _poll_until(
                    lambda: _converged(base, names, size.instances), "convergence", size.poll
                )
                replies = [f.result() for f in futs]
            cpu1 = cpu_seconds(fe.pid)
            hwm_conv = hwm_mb(fe.pid)
            rss_conv = rss_mb(fe.pid)
            t0 = min(r["t_first"] for r in replies)
            burst = max(r["t_done"] for r in replies) - t0
            fetched = 0.0
            for r in ready:
                text = http_get(f"{r['base_url']}/metrics").decode()
                fetched += prom_value(text, "discovery_mdc_metadata_requests_total", 'status="200"')
            with ThreadPoolExecutor(PUBLISHERS) as pool:
                futs = [pool.submit(p.call, {"op": "revoke"}, TIMEOUT) for p in pubs]
                t_empty = _poll_until(lambda: _empty(base), "empty", size.poll)
                revokes = [f.result() for f in futs]
            cpu2 = cpu_seconds(fe.pid)
            d0 = min(r["t_first"] for r in revokes)
            for p in pubs:
                p.call({"op": "quit"}, 30)
            return {
                "converge_s": t_conv - t0,
                "burst_s": burst,
                "empty_s": t_empty - d0,
                "revoke_burst_s": max(r["t_done"] for r in revokes) - d0,
                "fetch_per_blob": fetched / len(blobs),
                "blobs": float(len(blobs)),
                "cpu_s": cpu1 - cpu0,
                "cpu_delete_s": cpu2 - cpu1,
                "rss_idle_mb": rss_idle,
                "rss_conv_mb": rss_conv,
                "hwm_mb": max(hwm_conv, hwm_mb(fe.pid)),
            }
        finally:
            for p in reversed(procs):
                p.stop()


def run(ctx: Ctx) -> ScenarioResult:
    result = ScenarioResult(NAME, TITLE)
    work = ctx.scenario_dir(NAME)
    sizes = [SMALL, LARGE] if not ctx.quick else [Size(200, 5, 1, 0.02), Size(1000, 10, 1, 0.05)]
    every = [
        write_bench_model(work / f"fanin-{i}", seed=3000 + i)
        for i in range(max(s.models for s in sizes))
    ]
    for size in sizes:
        models = every[: size.models]
        runs = [_one_run(ctx, work, models, size, i) for i in range(size.runs)]
        _rows(result, size, runs)
    result.notes.append(
        f"{PUBLISHERS} publisher processes share the leases; models of ~2.3 MB; each run with "
        "a fresh etcd, frontend and cache; "
        + ", ".join(f"{s.label}: {s.runs} run(s)" for s in sizes)
    )
    return result


def _rows(result: ScenarioResult, size: Size, runs: list[dict[str, float]]) -> None:
    def s(key: str, unit: str) -> Stats:
        return Stats.of([r[key] for r in runs], unit)

    conv = s("converge_s", "s")
    result.rows.append(
        Row(
            NAME,
            f"{size.label}: time to convergence (all instances ready)",
            conv,
            target="≤ 10 s" if size.instances <= 500 else "",
            met=conv.max <= 10.0 if size.instances <= 500 else None,
            note=f"publish burst itself took {s('burst_s', 's').summary()}",
        )
    )
    fpb = s("fetch_per_blob", "fetches/blob")
    result.rows.append(
        Row(
            NAME,
            f"{size.label}: fetches per unique blob",
            fpb,
            target="exactly 1.00",
            met=all(abs(r["fetch_per_blob"] - 1.0) < 1e-9 for r in runs),
            note=f"{int(runs[0]['blobs'])} unique blobs, served by {PUBLISHERS} status servers",
        )
    )
    hwm = s("hwm_mb", "MB")
    limit = 150.0 if size.instances <= 500 else 100.0
    result.rows.append(
        Row(
            NAME,
            f"{size.label}: frontend peak RSS (VmHWM)",
            hwm,
            target=f"≤ {limit:.0f} MB",
            met=hwm.max <= limit,
            note=f"idle before the burst: {s('rss_idle_mb', 'MB').summary()}; "
            f"RSS once converged: {s('rss_conv_mb', 'MB').summary()}",
        )
    )
    result.rows.append(
        Row(NAME, f"{size.label}: frontend CPU, burst → converged", s("cpu_s", "CPU s"))
    )
    result.rows.append(
        Row(
            NAME,
            f"{size.label}: time to empty after revoking every lease",
            s("empty_s", "s"),
            note=f"revoke burst took {s('revoke_burst_s', 's').summary()}; "
            f"frontend CPU {s('cpu_delete_s', 'CPU s').summary()}",
        )
    )
