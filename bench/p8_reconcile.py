"""P8: reconcile cost. 10,000 instances, one frontend idle for a minute with default settings.

Four publisher processes create 10,000 card envelopes (~2.3 KB each, 5 models). A frontend
with default settings (reconcile every 5 s) reaches etcd only through a counting TCP proxy.
Once it has converged and two reconciles have passed (the first check after the listing reads
the keys changed since it), nothing under ``v1/mdc/`` changes for 60 s while the proxy counts
the bytes etcd sends the frontend (HTTP headers and the watch stream included) and /proc
counts the frontend's and etcd's CPU time. A second window (30 s, scaled to a minute) repeats
that while this process writes a key outside the prefix every second: etcd's revision then
moves, so every check also reads the keys changed under the prefix, and etcd scans the
prefix to answer it. For comparison, one full relist of the prefix is made through the same
proxy: the reconcile before the informer did that every 30 s.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from bench._ctx import Ctx
from bench._util import (
    HOST,
    Proc,
    Row,
    ScenarioResult,
    Stats,
    call_all,
    cpu_seconds,
    prom_get,
    start_our_frontend,
    start_publishers,
    write_bench_model,
)
from testkit import wait_until_sync

NAME = "P8"
TITLE = "Reconcile cost: 10,000 instances, one idle minute"
PUBLISHERS = 4
MODELS = 5
GOAL_KIB = 256


@dataclass(frozen=True, slots=True)
class Window:
    """What one frontend cost over a window, scaled to a minute."""

    down_kib: float
    up_kib: float
    read_kib: float
    checks: float
    relists: float
    cpu: float
    etcd_cpu: float


async def _relist_bytes(url: str, prefix: str) -> int:
    from discovery_mdc.etcd import EtcdClient

    async with EtcdClient(url) as client:
        return (await client.range_prefix_all(prefix)).size


def _measure(proxy: object, fe: Proc, etcd_pid: int, base: str, seconds: float) -> Window:
    def counter(name: str) -> float:
        return prom_get(base, name)

    names = (
        "discovery_mdc_reconcile_read_bytes_total",
        "discovery_mdc_reconcile_checks_total",
        "discovery_mdc_relists_total",
    )
    down0, up0 = proxy.bytes_down, proxy.bytes_up  # type: ignore[attr-defined]
    cpu0, etcd0 = cpu_seconds(fe.pid), cpu_seconds(etcd_pid)
    before = [counter(n) for n in names]
    time.sleep(seconds)
    read, checks, relists = (counter(n) - b for n, b in zip(names, before, strict=True))
    scale = 60.0 / seconds
    return Window(
        down_kib=(proxy.bytes_down - down0) * scale / 1024,  # type: ignore[attr-defined]
        up_kib=(proxy.bytes_up - up0) * scale / 1024,  # type: ignore[attr-defined]
        read_kib=read * scale / 1024,
        checks=checks,
        relists=relists,
        cpu=(cpu_seconds(fe.pid) - cpu0) * scale,
        etcd_cpu=(cpu_seconds(etcd_pid) - etcd0) * scale,
    )


def _ticker(url: str, stop: threading.Event) -> None:
    """Write a key outside the prefix every second until ``stop``."""
    from discovery_mdc.etcd import EtcdClient

    async def tick() -> None:
        async with EtcdClient(url) as client:
            n = 0
            while not stop.is_set():
                await client.put("bench/elsewhere", str(n).encode())
                n += 1
                await asyncio.sleep(1.0)

    asyncio.run(tick())


def run(ctx: Ctx) -> ScenarioResult:
    from discovery_mdc.etcd import EtcdServer
    from testkit import TcpProxy

    result = ScenarioResult(NAME, TITLE)
    work = ctx.scenario_dir(NAME)
    instances = ctx.n(10_000, 1000)
    idle, busy = ctx.n(60, 10), ctx.n(30, 10)
    models = [write_bench_model(work / f"p8-{i}", seed=8000 + i) for i in range(MODELS)]
    with EtcdServer(log_path=work / "etcd.log") as etcd, TcpProxy(HOST, etcd.client_port) as proxy:
        assert etcd.pid is not None
        etcd_pid = etcd.pid
        pubs, _ = start_publishers(
            etcd.client_url, work, "p8", total=instances, models=models, count=PUBLISHERS
        )
        call_all(pubs, {"op": "go"}, 300)
        t0, c0 = time.monotonic(), cpu_seconds(etcd_pid)
        time.sleep(ctx.n(10, 3))  # etcd's own idle CPU (raft ticks), for reference
        etcd_alone = (cpu_seconds(etcd_pid) - c0) * 60.0 / (time.monotonic() - t0)
        fe, port = start_our_frontend(proxy.url, work, "frontend")
        base = f"http://{HOST}:{port}"
        wait_until_sync(
            lambda: (
                prom_get(base, "discovery_mdc_instances") >= instances
                and prom_get(base, "discovery_mdc_models_ready") >= MODELS
            ),
            timeout=300,
            message="frontend convergence",
            proc=fe,
        )
        settled = prom_get(base, "discovery_mdc_reconcile_checks_total") + 2
        wait_until_sync(
            lambda: prom_get(base, "discovery_mdc_reconcile_checks_total") >= settled,
            timeout=60,
            message="two reconciles",
            proc=fe,
        )
        quiet = _measure(proxy, fe, etcd_pid, base, idle)
        stop = threading.Event()
        ticker = threading.Thread(target=_ticker, args=(etcd.client_url, stop), daemon=True)
        ticker.start()
        try:
            moving = _measure(proxy, fe, etcd_pid, base, busy)
        finally:
            stop.set()
            ticker.join(10)
        before = proxy.bytes_down
        relist_body = asyncio.run(_relist_bytes(proxy.url, "v1/mdc/"))
        relist = proxy.bytes_down - before
        fe.stop()
        for p in pubs:
            p.call({"op": "quit"}, 30)
    old = Stats.of([2 * relist / 1024], "KiB")
    peer = "a full relist every 30 s (the reconcile before the informer)"
    for w, when, goal in (
        (quiet, "an idle minute", True),
        (moving, "a minute of writes elsewhere", False),
    ):
        down = Stats.of([w.down_kib], "KiB")
        result.rows.append(
            Row(
                NAME,
                f"bytes etcd sent one frontend in {when} ({instances:,} instances)",
                down,
                old,
                peer,
                "time",
                target=f"≤ {GOAL_KIB} KiB" if goal else "",
                met=down.max <= GOAL_KIB if goal else None,
                note=f"counted at a TCP proxy; the frontend sent {w.up_kib:.1f} KiB; its "
                f"reconciles read {w.read_kib:.2f} KiB of bodies in {int(w.checks)} read(s); "
                f"{int(w.relists)} relist(s)",
            )
        )
        result.rows.append(
            Row(NAME, f"frontend CPU in {when}", Stats.of([w.cpu], "CPU s"), ranked=False)
        )
        result.rows.append(
            Row(
                NAME,
                f"etcd CPU in {when} (serving this one frontend)",
                Stats.of([w.etcd_cpu], "CPU s"),
                ranked=False,
                note=f"etcd alone, before the frontend started: {etcd_alone:.2f} CPU s a minute",
            )
        )
    result.notes.append(
        f"one full relist of v1/mdc/ through the proxy: {relist / 1e6:.1f} MB on the wire "
        f"({relist_body / 1e6:.1f} MB of JSON bodies); windows of {idle} s and {busy} s, "
        "scaled to a minute"
    )
    return result
