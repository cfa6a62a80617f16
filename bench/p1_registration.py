"""P1: cold registration latency, ours vs the Dynamo 1.6.1 frontend.

One etcd, one worker (ours, self-hosting its files on a status server, also publishing the
Dynamo endpoint-instance record so Dynamo routes to it), and two frontends watching the same
etcd: ours and Dynamo's. Each registration is a new model name with new file contents (a new
seed), so both caches are cold for it. The latency is measured from just before the worker
sends its first create to etcd (a timestamp taken in the worker process, CLOCK_MONOTONIC) to
the first ``GET /v1/models`` response that lists the model, polled every 5 ms on both
frontends concurrently from this process. One warm-up registration is discarded.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import aiohttp

from bench._ctx import Ctx
from bench._peers import start_dynamo_frontend
from bench._util import (
    HOST,
    Proc,
    Row,
    ScenarioResult,
    Stats,
    child_args,
    http_json,
    model_files,
    start_our_frontend,
    write_bench_model,
)
from testkit import child_env, free_port, wait_until, wait_until_sync

NAME = "P1"
TITLE = "Cold registration latency (worker put → listed on /v1/models)"
POLL_INTERVAL = 0.005
LIST_TIMEOUT = 60.0


async def _poll(
    session: aiohttp.ClientSession, url: str, name: str, *, present: bool = True
) -> float:
    """Poll ``url`` until ``name`` is (or is no longer) listed; the monotonic time of the
    response that showed it."""

    async def seen() -> float | None:
        async with session.get(url) as resp:
            body = await resp.json(content_type=None)
        now = time.monotonic()
        ids = {m.get("id") for m in body.get("data", [])} if isinstance(body, dict) else set()
        return now if (name in ids) == present else None

    return await wait_until(
        seen,
        timeout=LIST_TIMEOUT,
        interval=POLL_INTERVAL,
        message=f"{url}: model {name!r} present={present}",
    )


async def _measure(
    worker: Proc, models: list[Path], urls: dict[str, str], result: ScenarioResult
) -> dict[str, list[float]]:
    lat: dict[str, list[float]] = {k: [] for k in urls}
    lat["worker put (first create → last ack)"] = []
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for i, model_dir in enumerate(models):
            name = f"bench-p1-{i}"
            polls = {k: asyncio.create_task(_poll(session, u, name)) for k, u in urls.items()}
            reply = await asyncio.to_thread(
                worker.call,
                {
                    "op": "register",
                    "dir": str(model_dir),
                    "name": name,
                    "transport": "tcp://127.0.0.1:9/bench",
                },
            )
            seen = {k: await t for k, t in polls.items()}
            t0 = float(reply["t_sent"])
            if i == 0:
                result.notes.append(
                    "warm-up registration (discarded): "
                    + ", ".join(f"{k} {1000 * (t - t0):.0f} ms" for k, t in seen.items())
                )
            else:
                for k, t in seen.items():
                    lat[k].append(1000 * (t - t0))
                lat["worker put (first create → last ack)"].append(
                    1000 * (float(reply["t_ack"]) - t0)
                )
            await asyncio.to_thread(worker.call, {"op": "unregister"})
            await asyncio.gather(*(_poll(session, u, name, present=False) for u in urls.values()))
    return lat


def run(ctx: Ctx) -> ScenarioResult:
    from discovery_mdc.etcd import EtcdServer

    result = ScenarioResult(NAME, TITLE)
    work = ctx.scenario_dir(NAME)
    count = ctx.n(12, 3) + 1  # + the warm-up
    models = [write_bench_model(work / f"model-{i}", seed=1000 + i) for i in range(count)]
    files = model_files(models[0])
    result.notes.append(
        f"model: {len(files)} files, {sum(files.values()) / 1e6:.2f} MB "
        f"(tokenizer.json {files['tokenizer.json'] / 1e6:.2f} MB); a new seed and name per "
        "registration, so both frontends fetch every file"
    )
    procs: list[Proc] = []
    with EtcdServer(log_path=work / "etcd.log") as etcd:
        try:
            ours, our_port = start_our_frontend(
                etcd.client_url, work, "ours-frontend", profile_to=ctx.profile_session(NAME)
            )
            procs.append(ours)
            dyn_port = free_port()
            dyn_home = work / "dynamo-home"
            dyn_home.mkdir()
            dyn = start_dynamo_frontend(
                etcd.client_url, dyn_home, dyn_port, work / "dynamo-frontend.log"
            )
            procs.append(dyn)
            wait_until_sync(
                lambda: http_json(f"http://{HOST}:{dyn_port}/v1/models") is not None,
                timeout=120,
                message="Dynamo frontend /v1/models",
                proc=dyn,
            )
            worker = Proc(
                "worker",
                child_args("bench._child", "worker", "--etcd", etcd.client_url),
                log=work / "worker.log",
                env=child_env(),
                stdin=subprocess.PIPE,
                stdout_pipe=True,
            )
            procs.append(worker)
            worker.recv(60)
            urls = {
                "ours": f"http://{HOST}:{our_port}/v1/models",
                "dynamo": f"http://{HOST}:{dyn_port}/v1/models",
            }
            lat = asyncio.run(_measure(worker, models, urls, result))
            worker.call({"op": "quit"})
        finally:
            for p in reversed(procs):
                p.stop()
    ours_s = Stats.of(lat["ours"], "ms")
    dyn_s = Stats.of(lat["dynamo"], "ms")
    row = Row(
        NAME,
        "cold registration → listed",
        ours_s,
        dyn_s,
        "Dynamo 1.6.1 frontend",
        "time",
        "ratio ≤ 0.8",
    )
    row.met = row.ratio is not None and row.ratio <= 0.8
    result.rows.append(row)
    result.rows.append(
        Row(
            NAME,
            "worker: first create sent → last create acked",
            Stats.of(lat["worker put (first create → last ack)"], "ms"),
            note="included in both latencies above",
        )
    )
    return result
