"""A real worker process through etcd trouble: a restart shorter than the TTL, an outside
revoke of its lease, an outage longer than the TTL, and losing the cluster member it talks to.

Every test gets its own etcd (or cluster), since each one breaks it on purpose.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import decode_envelope
from discovery_mdc.errors import EtcdError
from discovery_mdc.etcd import EtcdClient, EtcdCluster, EtcdServer
from testkit import Registered, Spawn, WorkerProcess, child_env, wait_until

# Generous bounds for things that are not behavioural (process start-up, etcd start-up).
START = 60.0
PREFIX = "v1/mdc/dynamo/backend/generate/"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_sample_model(tmp_path / "models" / "fault-model")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def health(http: aiohttp.ClientSession, worker: WorkerProcess) -> int:
    async with http.get(f"http://127.0.0.1:{worker.status_port()}/health") as resp:
        return resp.status


async def card_keys(client: EtcdClient) -> list[str]:
    return [kv.key for kv in (await client.range(PREFIX, prefix=True)).kvs]


async def assert_published_under(client: EtcdClient, key: str, lease: int) -> None:
    """``key`` holds this worker's card under ``lease``, and the lease lists it."""
    assert key == f"{PREFIX}{lease:x}"
    kv = await client.get(key)
    assert kv is not None and kv.lease == lease
    assert decode_envelope(kv.value).instance_id == lease
    assert key in (await client.lease_time_to_live(lease)).keys


async def test_etcd_restart_shorter_than_the_ttl_keeps_the_key_and_the_session(
    etcd_server: EtcdServer, spawn: Spawn, model_dir: Path, http: aiohttp.ClientSession
) -> None:
    ttl = 10
    worker = spawn(
        "--etcd", etcd_server.client_url, "--model-path", str(model_dir), "--lease-ttl", str(ttl),
        env=child_env(DYN_SYSTEM_PORT="0", DYN_SYSTEM_HOST="127.0.0.1"),
    )  # fmt: skip
    reg = await worker.wait_registered(timeout=START)
    assert await health(http, worker) == 200

    await asyncio.to_thread(etcd_server.restart)  # same ports, same data dir

    async with EtcdClient([etcd_server.client_url]) as client:
        # For longer than a keepalive period after the restart, the card stays put under the
        # same lease and the worker stays ready; the keepalive went on through the restart.
        loop = asyncio.get_running_loop()
        until = loop.time() + ttl / 3 + 1
        checks = 0
        while loop.time() < until or checks < 5:
            assert await card_keys(client) == [reg.key]
            assert await health(http, worker) == 200
            checks += 1
            await asyncio.sleep(0.1)
        await assert_published_under(client, reg.key, reg.lease)
        assert (await client.lease_time_to_live(reg.lease)).ttl > 0
    assert "lost" not in worker.log(), worker.describe()
    assert worker.popen.poll() is None


async def test_an_outside_revoke_makes_the_worker_republish_under_a_new_lease(
    etcd_server: EtcdServer, spawn: Spawn, model_dir: Path, http: aiohttp.ClientSession
) -> None:
    ttl = 4
    worker = spawn(
        "--etcd", etcd_server.client_url, "--model-path", str(model_dir), "--lease-ttl", str(ttl),
        env=child_env(DYN_SYSTEM_PORT="0", DYN_SYSTEM_HOST="127.0.0.1"),
    )  # fmt: skip
    reg = await worker.wait_registered(timeout=START)
    async with EtcdClient([etcd_server.client_url]) as client:
        assert await client.lease_revoke(reg.lease) is True
        assert await client.get(reg.key) is None

        async def new_key() -> str | None:
            keys = await card_keys(client)
            return keys[0] if keys and keys != [reg.key] else None

        key = await wait_until(new_key, timeout=2 * ttl,
                               message="no new key within 2 x TTL of the revoke")  # fmt: skip
        assert key is not None
        lease = int(key.rsplit("/", 1)[1], 16)
        assert lease != reg.lease
        await assert_published_under(client, key, lease)
        assert await card_keys(client) == [key]
    assert worker.popen.poll() is None  # the same process, no restart
    await worker.wait_log(f"replaced by {lease:x}", timeout=START)
    assert await health(http, worker) == 200


async def test_an_outage_longer_than_the_ttl_ends_with_the_worker_republishing(
    etcd_server: EtcdServer, spawn: Spawn, model_dir: Path, http: aiohttp.ClientSession
) -> None:
    ttl = 3
    worker = spawn(
        "--etcd", etcd_server.client_url, "--model-path", str(model_dir), "--lease-ttl", str(ttl),
        env=child_env(DYN_SYSTEM_PORT="0", DYN_SYSTEM_HOST="127.0.0.1"),
    )  # fmt: skip
    reg = await worker.wait_registered(timeout=START)

    await asyncio.to_thread(etcd_server.stop)
    # Down for longer than the TTL: the worker gives the lease up and says it is not ready.
    await worker.wait_log(f"etcd lease {reg.lease:x} lost", timeout=START)
    assert await health(http, worker) == 503
    shutil.rmtree(etcd_server.data_dir)
    await asyncio.to_thread(etcd_server.start)  # empty, same ports

    async with EtcdClient([etcd_server.client_url]) as client:

        async def republished() -> str | None:
            keys = await card_keys(client)
            return keys[0] if keys else None

        # The wait includes the worker's retry backoff, which grew during the outage.
        key = await wait_until(republished, timeout=START, message=worker.describe)
        assert key is not None
        assert key != reg.key
        await assert_published_under(client, key, int(key.rsplit("/", 1)[1], 16))

    async def ready() -> bool:
        return await health(http, worker) == 200

    await wait_until(ready, timeout=START, message=worker.describe)
    assert worker.popen.poll() is None


async def test_stopping_the_member_the_worker_talks_to_never_drops_the_key(
    etcd_cluster: EtcdCluster, spawn: Spawn, model_dir: Path
) -> None:
    ttl = 4
    worker = spawn(
        "--etcd", ",".join(etcd_cluster.client_urls), "--model-path", str(model_dir),
        "--lease-ttl", str(ttl),
    )  # fmt: skip
    reg: Registered = await worker.wait_registered(timeout=START)
    # Observe through the other members only.
    async with EtcdClient(etcd_cluster.client_urls[1:]) as client:
        assert await card_keys(client) == [reg.key]
        stopping = asyncio.create_task(asyncio.to_thread(etcd_cluster.stop_member, 0))
        loop = asyncio.get_running_loop()
        seen, errors = 0, 0
        until: float | None = None
        # Watch for longer than two TTLs after member 0 is gone: had the keepalive stopped,
        # the key would have expired (or been replaced under a new lease) by then.
        while until is None or loop.time() < until or seen < 50:
            if until is None and stopping.done():
                await stopping
                until = loop.time() + 2 * ttl + 1
            try:
                keys = await card_keys(client)
            except EtcdError:
                errors += 1  # an election in progress: no answer is not an absence
            else:
                assert keys == [reg.key], f"key gone or replaced after {seen} reads: {keys}"
                seen += 1
            await asyncio.sleep(0.05)
        await assert_published_under(client, reg.key, reg.lease)
    assert "lost" not in worker.log(), worker.describe()
    # The keepalive moved to another endpoint.
    await worker.wait_log("now using endpoint", timeout=START)
    assert seen >= 50, (seen, errors)
