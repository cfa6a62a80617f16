"""ETCD_ENDPOINTS, ETCD_LEASE_TTL and ETCD_AUTH_* are honoured (real etcd, real processes)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import pytest

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import ModelEnvelope, encode_envelope, from_dir
from discovery_mdc.cli import build_parser
from discovery_mdc.cli._common import apply_env_options, etcd_client
from discovery_mdc.etcd import EtcdClient, EtcdServer, KeyValue
from testkit import Spawn, child_env, enable_auth, free_port, run_cli, wait_until


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=child_env(**env))


@pytest.fixture(scope="module")
def card_key(shared_etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A card put directly into etcd (no lease), for `ls` to find."""
    model = write_sample_model(tmp_path_factory.mktemp("m") / "env-model")
    env = ModelEnvelope(
        namespace="dynamo", component="backend", endpoint="generate", instance_id=0xABC,
        card=from_dir(model),
    )  # fmt: skip

    async def put() -> None:
        async with EtcdClient([shared_etcd.client_url]) as client:
            await client.put(env.key, encode_envelope(env))

    asyncio.run(put())
    return env.key


def test_etcd_endpoints_points_ls_at_the_cluster(shared_etcd: EtcdServer, card_key: str) -> None:
    proc = _cli({"ETCD_ENDPOINTS": shared_etcd.client_url}, "ls")
    assert proc.returncode == 0, proc.stderr
    assert card_key in proc.stdout and "env-model" in proc.stdout


def test_etcd_endpoints_fails_over_to_the_next_endpoint(
    shared_etcd: EtcdServer, card_key: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proc = _cli({"ETCD_ENDPOINTS": f"{dead},{shared_etcd.client_url}"}, "ls")
    assert proc.returncode == 0, proc.stderr
    assert card_key in proc.stdout


def test_etcd_endpoints_accepts_bare_host_port(shared_etcd: EtcdServer, card_key: str) -> None:
    proc = _cli({"ETCD_ENDPOINTS": f"127.0.0.1:{shared_etcd.client_port}"}, "ls")
    assert proc.returncode == 0, proc.stderr
    assert card_key in proc.stdout


def test_etcd_flag_beats_etcd_endpoints(shared_etcd: EtcdServer, card_key: str) -> None:
    proc = _cli({"ETCD_ENDPOINTS": "ftp://nowhere"}, "ls", "--etcd", shared_etcd.client_url)
    assert proc.returncode == 0, proc.stderr
    assert card_key in proc.stdout


def test_bad_etcd_endpoints_is_a_usage_error_naming_the_variable() -> None:
    proc = _cli({"ETCD_ENDPOINTS": "ftp://nowhere:1"}, "ls")
    assert proc.returncode == 2
    assert proc.stderr.startswith("discovery-mdc: error: ETCD_ENDPOINTS='ftp://nowhere:1': ")
    assert len(proc.stderr.splitlines()) == 1


def test_unreachable_etcd_endpoints_exits_1_naming_them() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proc = _cli({"ETCD_ENDPOINTS": dead}, "ls")
    assert proc.returncode == 1
    assert dead in proc.stderr and len(proc.stderr.splitlines()) == 1


async def test_etcd_lease_ttl_sets_the_workers_granted_ttl(
    shared_etcd: EtcdServer, spawn: Spawn, tmp_path: Path
) -> None:
    model = write_sample_model(tmp_path / "ttl-model")
    env = child_env(ETCD_ENDPOINTS=shared_etcd.client_url, ETCD_LEASE_TTL="7")
    worker = spawn("--model-path", str(model), "--namespace", "ttltest", env=env)
    async with EtcdClient([shared_etcd.client_url]) as client:

        async def published() -> tuple[KeyValue, ...]:
            return (await client.range_prefix_all("v1/mdc/ttltest/")).kvs

        (kv,) = await wait_until(published, timeout=30, message=worker.describe, proc=worker)
        info = await client.lease_time_to_live(kv.lease)
        assert info.granted_ttl == 7
        assert kv.key.endswith(f"/{kv.lease:x}")
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit(timeout=30) == 0, worker.describe()
        # Revoked on a clean stop: the key is gone at once.
        assert not (await client.range_prefix_all("v1/mdc/ttltest/")).kvs


def test_bad_etcd_lease_ttl_is_a_usage_error(tmp_path: Path) -> None:
    model = write_sample_model(tmp_path / "m")
    proc = _cli({"ETCD_LEASE_TTL": "ten"}, "worker", "--model-path", str(model))
    assert proc.returncode == 2
    assert proc.stderr.startswith("discovery-mdc: error: ETCD_LEASE_TTL='ten': ")
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- auth and TLS


@pytest.fixture
def auth_etcd(etcd_server: EtcdServer) -> EtcdServer:
    """An etcd with authentication on: user root / password s3cret."""
    enable_auth(etcd_server.client_url, root_password="s3cret")
    return etcd_server


def test_etcd_auth_username_and_password_authenticate(auth_etcd: EtcdServer) -> None:
    base = {"ETCD_ENDPOINTS": auth_etcd.client_url}
    anonymous = _cli(base, "ls")
    assert anonymous.returncode == 1, anonymous.stdout
    assert len(anonymous.stderr.splitlines()) == 1
    wrong = _cli({**base, "ETCD_AUTH_USERNAME": "root", "ETCD_AUTH_PASSWORD": "nope"}, "ls")
    assert wrong.returncode == 1
    ok = _cli({**base, "ETCD_AUTH_USERNAME": "root", "ETCD_AUTH_PASSWORD": "s3cret"}, "ls")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("KEY")


def test_etcd_auth_tls_variables_are_read_into_the_client(tmp_path: Path) -> None:
    files = {}
    for name in ("ETCD_AUTH_CA", "ETCD_AUTH_CLIENT_CERT", "ETCD_AUTH_CLIENT_KEY"):
        files[name] = str(tmp_path / f"{name.lower()}.pem")
        Path(files[name]).write_text("placeholder")
    env = {"ETCD_ENDPOINTS": "etcd-a:2379,etcd-b:2379", "ETCD_AUTH_USERNAME": "u",
           "ETCD_AUTH_PASSWORD": "p", **files}  # fmt: skip
    args = build_parser().parse_args(["ls"])
    apply_env_options(args, env)
    client = etcd_client(args, env)
    # A CA means TLS: bare host:port endpoints become https.
    assert client.endpoints == ("https://etcd-a:2379", "https://etcd-b:2379")
    assert client._ca_file == files["ETCD_AUTH_CA"]
    assert client._cert_file == files["ETCD_AUTH_CLIENT_CERT"]
    assert client._key_file == files["ETCD_AUTH_CLIENT_KEY"]
    assert (client._username, client._password) == ("u", "p")


@pytest.mark.parametrize("var", ["ETCD_AUTH_CA", "ETCD_AUTH_CLIENT_CERT", "ETCD_AUTH_CLIENT_KEY"])
def test_unreadable_tls_file_is_a_usage_error_naming_it(var: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    proc = _cli({"ETCD_ENDPOINTS": "https://127.0.0.1:1", var: missing}, "ls")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"discovery-mdc: error: {var}={missing!r}: no such readable file"
