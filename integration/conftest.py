"""Fixtures for real etcd: a fresh server or 3-member cluster per test, and a client.

Other integration modules get these by name, and ``spawn``/``procs`` for worker and other CLI
processes. ``etcd_server_factory`` starts servers with
custom flags (``etcd_server_factory(extra_args=["--max-request-bytes=4194304"])``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from discovery_mdc.etcd import EtcdClient, EtcdCluster, EtcdServer
from integration._faults import CliProcess, Spawn, WorkerProc
from integration._worker_proc import WorkerSpawner


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


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[WorkerSpawner]:
    """Start ``discovery-mdc worker`` processes (logs in ``tmp_path``); killed after the test."""
    spawner = WorkerSpawner(tmp_path)
    yield spawner
    spawner.close()


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
def procs() -> Iterator[list[CliProcess]]:
    """Processes a test started; each is closed (SIGTERM, then SIGKILL) afterwards."""
    started: list[CliProcess] = []
    yield started
    for p in started:
        p.close()


@pytest.fixture
def spawn_worker(etcd_server: EtcdServer, tmp_path: Path, procs: list[CliProcess]) -> Spawn:
    """``spawn_worker(model_dir, ttl=3, name="w")``: a worker process on ``etcd_server``."""

    def spawn(model_dir: Path, ttl: int = 3, name: str = "w") -> WorkerProc:
        log_path = tmp_path / f"{name}-{len(procs)}.log"
        w = WorkerProc(etcd_server.client_url, model_dir, ttl=ttl, log_path=log_path)
        procs.append(w)
        return w

    return spawn


async def to_thread(fn: Callable[[], Any]) -> Any:
    """Run a blocking server operation (restart, stop) without stalling the event loop."""
    return await asyncio.to_thread(fn)
