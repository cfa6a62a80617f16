"""Hardening (issue 18): keys deleted behind a live lease, model dirs that would publish cards
no frontend accepts, symlinks out of the model, slowloris on the status server, signals while
hashing, and unreadable model files. Real etcd, real worker and frontend processes."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from discovery_mdc._sample import write_sample_model
from discovery_mdc.etcd import EtcdClient, EtcdServer, find_etcd_binary
from integration._faults import FrontendProcess, parse_metrics
from integration._util import wait_until
from integration._worker_proc import WorkerProcess, WorkerSpawner, worker_env

START = 60.0


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[WorkerSpawner]:
    spawner = WorkerSpawner(tmp_path)
    yield spawner
    spawner.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def status_env() -> dict[str, str]:
    return worker_env(DYN_SYSTEM_PORT="0", DYN_SYSTEM_HOST="127.0.0.1")


async def worker_metrics(http: aiohttp.ClientSession, worker: WorkerProcess) -> dict[str, float]:
    async with http.get(f"http://127.0.0.1:{worker.status_port()}/metrics") as resp:
        return parse_metrics(await resp.text())


def etcdctl(endpoint: str, *args: str) -> str:
    """Run the etcdctl shipped next to the etcd binary (what an operator would type)."""
    binary = Path(find_etcd_binary()).with_name("etcdctl")
    done = subprocess.run(
        [str(binary), "--endpoints", endpoint, *args],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return done.stdout


# --------------------------------------------------------------------------- item 2


async def test_keys_deleted_by_an_operator_while_the_lease_lives_are_created_again(
    etcd_server: EtcdServer, spawn: WorkerSpawner, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    model = write_sample_model(tmp_path / "models" / "deleted-model")
    ttl = 3  # keys are checked every 3 keepalives, i.e. about once per TTL
    worker = spawn(
        "--etcd", etcd_server.client_url, "--model-path", str(model), "--lease-ttl", str(ttl),
        "--instance-transport", "tcp://127.0.0.1:9/generate",
        env=status_env(),
    )  # fmt: skip
    reg = await worker.wait_registered(timeout=START)
    frontend = FrontendProcess(etcd_server.client_url, tmp=tmp_path / "fe")
    try:
        await frontend.wait_listening()
        await wait_until(lambda: frontend.model_ids(), timeout=START, message=frontend.describe)
        async with EtcdClient([etcd_server.client_url]) as client:
            before = (await client.lease_time_to_live(reg.lease)).keys
            assert reg.key in before and any(k.startswith("v1/instances/") for k in before)

            deleted = etcdctl(etcd_server.client_url, "del", "--prefix", "v1/")
            assert deleted.strip() == "2", deleted
            assert (await client.lease_time_to_live(reg.lease)).keys == ()

            async def both_back() -> bool:
                info = await client.lease_time_to_live(reg.lease)
                return sorted(info.keys) == sorted(before)

            await wait_until(both_back, timeout=6 * ttl, message=worker.describe)
            kv = await client.get(reg.key)
            assert kv is not None and kv.lease == reg.lease
        # The same lease and process: no re-registration, and the frontend lists it again.
        assert "lost" not in worker.log() and worker.alive
        await wait_until(lambda: frontend.model_ids(), timeout=START, message=frontend.describe)
        metrics = await worker_metrics(http, worker)
        assert metrics["discovery_mdc_etcd_keys_recreated_total"] == 2
        assert worker.log().count("was missing while lease") == 2
    finally:
        frontend.close()
