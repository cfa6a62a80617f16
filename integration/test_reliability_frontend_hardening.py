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
import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import ModelDeploymentCard, decode_envelope, from_dir
from discovery_mdc.etcd import EtcdClient, EtcdServer
from testkit import (
    CliProcess,
    FrontendProcess,
    MetaServer,
    Process,
    Spawn,
    TcpProxy,
    card_keys,
    converged,
    envelope_kv,
    model_dirs,
    start_frontend,
    wait_until,
)

DEADLINE = 60.0


async def _total(fe: FrontendProcess, name: str) -> float:
    """The sum of every series of counter ``name``, whatever its labels."""
    samples = await fe.metrics()
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


async def _healthy(fe: FrontendProcess) -> bool:
    status, _ = await fe.get_json("/health")
    return bool(status == 200)


# --------------------------------------------------------------------------- lost history


async def test_etcd_wiped_and_restarted_frontend_drops_the_dead_and_workers_reregister(
    etcd_server: EtcdServer,
    client: EtcdClient,
    spawn_worker: Spawn,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    dead_dir, live_dir = model_dirs(tmp_path, 2)
    fe = await start_frontend(etcd_server.client_url, tmp_path, procs)
    dead, live = spawn_worker(dead_dir, ttl=10, name="dead"), spawn_worker(live_dir, ttl=10)
    first = {(await w.wait_registered()).key for w in (dead, live)}
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
    await asyncio.to_thread(dead.popen.wait)
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


# --------------------------------------------------------------------------- long outage


OUTAGE_S = 35.0
RECOVERY_DEADLINE_S = 8.0  # the goal is 3 s (docs/reliability.md); main needed ~17 s


@pytest.mark.slow
async def test_after_a_long_etcd_outage_frontend_and_worker_recover_within_seconds(
    etcd_server: EtcdServer,
    client: EtcdClient,
    spawn_worker: Spawn,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    (model,) = model_dirs(tmp_path, 1)
    fe = await start_frontend(etcd_server.client_url, tmp_path, procs)  # default settings
    worker = spawn_worker(model, ttl=10)
    first = (await worker.wait_registered()).key
    assert await converged(fe, client) == {first}
    await asyncio.to_thread(etcd_server.stop)
    down = time.monotonic()
    # The outage itself: the frontend must say it is not ready the whole time.
    while time.monotonic() - down < OUTAGE_S:
        status, _ = await fe.get_json("/health")
        assert status == 503, fe.describe()
        await asyncio.sleep(0.5)
    await worker.wait_log(r"lease [0-9a-f]+ lost")
    await asyncio.to_thread(etcd_server.start)  # returns once etcd answers
    back = time.monotonic()

    async def seconds_until(predicate: Callable[[], Any], proc: CliProcess) -> float:
        """Fails unless ``predicate`` holds within the recovery deadline; how long it took."""
        await wait_until(predicate, timeout=RECOVERY_DEADLINE_S, interval=0.05,
                         message=proc.describe)  # fmt: skip
        return time.monotonic() - back

    healthy, reregistered = await asyncio.gather(
        seconds_until(lambda: _healthy(fe), fe),
        seconds_until(lambda: "re-registered 1 key" in worker.log(), worker),
    )
    (key,) = await card_keys(client)
    assert await converged(fe, client, DEADLINE) == {key} != {first}
    exact = time.monotonic() - back
    print(
        f"after {OUTAGE_S:.0f}s without etcd: frontend healthy {healthy:.2f}s, worker "
        f"re-registered {reregistered:.2f}s, frontend exact {exact:.2f}s after etcd answered"
    )
    # No retry loop waited longer than the 2 s cap between attempts (main: up to 30 s).
    delays = [float(d) for d in re.findall(r"resuming from revision \d+ in ([\d.]+)s", fe.log())]
    assert delays and max(delays) <= 2.0, delays


# --------------------------------------------------------------------------- model ids


async def test_every_listed_model_id_is_answered_and_unservable_ones_are_rejected(
    etcd_server: EtcdServer,
    client: EtcdClient,
    spawn_worker: Spawn,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    (model,) = model_dirs(tmp_path, 1)
    fe = await start_frontend(etcd_server.client_url, tmp_path, procs)
    worker = spawn_worker(model, ttl=10)
    key = (await worker.wait_registered()).key
    assert await converged(fe, client) == {key}
    served = decode_envelope((await client.get(key)).value).card  # type: ignore[union-attr]
    # Cards a worker (or a peer) could publish: same files, other model ids.
    unservable = ["", "two\nlines", "tab\there", "org/../up", "."]
    odd_but_fine = "org/odd name?#%+;"
    names = [*unservable, odd_but_fine]
    for i, name in enumerate(names):
        await client.put(*envelope_kv(served.replace(display_name=name), 0x5000 + i))

    async def settled() -> bool:
        listed = await fe.model_ids()
        rejected = await _total(fe, "discovery_mdc_rejected_instances_total")
        return len(listed & set(names)) + rejected == len(names)

    await wait_until(settled, timeout=DEADLINE, message=fe.describe)
    listed = await fe.model_ids()
    for name in listed:
        for safe in ("", "/"):
            status, body = await fe.get("/v1/models/" + quote(name, safe=safe))
            assert status == 200, (name, safe, status, body, fe.describe())
            assert json.loads(body)["id"] == name
    assert listed == {"model-0", odd_but_fine}
    assert await _total(fe, "discovery_mdc_rejected_instances_total") == len(unservable)
    log = fe.log()
    assert "generate/5000 of model '': the model id is empty" in log
    assert "of model 'two\\nlines': the model id contains U+000A, a control character" in log
    assert "of model 'org/../up': the model id has a '.' or '..' path segment" in log


# --------------------------------------------------------------------------- tarpits


TARPIT_CARDS = 40  # main listed a healthy model published after these only after ~48 s
GOOD_MODEL_DEADLINE_S = 15.0  # the goal is a few seconds (benchmark P10: 200 cards)


@pytest.mark.slow
async def test_cards_on_a_host_that_never_answers_do_not_starve_a_healthy_model(
    etcd_server: EtcdServer,
    client: EtcdClient,
    spawn_worker: Spawn,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    fe = await start_frontend(etcd_server.client_url, tmp_path, procs)  # default settings
    async with MetaServer() as files:
        with TcpProxy("127.0.0.1", files.port) as host:
            host.tarpit()  # accepts connections, never answers
            for i, model in enumerate(model_dirs(tmp_path / "tarpit", TARPIT_CARDS)):
                card = _served_by(from_dir(model).replace(display_name=f"tarpit-{i}"), files, host)
                await client.put(*envelope_kv(card, 0x7000 + i))
            await wait_until(lambda: host.tarpitted >= 2, timeout=DEADLINE, message=fe.describe)

            good = spawn_worker(write_sample_model(tmp_path / "good-model", seed=4242))
            await good.wait_registered()
            published = time.monotonic()
            # Listed within its deadline although the tarpit cards hold connections.
            await wait_until(lambda: fe.lists("good-model"), timeout=GOOD_MODEL_DEADLINE_S,
                             message=fe.describe)  # fmt: skip
            listed = time.monotonic() - published
            print(f"healthy model listed {listed:.2f}s after it registered, behind "
                  f"{TARPIT_CARDS} tarpit cards ({host.tarpitted} connections held)")  # fmt: skip
            assert await fe.model_ids() == {"good-model"}

            # The host comes back: the failed models are retried (with backoff) and listed.
            host.restore()
            tarpit_ids = {f"tarpit-{i}" for i in range(TARPIT_CARDS)}
            await wait_until(
                lambda: fe.lists(*tarpit_ids), timeout=180.0, interval=0.5, message=fe.describe
            )
    assert "no response within 3s" in fe.log()


def _served_by(card: ModelDeploymentCard, files: MetaServer, host: TcpProxy) -> ModelDeploymentCard:
    """``card`` with its files on ``files``, reached through ``host``."""
    for _, f in card.files():
        files.files[f"/v1/metadata/{card.slug}/{f.basename}"] = Path(f.path).read_bytes()
    return card.with_paths(lambda _, f: f"{host.url}/v1/metadata/{card.slug}/{f.basename}")
