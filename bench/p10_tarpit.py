"""P10: tarpits. Cards whose metadata host accepts connections and never answers; how long
until a healthy model published after them is listed?

Etcd holds 200 cards (5 files each) whose URLs all point at a host that accepts TCP
connections and never sends a byte (a TCP proxy in tarpit mode: as a worker whose process is
frozen while the kernel still completes handshakes). A frontend with default settings lists
them and starts fetching. Then a publisher registers one healthy model (its own status
server). The metric is the time from that registration to ``/v1/models`` listing it, polled
every 20 ms. The healthy model shares some files with the tarpit cards (``config.json`` and
``generation_config.json`` are the same bytes), as fine-tunes of one base model do. A second
row spreads the same 200 cards over 20 such hosts.
"""

from __future__ import annotations

import asyncio
import time
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
from testkit import free_port, wait_until_sync

NAME = "P10"
TITLE = "Tarpits: a healthy model published behind 200 cards on hosts that never answer"
CARDS = 200
GOAL_S = 5.0
TIMEOUT = 120.0


def _tarpit_cards(model: Path, urls: list[str]) -> list[tuple[str, bytes]]:
    """``CARDS`` cards of ``model`` under other names, their files on the hosts ``urls``
    (round robin), as (key, value) for etcd."""
    from discovery_mdc.card import CheckedFile, from_dir, slugify
    from testkit import envelope_kv

    base = from_dir(model, include_extra_files=True)
    out = []
    for i in range(CARDS):
        name = f"bench/tarpit-{i}"
        prefix = f"{urls[i % len(urls)]}/v1/metadata/{slugify(name)}/"

        def on_tarpit(_: str, f: CheckedFile, prefix: str = prefix) -> str:
            return prefix + f.basename

        card = base.replace(display_name=name, slug=slugify(name)).with_paths(on_tarpit)
        out.append(envelope_kv(card, 0x7A00000 + i))
    return out


def _put_all(etcd_url: str, kvs: list[tuple[str, bytes]]) -> None:
    from discovery_mdc.etcd import EtcdClient

    async def put() -> None:
        async with EtcdClient([etcd_url]) as client:
            for key, value in kvs:
                await client.put(key, value)

    asyncio.run(put())


def _models(base: str) -> set[str]:
    return {m["id"] for m in http_json(f"{base}/v1/models")["data"]}


def _round(work: Path, r: int, hosts: int, tarpit_model: Path, good_model: Path) -> float:
    """Seconds from the healthy model's registration to its listing."""
    from discovery_mdc.etcd import EtcdServer
    from testkit import TcpProxy

    tag = f"{hosts}-{r}"
    with EtcdServer(log_path=work / f"etcd-{tag}.log") as etcd:
        proxies = [TcpProxy(HOST, free_port()).start() for _ in range(hosts)]
        pub = start_publisher(
            etcd.client_url, work, f"pub-{tag}", index=0, instances=1, models=[good_model]
        )
        try:
            for proxy in proxies:
                proxy.tarpit()
            _put_all(etcd.client_url, _tarpit_cards(tarpit_model, [p.url for p in proxies]))
            (good,) = pub.recv(120)["models"]
            fe, port = start_our_frontend(etcd.client_url, work, f"frontend-{tag}")
            base = f"http://{HOST}:{port}"
            wait_until_sync(
                lambda: sum(p.tarpitted for p in proxies) > 0,
                timeout=TIMEOUT,
                message="the frontend fetching from the tarpits",
            )
            registered = float(pub.call({"op": "go"}, 120)["t_done"])
            wait_until_sync(
                lambda: good in _models(base),
                timeout=TIMEOUT,
                interval=0.02,
                message=f"{good!r} listed behind the tarpit cards",
            )
            seconds = time.monotonic() - registered
            fe.stop()
            return seconds
        finally:
            pub.stop()
            for proxy in proxies:
                proxy.close()


def run(ctx: Ctx) -> ScenarioResult:
    result = ScenarioResult(NAME, TITLE)
    work = ctx.scenario_dir(NAME)
    tarpit_model = write_bench_model(work / "tarpit-model", seed=10_001)
    good_model = write_bench_model(work / "good-model", seed=10_002)
    rounds = ctx.n(3, 1)
    for hosts, what in ((1, "one host"), (20, "20 hosts")):
        samples = [_round(work, r, hosts, tarpit_model, good_model) for r in range(rounds)]
        got = Stats.of(samples, "s")
        result.rows.append(
            Row(
                NAME,
                f"healthy model listed behind {CARDS} tarpit cards ({what})",
                got,
                target=f"≤ {GOAL_S:.0f} s",
                met=got.max <= GOAL_S,
            )
        )
    result.notes.append(
        f"{rounds} round(s) per row, each with a fresh etcd, tarpit host(s) and frontend "
        f"(default settings: connect and first-byte timeouts 3 s, at most 2 pipelines per "
        f"source fetching, 64 fetching in all)"
    )
    return result
