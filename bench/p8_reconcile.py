"""P8: reconcile cost. 10,000 instances, one frontend idle for a minute with default settings.

Four publisher processes create 10,000 card envelopes (~2.3 KB each, 5 models). A frontend
with default settings (reconcile every 5 s) reaches etcd only through a counting TCP proxy.
Once it has converged and two reconciles have passed (the first check after the listing reads
the keys changed since it), nothing changes for 60 s while the proxy counts the bytes etcd
sends the frontend (HTTP headers and the watch stream included) and /proc counts the
frontend's CPU time (and etcd's). For comparison, one full relist of the prefix is made
through the same proxy: the reconcile before the informer did that every 30 s.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from bench._ctx import Ctx
from bench._util import (
    HOST,
    Row,
    ScenarioResult,
    Stats,
    cpu_seconds,
    prom_get,
    start_our_frontend,
    start_publisher,
    wait_for,
    write_bench_model,
)

NAME = "P8"
TITLE = "Reconcile cost: 10,000 instances, one idle minute"
PUBLISHERS = 4
MODELS = 5
GOAL_KIB = 256


async def _relist_bytes(url: str, prefix: str) -> int:
    from discovery_mdc.etcd import EtcdClient

    async with EtcdClient(url) as client:
        return (await client.range_prefix_all(prefix)).size


def run(ctx: Ctx) -> ScenarioResult:
    from discovery_mdc.etcd import EtcdServer
    from integration._proxy import TcpProxy

    result = ScenarioResult(NAME, TITLE)
    work = ctx.scenario_dir(NAME)
    instances = ctx.n(10_000, 1000)
    idle = ctx.n(60, 10)
    models = [write_bench_model(work / f"p8-{i}", seed=8000 + i) for i in range(MODELS)]
    with EtcdServer(log_path=work / "etcd.log") as etcd, TcpProxy(HOST, etcd.client_port) as proxy:
        pubs = [
            start_publisher(
                etcd.client_url,
                work,
                f"publisher-{i}",
                index=i,
                instances=instances // PUBLISHERS,
                models=models,
            )
            for i in range(PUBLISHERS)
        ]
        for p in pubs:
            p.recv(300)
        with ThreadPoolExecutor(PUBLISHERS) as pool:
            for fut in [pool.submit(p.call, {"op": "go"}, 300) for p in pubs]:
                fut.result()
        fe, port = start_our_frontend(proxy.url, work, "frontend")
        base = f"http://{HOST}:{port}"

        def gauge(name: str) -> float:
            return prom_get(base, name)

        wait_for(
            lambda: (
                gauge("discovery_mdc_instances") >= instances
                and gauge("discovery_mdc_models_ready") >= MODELS
            ),
            timeout=300,
            what="frontend convergence",
            proc=fe.popen,
        )

        def checks() -> float:
            return prom_get(base, "discovery_mdc_reconcile_checks_total")

        settled = checks() + 2
        wait_for(lambda: checks() >= settled, timeout=60, what="two reconciles", proc=fe.popen)
        down0, up0 = proxy.bytes_down, proxy.bytes_up
        cpu0 = cpu_seconds(fe.pid)
        assert etcd.pid is not None
        etcd_pid = etcd.pid
        etcd_cpu0 = cpu_seconds(etcd_pid)
        read0 = gauge("discovery_mdc_reconcile_read_bytes_total")
        checks0 = checks()
        relists0 = gauge("discovery_mdc_relists_total")
        time.sleep(idle)
        down = proxy.bytes_down - down0
        up = proxy.bytes_up - up0
        cpu = cpu_seconds(fe.pid) - cpu0
        etcd_cpu = cpu_seconds(etcd_pid) - etcd_cpu0
        read = gauge("discovery_mdc_reconcile_read_bytes_total") - read0
        nchecks = checks() - checks0
        relists = gauge("discovery_mdc_relists_total") - relists0
        before = proxy.bytes_down
        relist_body = asyncio.run(_relist_bytes(proxy.url, "v1/mdc/"))
        relist = proxy.bytes_down - before
        fe.stop()
        for p in pubs:
            p.call({"op": "quit"}, 30)
    scale = 60.0 / idle
    ours = Stats.of([down * scale / 1024], "KiB")
    old = Stats.of([2 * relist / 1024], "KiB")
    result.rows.append(
        Row(
            NAME,
            f"bytes etcd sent one frontend in an idle minute ({instances:,} instances)",
            ours,
            old,
            "a full relist every 30 s (the reconcile before the informer)",
            "time",
            target=f"≤ {GOAL_KIB} KiB",
            met=ours.max <= GOAL_KIB,
            note=f"counted at a TCP proxy; the frontend sent {up * scale / 1024:.1f} KiB",
        )
    )
    result.rows.append(
        Row(
            NAME,
            "response bytes read by its reconciles (the client's own count)",
            Stats.of([read * scale / 1024], "KiB"),
            note=f"{int(nchecks)} check(s), {read / max(nchecks, 1):.0f} B each; "
            f"{int(relists)} relist(s)",
        )
    )
    result.rows.append(
        Row(NAME, "frontend CPU in the idle minute", Stats.of([cpu * scale], "CPU s"))
    )
    result.rows.append(
        Row(
            NAME,
            "etcd CPU in that minute (serving this one frontend)",
            Stats.of([etcd_cpu * scale], "CPU s"),
            note="each check makes etcd scan the prefix: min_mod_revision has no index",
        )
    )
    result.notes.append(
        f"one full relist of v1/mdc/ through the proxy: {relist / 1e6:.1f} MB on the wire "
        f"({relist_body / 1e6:.1f} MB of JSON bodies); idle window {idle} s"
        + (", scaled to a minute" if idle != 60 else "")
    )
    return result
