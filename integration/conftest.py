"""Fixtures for real etcd (a fresh server or 3-member cluster per test, one server per module,
clients) and for the processes a test starts (``procs``, ``spawn``, ``spawn_worker``,
``frontend``).

``etcd_server_factory`` starts servers with custom flags
(``etcd_server_factory(extra_args=["--max-request-bytes=4194304"])``). The helpers these
build on are the test kit's (``testkit``).
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from discovery_mdc.etcd import EtcdClient, EtcdCluster, EtcdServer
from testkit import FrontendProcess, Process, Spawn, WorkerProcess, child_env


@pytest.fixture
def etcd_server_factory() -> Iterator[Callable[..., EtcdServer]]:
    """Start EtcdServer(**kwargs) instances; all are stopped and removed after the test."""
    servers: list[EtcdServer] = []

    def make(**kwargs: Any) -> EtcdServer:
        server = EtcdServer(**kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def etcd_server(etcd_server_factory: Callable[..., EtcdServer]) -> EtcdServer:
    """A fresh single-node etcd on loopback (random ports, temp data dir)."""
    return etcd_server_factory()


@pytest.fixture(scope="module")
def shared_etcd() -> Iterator[EtcdServer]:
    """One etcd for a whole module, whose tests keep to their own keys (or namespaces)."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
async def shared_client(shared_etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    """An EtcdClient connected to ``shared_etcd``."""
    async with EtcdClient([shared_etcd.client_url]) as client:
        yield client


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster on loopback."""
    with EtcdCluster(3) as cluster:
        yield cluster


@pytest.fixture
async def etcd_client(etcd_server: EtcdServer) -> AsyncIterator[EtcdClient]:
    """An EtcdClient connected to ``etcd_server``."""
    async with EtcdClient([etcd_server.client_url]) as client:
        yield client


@pytest.fixture
async def client(etcd_server: EtcdServer) -> AsyncIterator[EtcdClient]:
    """A client of ``etcd_server`` with short request timeouts (for tests that cut it off)."""
    async with EtcdClient([etcd_server.client_url], request_timeout=2.0) as c:
        yield c


@pytest.fixture
def procs() -> Iterator[list[Process]]:
    """Processes a test started. Afterwards all get SIGTERM at once, then each is waited for
    (SIGKILL after a deadline)."""
    started: list[Process] = []
    yield started
    for p in started:
        p.signal(signal.SIGTERM)
    for p in started:
        p.stop()


@pytest.fixture
def spawn(tmp_path: Path, procs: list[Process]) -> Spawn:
    """``spawn(*worker_args, env=None, cwd=None, preexec_fn=None)``: a ``discovery-mdc
    worker`` process (default environment: :func:`testkit.child_env`), logging in
    ``tmp_path``."""

    def start(
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> WorkerProcess:
        proc = WorkerProcess(
            args,
            log_path=tmp_path / f"worker-{len(procs)}.log",
            env=child_env() if env is None else env,
            cwd=cwd,
            preexec_fn=preexec_fn,
        )
        procs.append(proc)
        return proc

    return start


@pytest.fixture
def spawn_worker(etcd_server: EtcdServer, tmp_path: Path, procs: list[Process]) -> Spawn:
    """``spawn_worker(model_dir, ttl=3, name="w", extra_args=())``: a worker serving
    ``model_dir`` on ``etcd_server`` (:meth:`testkit.WorkerProcess.serving`)."""

    def start(
        model_dir: Path, ttl: int = 3, name: str = "w", extra_args: tuple[str, ...] = ()
    ) -> WorkerProcess:
        log_path = tmp_path / f"{name}-{len(procs)}.log"
        w = WorkerProcess.serving(
            etcd_server.client_url, model_dir, ttl=ttl, log_path=log_path, extra_args=extra_args
        )
        procs.append(w)
        return w

    return start


@pytest.fixture
def frontend(etcd_server: EtcdServer, tmp_path: Path) -> Iterator[FrontendProcess]:
    """A frontend process on ``etcd_server`` (started at once), reconciling every
    second; stopped after the test."""
    fe = FrontendProcess(etcd_server.client_url, tmp=tmp_path / "fe", reconcile_interval=1.0)
    yield fe
    fe.stop()
