"""P6: watch throughput. Events/s our watcher processes vs bare watch readers, same stream.

The stream is written to etcd first: K instance keys of 5 models are put (creates), re-put
R-1 more times (updates with the same card), then deleted, N = K·(R+1) events between
revisions R0+1 and R_end. Each reader then replays that history from R0+1 as fast as it can,
one at a time, in its own process:

- ours: ``ModelWatcher`` (its ``PrefixInformer`` lists at R0, then watches from R0+1 with
  progress notifications; every changed envelope is decoded, instances admitted by mdcsum,
  the pipeline run once per model against a warm cache, including the default prepare hook),
  timed from the end of its listing until it has applied revision R_end and holds no
  instances;
- the informer alone: ``PrefixInformer`` yielding the same changes as batches to a consumer
  that only tracks the key set (no registry), timed the same way;
- a raw gateway reader: one ``POST /v3/watch`` through aiohttp with the same watch request,
  JSON-parsing every line and base64-decoding keys and values, timed until it has seen N
  events;
- ``etcdctl watch --prefix --rev`` (gRPC, Go) with ``-w json``, timed from process start.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from bench._ctx import Ctx
from bench._peers import etcdctl_binary
from bench._util import (
    Proc,
    Row,
    ScenarioResult,
    Stats,
    child_args,
    run_child,
    write_bench_model,
)
from testkit import child_env

NAME = "P6"
TITLE = "Watch throughput: replaying a stream of card updates"
MODELS = 5
PREFIX = "v1/mdc/"


async def _write_stream(
    etcd_url: str, models: list[Path], keys: int, rounds: int, cache_dir: Path
) -> tuple[int, int, int]:
    """Warm the cache with the 5 cards, write the stream; (R0, R_end, events)."""
    from discovery_mdc.cache import resolve_metadata_files
    from discovery_mdc.card import ModelEnvelope, card_key, encode_envelope, from_dir
    from discovery_mdc.etcd import EtcdClient

    cards = [from_dir(m, include_extra_files=True) for m in models]
    for card in cards:
        await resolve_metadata_files(card, cache_dir=cache_dir)
    values = []
    for i in range(keys):
        instance = 0x1000 + i
        env = ModelEnvelope(
            namespace="dynamo",
            component="backend",
            endpoint="generate",
            instance_id=instance,
            card=cards[i % len(cards)],
        )
        values.append((card_key("dynamo", "backend", "generate", instance), encode_envelope(env)))
    sem = asyncio.Semaphore(32)
    async with EtcdClient(etcd_url) as client:
        r0 = (await client.range(PREFIX, prefix=True, limit=1)).revision

        async def put(key: str, value: bytes) -> None:
            async with sem:
                await client.put(key, value)

        async def delete(key: str) -> None:
            async with sem:
                await client.delete(key)

        for _ in range(rounds):
            await asyncio.gather(*(put(k, v) for k, v in values))
        await asyncio.gather(*(delete(k) for k, _ in values))
        r_end = (await client.range(PREFIX, prefix=True, limit=1)).revision
    return r0, r_end, keys * (rounds + 1)


def _replay(
    work: Path,
    role: str,
    i: int,
    url: str,
    r0: int,
    r_end: int,
    n: int,
    extra: list[str],
    profile: Path | None,
) -> float:
    """Events/s of one of our readers (a ``bench._child`` role) replaying the stream."""
    r = run_child(
        f"{role}-{i}",
        child_args(
            "bench._child",
            role,
            "--etcd",
            url,
            "--rev",
            str(r0),
            "--until-rev",
            str(r_end),
            *extra,
            profile_to=profile,
        ),
        log=work / f"{role}-{i}.log",
        timeout=180,
    )
    if int(r["events"]) != n:
        raise RuntimeError(f"{role} counted {r['events']} events, want {n}")
    return n / float(r["elapsed"])


def _etcdctl(ctl: str, etcd_url: str, r0: int, n: int, log: Path) -> float:
    t0 = time.perf_counter()
    proc = Proc(
        "etcdctl",
        [
            ctl,
            f"--endpoints={etcd_url}",
            "watch",
            "--prefix",
            PREFIX,
            f"--rev={r0 + 1}",
            "-w",
            "json",
        ],
        log=log,
        stdout_pipe=True,
        env=child_env(ETCDCTL_API="3"),
    )
    seen = 0
    try:
        assert proc.popen.stdout is not None
        deadline = time.monotonic() + 120
        while seen < n and time.monotonic() < deadline:
            line = proc.popen.stdout.readline()
            if not line:
                raise RuntimeError(f"etcdctl ended after {seen} events; see {log}")
            text = line.strip()
            if text.startswith(b"{"):
                seen += len(json.loads(text).get("Events") or [])
        elapsed = time.perf_counter() - t0
    finally:
        proc.stop(5)
    if seen < n:
        raise TimeoutError(f"etcdctl saw {seen} of {n} events")
    return elapsed


def run(ctx: Ctx) -> ScenarioResult:
    from discovery_mdc.etcd import EtcdServer

    result = ScenarioResult(NAME, TITLE)
    work = ctx.scenario_dir(NAME)
    keys = ctx.n(2000, 100)
    rounds = ctx.n(4, 2)
    models = [write_bench_model(work / f"watch-{i}", seed=6000 + i) for i in range(MODELS)]
    cache = work / "mdc-cache"
    ours: list[float] = []
    informer: list[float] = []
    raw: list[float] = []
    ctl_rates: list[float] = []
    ctl = etcdctl_binary()
    with EtcdServer(log_path=work / "etcd.log") as etcd:
        url = etcd.client_url
        r0, r_end, n = asyncio.run(_write_stream(url, models, keys, rounds, cache))
        for i in range(ctx.n(3, 1)):
            profile = ctx.profile_session(NAME) if i == 0 else None
            extra = ["--events", str(n), "--cache-dir", str(cache)]
            ours.append(_replay(work, "watch-ours", i, url, r0, r_end, n, extra, profile))
            informer.append(_replay(work, "watch-informer", i, url, r0, r_end, n, [], None))
            r = run_child(
                f"watch-raw-{i}",
                child_args(
                    "bench._child", "watch-raw", "--etcd", url, "--rev", str(r0), "--events", str(n)
                ),
                log=work / f"watch-raw-{i}.log",
                timeout=180,
            )
            raw.append(n / r["elapsed"])
            if ctl is not None:
                ctl_rates.append(n / _etcdctl(ctl, url, r0, n, work / f"etcdctl-{i}.log"))
    o = Stats.of(ours, "events/s")
    bare = Stats.of(raw, "events/s")
    ratio = o.median / bare.median
    result.rows.append(
        Row(
            NAME,
            f"events/s, {n} events ({keys} keys x {rounds} puts + delete)",
            o,
            bare,
            "raw gateway watch reader (aiohttp)",
            "rate",
            target="ratio ≥ 0.8",
            met=ratio >= 0.8,
        )
    )
    result.rows.append(
        Row(
            NAME,
            "events/s, the informer alone (no registry)",
            Stats.of(informer, "events/s"),
            bare,
            "raw gateway watch reader (aiohttp)",
            "rate",
        )
    )
    if ctl_rates:
        result.rows.append(
            Row(
                NAME,
                "events/s vs etcdctl",
                o,
                Stats.of(ctl_rates, "events/s"),
                "etcdctl watch --prefix -w json (gRPC)",
                "rate",
                note="etcdctl timed from process start",
            )
        )
    result.notes.append(
        f"stream of {n} events between revisions {r0 + 1} and {r_end}, replayed from etcd "
        f"history by each reader in turn; {len(ours)} round(s)"
    )
    return result
