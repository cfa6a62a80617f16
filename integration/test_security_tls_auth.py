"""Worker and frontend processes over etcd with TLS + client-cert auth, and over etcd with
user auth and a role limited to ``v1/mdc/``. Wrong credentials end the process with exit 1
and one line naming the problem, never a hang."""

from __future__ import annotations

import asyncio
import base64
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from discovery_mdc.errors import EtcdAuthError
from discovery_mdc.etcd import EtcdClient, EtcdServer
from testkit import (
    CliProcess,
    FrontendProcess,
    Pki,
    Process,
    WorkerProcess,
    card_keys,
    enable_auth,
    gateway_post,
    grant_prefix_user,
    make_pki,
    model_dirs,
    wait_until,
)

DEADLINE = 60.0
USER, PASSWORD = "mdc", "s3cret-pw"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def works_end_to_end(
    etcd: str, env: dict[str, str], client: EtcdClient, tmp_path: Path, procs: list[Process]
) -> None:
    """A worker publishes, a frontend lists the model; the worker stops and it is gone."""
    (model,) = model_dirs(tmp_path, 1)
    fe = FrontendProcess(etcd, tmp=tmp_path, env=env)
    w = WorkerProcess.serving(etcd, model, log_path=tmp_path / "worker.log", env=env)
    procs += [fe, w]
    await fe.wait_listening()
    key = (await w.wait_registered()).key
    assert await card_keys(client) == {key}

    async def listed() -> bool:
        return await fe.ready_instances() == {key}

    await wait_until(listed, timeout=DEADLINE, message=fe.describe)
    w.signal(__import__("signal").SIGTERM)
    assert await w.wait_exit() == 0
    await wait_until(lambda: fe.lists_only(), timeout=DEADLINE, message=fe.describe)


async def fails_cleanly(proc: CliProcess, *needles: str) -> str:
    """The process exits 1 with exactly one error line that names the problem."""
    assert await proc.wait_exit(timeout=DEADLINE) == 1
    errors = [ln for ln in proc.log().splitlines() if ln.startswith("discovery-mdc: error:")]
    assert len(errors) == 1, proc.describe()
    assert "Traceback" not in proc.log(), proc.describe()
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]
    print(f"\n{proc.log_path.name}: {errors[0]}")
    return errors[0]


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_etcd(pki: Pki, etcd_server_factory: Callable[..., EtcdServer]) -> EtcdServer:
    health = ssl.create_default_context(cafile=str(pki.ca))
    health.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return etcd_server_factory(
        extra_args=[
            f"--cert-file={pki.server_cert}",
            f"--key-file={pki.server_key}",
            f"--trusted-ca-file={pki.ca}",
            "--client-cert-auth",
        ],
        health_ssl=health,
    )


def tls_env(pki: Pki, cert: Path | None = None, key: Path | None = None) -> dict[str, str]:
    env = {"ETCD_AUTH_CA": str(pki.ca)}
    if cert is not None and key is not None:
        env |= {"ETCD_AUTH_CLIENT_CERT": str(cert), "ETCD_AUTH_CLIENT_KEY": str(key)}
    return env


async def test_worker_and_frontend_work_over_tls_with_client_certificates(
    tls_etcd: EtcdServer, pki: Pki, tmp_path: Path, procs: list[Process]
) -> None:
    assert tls_etcd.client_url.startswith("https://")
    env = tls_env(pki, pki.client_cert, pki.client_key)
    async with EtcdClient.from_env({**env, "ETCD_ENDPOINTS": tls_etcd.client_url}) as client:
        await works_end_to_end(tls_etcd.client_url, env, client, tmp_path, procs)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no client certificate", "certificate"),
        ("certificate from another CA", "certificate"),
        ("server not trusted", "certificate verify failed"),
    ],
)
async def test_tls_without_valid_credentials_fails_with_one_clear_line(
    tls_etcd: EtcdServer, pki: Pki, tmp_path: Path, procs: list[Process], case: str,
    needle: str,
) -> None:  # fmt: skip
    env = {
        "no client certificate": tls_env(pki),
        "certificate from another CA": tls_env(pki, pki.rogue_cert, pki.rogue_key),
        # Trust a CA that did not sign the server's certificate.
        "server not trusted": {
            "ETCD_AUTH_CA": str(pki.rogue_cert.with_name("rogue-ca.crt")),
            "ETCD_AUTH_CLIENT_CERT": str(pki.client_cert),
            "ETCD_AUTH_CLIENT_KEY": str(pki.client_key),
        },
    }[case]
    (model,) = model_dirs(tmp_path, 1)
    w = WorkerProcess.serving(tls_etcd.client_url, model, log_path=tmp_path / "worker.log", env=env)
    fe = FrontendProcess(tls_etcd.client_url, tmp=tmp_path, env=env)
    procs += [w, fe]
    for proc in (w, fe):
        await fails_cleanly(proc, tls_etcd.client_url, needle)


# --------------------------------------------------------------------------- user auth


def enable_auth_with_mdc_role(url: str, context: ssl.SSLContext | None = None) -> None:
    """root (all), and user ``mdc`` whose role may read and write ``v1/mdc/`` only."""
    grant_prefix_user(url, USER, PASSWORD, "v1/mdc/", context=context)
    enable_auth(url, context=context)


@pytest.fixture
def auth_etcd(etcd_server: EtcdServer) -> EtcdServer:
    enable_auth_with_mdc_role(etcd_server.client_url)
    return etcd_server


def auth_env(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    return {"ETCD_AUTH_USERNAME": user, "ETCD_AUTH_PASSWORD": password}


async def test_worker_and_frontend_work_as_a_user_limited_to_v1_mdc(
    auth_etcd: EtcdServer, tmp_path: Path, procs: list[Process]
) -> None:
    url = auth_etcd.client_url
    async with EtcdClient([url], username=USER, password=PASSWORD) as client:
        # The role really is limited: anything outside v1/mdc/ is refused.
        with pytest.raises(EtcdAuthError, match="permission denied"):
            await client.put("v1/instances/x", b"x")
        with pytest.raises(EtcdAuthError, match="permission denied"):
            await client.range("", prefix=True)
        await works_end_to_end(url, auth_env(), client, tmp_path, procs)


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        (auth_env(password="wrong"), ("mdc", "credentials")),
        (auth_env(user="nobody"), ("nobody",)),
        ({}, ("ETCD_AUTH_USERNAME",)),
    ],
    ids=["wrong-password", "unknown-user", "no-credentials"],
)
async def test_wrong_credentials_fail_with_one_clear_line(
    auth_etcd: EtcdServer,
    tmp_path: Path,
    procs: list[Process],
    env: dict[str, str],
    needles: tuple[str, ...],
) -> None:
    (model,) = model_dirs(tmp_path, 1)
    w = WorkerProcess.serving(
        auth_etcd.client_url, model, log_path=tmp_path / "worker.log", env=env
    )
    fe = FrontendProcess(auth_etcd.client_url, tmp=tmp_path, env=env)
    procs += [w, fe]
    for proc in (w, fe):
        await fails_cleanly(proc, *needles)


async def test_a_write_outside_the_role_fails_with_one_clear_line(
    auth_etcd: EtcdServer, tmp_path: Path, procs: list[Process]
) -> None:
    # A Dynamo endpoint record goes to v1/instances/, which this role may not write.
    (model,) = model_dirs(tmp_path, 1)
    w = WorkerProcess.serving(
        auth_etcd.client_url,
        model,
        log_path=tmp_path / "worker.log",
        env=auth_env(),
        extra_args=("--instance-transport", "tcp://127.0.0.1:9/generate"),
    )
    procs.append(w)
    await fails_cleanly(w, "permission denied", "mdc")
    async with EtcdClient([auth_etcd.client_url], username=USER, password=PASSWORD) as c:
        assert await asyncio.wait_for(card_keys(c), DEADLINE) == set()


async def test_an_invalidated_token_is_refreshed_without_the_caller_noticing(
    auth_etcd: EtcdServer,
) -> None:
    url = auth_etcd.client_url
    async with EtcdClient([url], username=USER, password=PASSWORD) as client:
        await client.put("v1/mdc/token-test", b"1")
        first = client._token
        assert first
        # Changing a user's password (here: to the same one) makes etcd drop that user's
        # tokens, exactly what an expired token looks like to the client.
        root = str(
            gateway_post(url, "/v3/auth/authenticate", {"name": "root", "password": "rootpw"})[
                "token"
            ]
        )
        gateway_post(
            url, "/v3/auth/user/changepw", {"name": USER, "password": PASSWORD}, token=root
        )
        key = base64.b64encode(b"v1/mdc/token-test").decode()
        with pytest.raises(urllib.error.HTTPError):  # the old token is really gone
            gateway_post(url, "/v3/kv/range", {"key": key}, token=first)
        kv = await client.get("v1/mdc/token-test")
        assert kv is not None and kv.value == b"1"
        assert client._token and client._token != first
        await client.put("v1/mdc/token-test", b"2")


# --------------------------------------------------------------------------- TLS + auth


@pytest.fixture
def tls_auth_etcd(tls_etcd: EtcdServer, pki: Pki) -> EtcdServer:
    """etcd with TLS, --client-cert-auth and user auth (the ``mdc`` role)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.no_cn_cert), str(pki.no_cn_key))
    enable_auth_with_mdc_role(tls_etcd.client_url, context)
    return tls_etcd


async def test_a_client_certificate_with_a_common_name_and_auth_fails_naming_the_limit(
    tls_auth_etcd: EtcdServer, pki: Pki, tmp_path: Path, procs: list[Process]
) -> None:
    # etcd's gateway answers HTTP 400 "CommonName of client sending a request against gateway
    # will be ignored" (etcd-io/etcd#10366): one line naming the limit and the workarounds.
    env = tls_env(pki, pki.client_cert, pki.client_key) | auth_env()
    (model,) = model_dirs(tmp_path, 1)
    w = WorkerProcess.serving(
        tls_auth_etcd.client_url, model, log_path=tmp_path / "worker.log", env=env
    )
    fe = FrontendProcess(tls_auth_etcd.client_url, tmp=tmp_path, env=env)
    procs += [w, fe]
    for proc in (w, fe):
        line = await fails_cleanly(proc, tls_auth_etcd.client_url, "CommonName", "#10366")
        assert str(pki.client_cert) in line
        assert "without a CommonName" in line and "ETCD_AUTH_USERNAME" in line


async def test_the_workaround_a_certificate_without_a_common_name_plus_a_user_works(
    tls_auth_etcd: EtcdServer, pki: Pki, tmp_path: Path, procs: list[Process]
) -> None:
    env = tls_env(pki, pki.no_cn_cert, pki.no_cn_key) | auth_env()
    client_env = {**env, "ETCD_ENDPOINTS": tls_auth_etcd.client_url}
    async with EtcdClient.from_env(client_env) as client:
        await works_end_to_end(tls_auth_etcd.client_url, env, client, tmp_path, procs)
