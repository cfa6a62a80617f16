"""DYN_SYSTEM_PORT, DYN_SYSTEM_HOST and DYN_SELF_HOST_METADATA drive a real worker process
(one etcd serves the module; each test publishes in its own namespace)."""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import ModelEnvelope, decode_envelope
from discovery_mdc.etcd import EtcdClient, EtcdServer, KeyValue
from testkit import Spawn, child_env, free_port, run_cli, wait_until


@asynccontextmanager
async def _worker(
    spawn: Spawn, etcd: EtcdServer, model: Path, namespace: str, env: dict[str, str]
) -> AsyncIterator[ModelEnvelope]:
    """Run ``discovery-mdc worker`` until its card is in etcd; yield it; SIGTERM; expect 0."""
    worker = spawn(
        "--model-path", str(model), "--namespace", namespace,
        env=child_env(ETCD_ENDPOINTS=etcd.client_url, **env),
    )  # fmt: skip
    async with EtcdClient([etcd.client_url]) as client:

        async def published() -> tuple[KeyValue, ...]:
            return (await client.range_prefix_all(f"v1/mdc/{namespace}/")).kvs

        kvs = await wait_until(published, timeout=30, message=worker.describe, proc=worker)
        yield decode_envelope(kvs[0].value)
    worker.signal(signal.SIGTERM)
    assert await worker.wait_exit(timeout=30) == 0, worker.describe()


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read()


async def test_dyn_system_port_and_host_start_the_status_server_and_self_host(
    shared_etcd: EtcdServer, spawn: Spawn, tmp_path: Path
) -> None:
    model = write_sample_model(tmp_path / "port-model")
    port = free_port()
    env = {"DYN_SYSTEM_PORT": str(port), "DYN_SYSTEM_HOST": "127.0.0.1"}
    async with _worker(spawn, shared_etcd, model, "porttest", env) as envelope:
        base = f"http://127.0.0.1:{port}"
        assert (await asyncio.to_thread(_get, f"{base}/health"))[0] == 200
        files = list(envelope.card.files())
        assert files
        for _, f in files:
            assert f.path.startswith(f"{base}/v1/metadata/port-model/"), f.path
            status, body = await asyncio.to_thread(_get, f.path)
            assert status == 200 and len(body) == f.size


async def test_dyn_system_port_0_picks_a_free_port(
    shared_etcd: EtcdServer, spawn: Spawn, tmp_path: Path
) -> None:
    model = write_sample_model(tmp_path / "zero-model")
    env = {"DYN_SYSTEM_PORT": "0", "DYN_SYSTEM_HOST": "127.0.0.1"}
    async with _worker(spawn, shared_etcd, model, "zerotest", env) as envelope:
        _, first = next(iter(envelope.card.files()))
        assert first.path.startswith("http://127.0.0.1:")
        port = int(first.path.split(":")[2].split("/")[0])
        assert port != 0
        assert (await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/health"))[0] == 200


@pytest.mark.parametrize("value", ["off", "0", "FALSE", "no", ""])
async def test_dyn_self_host_metadata_off_publishes_local_paths(
    shared_etcd: EtcdServer, spawn: Spawn, tmp_path: Path, value: str
) -> None:
    model = write_sample_model(tmp_path / "local-model")
    port = free_port()
    env = {"DYN_SYSTEM_PORT": str(port), "DYN_SYSTEM_HOST": "127.0.0.1",
           "DYN_SELF_HOST_METADATA": value}  # fmt: skip
    async with _worker(spawn, shared_etcd, model, f"local{abs(hash(value))}", env) as envelope:
        # The status server still runs (health), but the card keeps local paths.
        assert (await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/health"))[0] == 200
        for _, f in envelope.card.files():
            assert Path(f.path).is_absolute() and Path(f.path).parent == model.resolve(), f.path


async def test_without_dyn_system_port_there_is_no_server_and_paths_stay_local(
    shared_etcd: EtcdServer, spawn: Spawn, tmp_path: Path
) -> None:
    model = write_sample_model(tmp_path / "noserver-model")
    async with _worker(
        spawn, shared_etcd, model, "noserver", {"DYN_SYSTEM_HOST": "127.0.0.1"}
    ) as envelope:
        for _, f in envelope.card.files():
            assert not f.path.startswith("http"), f.path


@pytest.mark.parametrize(
    ("var", "value"),
    [("DYN_SYSTEM_PORT", "eighty"), ("DYN_SYSTEM_PORT", "70000")],
)
def test_bad_dyn_system_port_is_a_usage_error(tmp_path: Path, var: str, value: str) -> None:
    model = write_sample_model(tmp_path / "m")
    proc = run_cli("worker", "--model-path", str(model), env=child_env(**{var: value}))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"discovery-mdc: error: {var}={value!r}: ")
    assert len(proc.stderr.splitlines()) == 1
