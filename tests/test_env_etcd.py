"""ETCD_ENDPOINTS, ETCD_LEASE_TTL and ETCD_AUTH_* are honoured (real etcd, real processes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import ModelEnvelope, encode_envelope, from_dir
from discovery_mdc.cli import build_parser
from discovery_mdc.cli._common import apply_env_options, etcd_client
from discovery_mdc.etcd import EtcdClient, EtcdServer
from discovery_mdc.etcd._server import free_port

_CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "DYN_"))}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "discovery_mdc", *args],
        capture_output=True, text=True, timeout=60, check=False, env={**_CLEAN_ENV, **env},
    )  # fmt: skip


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="module")
def card_key(etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A card put directly into etcd (no lease), for `ls` to find."""
    model = write_sample_model(tmp_path_factory.mktemp("m") / "env-model")
    env = ModelEnvelope(
        namespace="dynamo", component="backend", endpoint="generate", instance_id=0xABC,
        card=from_dir(model),
    )  # fmt: skip

    async def put() -> None:
        async with EtcdClient([etcd.client_url]) as client:
            await client.put(env.key, encode_envelope(env))

    asyncio.run(put())
    return env.key


def test_etcd_endpoints_points_ls_at_the_cluster(etcd: EtcdServer, card_key: str) -> None:
    proc = _cli({"ETCD_ENDPOINTS": etcd.client_url}, "ls")
    assert proc.returncode == 0, proc.stderr
    assert card_key in proc.stdout and "env-model" in proc.stdout


def test_etcd_endpoints_fails_over_to_the_next_endpoint(etcd: EtcdServer, card_key: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proc = _cli({"ETCD_ENDPOINTS": f"{dead},{etcd.client_url}"}, "ls")
    assert proc.returncode == 0, proc.stderr
    assert card_key in proc.stdout


def test_etcd_endpoints_accepts_bare_host_port(etcd: EtcdServer, card_key: str) -> None:
    proc = _cli({"ETCD_ENDPOINTS": f"127.0.0.1:{etcd.client_port}"}, "ls")
    assert proc.returncode == 0, proc.stderr
    assert card_key in proc.stdout


def test_etcd_flag_beats_etcd_endpoints(etcd: EtcdServer, card_key: str) -> None:
    proc = _cli({"ETCD_ENDPOINTS": "ftp://nowhere"}, "ls", "--etcd", etcd.client_url)
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


async def _wait_for_key(client: EtcdClient, prefix: str, within: float = 30.0) -> tuple[str, int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = await client.range_prefix_all(prefix)
        if result.kvs:
            return result.kvs[0].key, result.kvs[0].lease
        await asyncio.sleep(0.05)
    raise AssertionError(f"no key under {prefix} within {within}s")


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "discovery_mdc", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


async def test_etcd_lease_ttl_sets_the_workers_granted_ttl(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    model = write_sample_model(tmp_path / "ttl-model")
    env = {**_CLEAN_ENV, "ETCD_ENDPOINTS": etcd.client_url, "ETCD_LEASE_TTL": "7"}
    proc = _spawn(["worker", "--model-path", str(model), "--namespace", "ttltest"], env)
    try:
        async with EtcdClient([etcd.client_url]) as client:
            key, lease = await _wait_for_key(client, "v1/mdc/ttltest/")
            info = await client.lease_time_to_live(lease)
            assert info.granted_ttl == 7
            assert key.endswith(f"/{lease:x}")
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.to_thread(proc.communicate, timeout=30)
            assert proc.returncode == 0, err
            # Revoked on a clean stop: the key is gone at once.
            assert not (await client.range_prefix_all("v1/mdc/ttltest/")).kvs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_etcd_lease_ttl_is_a_usage_error(tmp_path: Path) -> None:
    model = write_sample_model(tmp_path / "m")
    proc = _cli({"ETCD_LEASE_TTL": "ten"}, "worker", "--model-path", str(model))
    assert proc.returncode == 2
    assert proc.stderr.startswith("discovery-mdc: error: ETCD_LEASE_TTL='ten': ")
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- auth and TLS


def _gateway(url: str, path: str, body: dict[str, object], token: str | None = None) -> object:
    headers = {"Authorization": token} if token else {}
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), method="POST", headers=headers
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture
def auth_etcd() -> Iterator[EtcdServer]:
    """An etcd with authentication on: user root / password s3cret."""
    with EtcdServer(name="auth") as server:
        url = server.client_url
        _gateway(url, "/v3/auth/role/add", {"name": "root"})
        _gateway(url, "/v3/auth/user/add", {"name": "root", "password": "s3cret"})
        _gateway(url, "/v3/auth/user/grant", {"user": "root", "role": "root"})
        _gateway(url, "/v3/auth/enable", {})
        yield server


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
