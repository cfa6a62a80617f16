"""The frontend as a real process against real etcd and real worker processes.

Covers the must-hold list of the frontend: cold start, replicas and rejection, removal on a
graceful stop, an etcd restart, compaction while cut off (through a proxy), bad input,
namespace filtering, a cache shared by two frontends, and ``discovery-mdc ls``.

One etcd serves the module; tests use their own namespaces and model names so they never see
each other's keys (the restart test has its own etcd). Every process is stopped by PID in a
fixture finalizer: SIGTERM, then SIGKILL after a deadline. Conditions are polled, never slept
for.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import (
    ModelDeploymentCard,
    ModelEnvelope,
    card_key,
    decode_envelope,
    encode_envelope,
    from_dir,
    hash_file,
    mdcsum,
)
from discovery_mdc.etcd import EtcdClient, EtcdServer
from integration._proxy import TcpProxy
from integration._util import wait_until

DEADLINE = 60.0  # generous: the machine is shared with other test runs
STOP_DEADLINE = 15.0
LEASE_TTL = "3"
_instance_ids = itertools.count(0x7E57000)


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A ``python -m discovery_mdc`` child whose stderr goes to a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = STOP_DEADLINE) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.popen.wait()

    async def exited(self) -> int:
        """Wait (polling) for the process to exit; its exit code."""
        await wait_until(lambda: not self.alive(), timeout=DEADLINE, message=self.describe)
        return self.popen.returncode

    def describe(self) -> str:
        return f"{self.name} (pid {self.pid}) log tail:\n" + "\n".join(
            self.log().splitlines()[-25:]
        )


class Procs:
    """Starts processes for one test and stops every one of them afterwards."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list[Proc] = []
        self._n = itertools.count()

    def spawn(
        self, name: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> Proc:
        log_path = self.tmp / f"{name}-{next(self._n)}.log"
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "discovery_mdc", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=cwd,
            )
        proc = Proc(name, popen, log_path)
        self.all.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.all:
            proc.signal(signal.SIGTERM)
        for proc in self.all:
            proc.stop()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.stop_all()


@dataclass
class Worker:
    proc: Proc
    key: str
    port: int

    async def metadata_200s(self, http: aiohttp.ClientSession) -> float:
        """``discovery_mdc_metadata_requests_total{status="200"}`` on its status server."""
        async with http.get(f"http://127.0.0.1:{self.port}/metrics") as resp:
            text = await resp.text()
        m = re.search(r'^discovery_mdc_metadata_requests_total\{status="200"\} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0


async def start_worker(
    procs: Procs,
    etcd_url: str,
    model_dir: Path,
    name: str,
    namespace: str,
    *,
    cwd: Path | None = None,
) -> Worker:
    """A worker publishing ``model_dir`` (relative to ``cwd`` when given: the card's
    source_path is the path as given, and it is part of the mdcsum)."""
    proc = procs.spawn(
        f"worker-{namespace}",
        "worker",
        "--etcd",
        etcd_url,
        "--model-path",
        str(model_dir),
        "--model-name",
        name,
        "--namespace",
        namespace,
        "--lease-ttl",
        LEASE_TTL,
        env={"DYN_SYSTEM_HOST": "127.0.0.1", "DYN_SYSTEM_PORT": "0"},
        cwd=cwd,
    )

    def registered() -> re.Match[str] | None:
        assert proc.alive(), proc.describe()
        return re.search(r"registered model .* at (v1/mdc/\S+) \(lease", proc.log())

    m = await wait_until(registered, timeout=DEADLINE, message=proc.describe)
    assert m is not None
    port = re.search(r"http://127\.0\.0\.1:(\d+)/v1/metadata/", proc.log())
    assert port is not None, proc.describe()
    return Worker(proc, m.group(1), int(port.group(1)))


@dataclass
class Frontend:
    proc: Proc
    url: str
    cache_dir: Path

    async def get(self, http: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
        async with http.get(self.url + path) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def model_ids(self, http: aiohttp.ClientSession) -> set[str]:
        status, body = await self.get(http, "/v1/models")
        assert status == 200, body
        return {m["id"] for m in body["data"]}

    async def details(self, http: aiohttp.ClientSession, model: str) -> dict[str, Any] | None:
        status, body = await self.get(http, f"/v1/models/{model}")
        return body if status == 200 else None

    async def instances(self, http: aiohttp.ClientSession, *models: str) -> set[str]:
        """Every instance key of the listed ``models`` (all listed models if none given)."""
        names = models or tuple(await self.model_ids(http))
        keys: set[str] = set()
        for name in names:
            info = await self.details(http, name)
            if info is not None:
                keys |= {k for ws in info["worker_sets"] for k in ws["instances"]}
        return keys

    async def metric(self, http: aiohttp.ClientSession, sample: str) -> float:
        """The value of one exposition line, e.g.
        ``discovery_mdc_relists_total{reason="compaction"}``."""
        _, text = await self.get(http, "/metrics")
        for line in text.splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return 0.0


def spawn_frontend(
    procs: Procs, etcd_url: str, cache_dir: Path, *extra: str, name: str = "frontend"
) -> tuple[Proc, Path]:
    port_file = procs.tmp / f"{name}-{len(procs.all)}.port"
    proc = procs.spawn(
        name,
        "frontend",
        "--etcd",
        etcd_url,
        "--http-host",
        "127.0.0.1",
        "--http-port",
        "0",
        "--port-file",
        str(port_file),
        "--cache-dir",
        str(cache_dir),
        *extra,
    )
    return proc, port_file


async def frontend_ready(proc: Proc, port_file: Path, cache_dir: Path) -> Frontend:
    def port() -> str:
        assert proc.alive(), proc.describe()
        return port_file.read_text().strip() if port_file.exists() else ""

    text = await wait_until(port, timeout=DEADLINE, message=proc.describe)
    return Frontend(proc, f"http://127.0.0.1:{text}", cache_dir)


async def start_frontend(
    procs: Procs, etcd_url: str, cache_dir: Path, *extra: str, name: str = "frontend"
) -> Frontend:
    proc, port_file = spawn_frontend(procs, etcd_url, cache_dir, *extra, name=name)
    return await frontend_ready(proc, port_file, cache_dir)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared_etcd() -> Iterator[EtcdServer]:
    """One etcd for the module; tests keep to their own namespaces."""
    server = EtcdServer().start()
    yield server
    server.close()


@pytest.fixture
async def etcd(shared_etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    async with EtcdClient([shared_etcd.client_url]) as client:
        yield client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


@pytest.fixture
def model_dirs(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str, **kwargs: Any) -> Path:
        return write_sample_model(tmp_path / "models" / name, vocab_size=300, **kwargs)

    return make


def card_files(card: ModelDeploymentCard) -> dict[str, str]:
    """basename -> blake3 hex of every file of ``card``."""
    return {f.basename: f.checksum.hex for _, f in card.files()}


async def put_card(
    etcd: EtcdClient, namespace: str, card: ModelDeploymentCard, instance: int | None = None
) -> str:
    """Publish ``card`` directly (no worker, no lease); its file paths are local ones."""
    instance = next(_instance_ids) if instance is None else instance
    env = ModelEnvelope(
        namespace=namespace,
        component="backend",
        endpoint="generate",
        instance_id=instance,
        card=card,
    )
    await etcd.put(env.key, encode_envelope(env))
    return env.key


async def keys_under(etcd: EtcdClient, prefix: str) -> set[str]:
    return {kv.key for kv in (await etcd.range_prefix_all(prefix)).kvs}


async def published_card(etcd: EtcdClient, key: str) -> ModelDeploymentCard:
    kv = await etcd.get(key)
    assert kv is not None, key
    return decode_envelope(kv.value).card


def local_card(model_dir: Path, name: str) -> ModelDeploymentCard:
    return from_dir(model_dir).replace(display_name=name)


# --------------------------------------------------------------------------- tests


async def test_cold_start_lists_the_model_with_every_file_cached_and_verified(
    shared_etcd: EtcdServer,
    etcd: EtcdClient,
    http: aiohttp.ClientSession,
    procs: Procs,
    model_dirs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    model_dir = model_dirs("cold")
    worker = await start_worker(procs, shared_etcd.client_url, model_dir, "org/cold", "cold")
    kv = await etcd.get(worker.key)
    assert kv is not None
    card = decode_envelope(kv.value).card
    assert all(f.path.startswith(f"http://127.0.0.1:{worker.port}/") for _, f in card.files())

    # `ls` lists the card and fetches nothing.
    ls = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "discovery_mdc", "ls", "--etcd", shared_etcd.client_url],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=True,
    )
    [row] = [line.split() for line in ls.stdout.splitlines() if worker.key in line]
    assert row == [worker.key, "org/cold", mdcsum(card), f"{kv.lease:x}"]
    assert ls.stdout.splitlines()[0].split() == ["KEY", "MODEL", "MDCSUM", "LEASE"]
    assert await worker.metadata_200s(http) == 0

    fe = await start_frontend(
        procs, shared_etcd.client_url, tmp_path / "cache", "--namespace", "cold"
    )
    await wait_until(lambda: fe.model_ids(http), timeout=DEADLINE, message=fe.proc.describe)
    assert await fe.model_ids(http) == {"org/cold"}
    info = await fe.details(http, "org/cold")
    assert info is not None
    [ws] = info["worker_sets"]
    assert ws["instances"] == [worker.key] and ws["mdcsum"] == mdcsum(card)
    link_dir = tmp_path / "cache" / "by-slug" / card.slug / mdcsum(card)
    assert Path(ws["local_dir"]) == link_dir
    expected = card_files(card)
    assert sorted(p.name for p in link_dir.iterdir()) == sorted(expected)
    for name, hexdigest in expected.items():
        assert hash_file(link_dir / name)[0].hex == hexdigest == hash_file(model_dir / name)[0].hex
    assert await worker.metadata_200s(http) == len(expected)
    assert await fe.metric(http, "discovery_mdc_fetched_bytes_total") == sum(
        (model_dir / n).stat().st_size for n in expected
    )
    assert "model 'org/cold' added" in fe.proc.log()

    # Removal: a graceful stop revokes the lease; the model leaves within 2 s of the exit.
    worker.proc.signal(signal.SIGTERM)
    assert await worker.proc.exited() == 0
    await wait_until(
        lambda: _empty(fe.model_ids(http)), timeout=2.0, interval=0.05, message=fe.proc.describe
    )
    assert "model 'org/cold' removed" in fe.proc.log()


async def _empty(ids: Any) -> bool:
    return not await ids


async def test_replicas_form_one_worker_set_and_a_different_tokenizer_is_rejected(
    shared_etcd: EtcdServer,
    etcd: EtcdClient,
    http: aiohttp.ClientSession,
    procs: Procs,
    model_dirs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    url = shared_etcd.client_url
    fe = await start_frontend(procs, url, tmp_path / "cache", "--namespace", "rep")
    # Two replicas with identical files in separate copies, as on two hosts that both keep
    # the model at ./model (the same source_path, so the same mdcsum).
    hosts = {h: tmp_path / f"host-{h}" for h in "abc"}
    for h, root in hosts.items():
        write_sample_model(root / "model", vocab_size=300, seed=1 if h == "c" else 0)
    model = Path("model")
    a, b = await asyncio.gather(
        start_worker(procs, url, model, "org/rep", "rep", cwd=hosts["a"]),
        start_worker(procs, url, model, "org/rep", "rep", cwd=hosts["b"]),
    )

    async def both_listed() -> bool:
        return await fe.instances(http, "org/rep") == {a.key, b.key}

    await wait_until(both_listed, timeout=DEADLINE, message=fe.proc.describe)
    info = await fe.details(http, "org/rep")
    assert info is not None and len(info["worker_sets"]) == 1
    n_files = len(card_files(await published_card(etcd, a.key)))
    assert n_files == len(card_files(await published_card(etcd, b.key))) >= 4
    served = await a.metadata_200s(http) + await b.metadata_200s(http)
    assert served == n_files

    # A third replica with the same name and another tokenizer is rejected.
    c = await start_worker(procs, url, model, "org/rep", "rep", cwd=hosts["c"])
    await wait_until(
        lambda: f"rejected instance {c.key}" in fe.proc.log(),
        timeout=DEADLINE,
        message=fe.proc.describe,
    )
    assert await fe.metric(http, 'discovery_mdc_rejected_instances_total{model="org/rep"}') == 1
    assert await fe.instances(http, "org/rep") == {a.key, b.key}
    assert await c.metadata_200s(http) == 0

    # Stop every replica (the rejected one first, so it is never admitted in their place).
    c.proc.signal(signal.SIGTERM)
    assert await c.proc.exited() == 0
    for w in (a, b):
        w.proc.signal(signal.SIGTERM)
    assert [await a.proc.exited(), await b.proc.exited()] == [0, 0]
    await wait_until(
        lambda: _empty(fe.model_ids(http)), timeout=2.0, interval=0.05, message=fe.proc.describe
    )
    assert f"{c.key}" not in str(await fe.details(http, "org/rep"))


async def test_etcd_restart_lists_new_models_and_drops_models_deleted_meanwhile(
    etcd_server_factory: Callable[..., EtcdServer],
    http: aiohttp.ClientSession,
    procs: Procs,
    model_dirs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    server = etcd_server_factory()
    async with EtcdClient([server.client_url]) as etcd:
        stays = await put_card(etcd, "rs", local_card(model_dirs("rs-stays"), "org/rs-stays"))
        goes = await put_card(etcd, "rs", local_card(model_dirs("rs-goes"), "org/rs-goes"))
        fe = await start_frontend(procs, server.client_url, tmp_path / "cache")

        async def listed(expected: set[str]) -> bool:
            return await fe.model_ids(http) == expected

        await wait_until(lambda: listed({"org/rs-stays", "org/rs-goes"}), timeout=DEADLINE)

        await asyncio.to_thread(server.stop)
        await wait_until(lambda: "watch on v1/mdc/ lost" in fe.proc.log(), timeout=DEADLINE)
        await asyncio.to_thread(server.start)
        await etcd.delete(goes)
        worker = await start_worker(
            procs, server.client_url, model_dirs("rs-new"), "org/rs-new", "rs"
        )

        await wait_until(
            lambda: listed({"org/rs-stays", "org/rs-new"}),
            timeout=DEADLINE,
            message=fe.proc.describe,
        )
        assert await fe.instances(http) == {stays, worker.key} == await keys_under(etcd, "v1/mdc/")
        assert await fe.metric(http, "discovery_mdc_watch_reconnects_total") >= 1


async def test_compaction_while_cut_off_converges_to_exactly_what_etcd_holds(
    shared_etcd: EtcdServer,
    etcd: EtcdClient,
    http: aiohttp.ClientSession,
    procs: Procs,
    model_dirs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    ns = "cmp"
    cards = {n: local_card(model_dirs(f"cmp-{n}"), f"org/cmp-{n}") for n in "abcde"}
    a1 = await put_card(etcd, ns, cards["a"])
    a2 = await put_card(etcd, ns, cards["a"])
    b1 = await put_card(etcd, ns, cards["b"])
    await put_card(etcd, ns, cards["c"])
    prefix = f"v1/mdc/{ns}/"
    with TcpProxy("127.0.0.1", shared_etcd.client_port) as proxy:
        # A large reconcile interval: only the compaction path can repair what follows.
        fe = await start_frontend(
            procs, proxy.url, tmp_path / "cache", "--namespace", ns, "--reconcile-interval", "3600"
        )

        async def converged() -> bool:
            return await fe.instances(http) == await keys_under(etcd, prefix)

        await wait_until(converged, timeout=DEADLINE, message=fe.proc.describe)
        assert await fe.model_ids(http) == {"org/cmp-a", "org/cmp-b", "org/cmp-c"}

        proxy.cut()
        await wait_until(lambda: "watch on v1/mdc/cmp/ lost" in fe.proc.log(), timeout=DEADLINE)
        await etcd.delete(a1)  # a keeps one replica
        await etcd.delete(b1)  # b goes entirely
        await put_card(etcd, ns, cards["c"])  # c gains a replica
        await put_card(etcd, ns, cards["d"])  # d is new
        gone = await put_card(etcd, ns, cards["e"])  # e comes and goes unseen
        await etcd.delete(gone)
        revision = (await etcd.range_prefix_all(prefix)).revision
        await etcd.compact(revision)
        proxy.restore()

        await wait_until(
            lambda: "hit compaction" in fe.proc.log(), timeout=DEADLINE, message=fe.proc.describe
        )
        await wait_until(converged, timeout=DEADLINE, message=fe.proc.describe)
        assert await fe.model_ids(http) == {"org/cmp-a", "org/cmp-c", "org/cmp-d"}
        assert await fe.instances(http, "org/cmp-a") == {a2}
        assert await fe.metric(http, 'discovery_mdc_relists_total{reason="compaction"}') >= 1
        assert await fe.metric(http, 'discovery_mdc_relists_total{reason="reconcile"}') == 0


async def test_malformed_values_and_bad_checksums_are_skipped_counted_and_logged(
    shared_etcd: EtcdServer,
    etcd: EtcdClient,
    http: aiohttp.ClientSession,
    procs: Procs,
    model_dirs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    ns = "bad"
    garbage_key = card_key(ns, "backend", "generate", next(_instance_ids))
    await etcd.put(garbage_key, b"\x00 this is not a card")
    # A checksum that is not blake3 hex: the card does not decode.
    good_card = local_card(model_dirs("bad-syntax"), "org/bad-syntax")
    hexdigest = next(iter(card_files(good_card).values()))
    raw = encode_envelope(
        ModelEnvelope(
            namespace=ns, component="backend", endpoint="generate", instance_id=1, card=good_card
        )
    ).replace(hexdigest.encode(), b"not-a-checksum", 1)
    syntax_key = card_key(ns, "backend", "generate", next(_instance_ids))
    await etcd.put(syntax_key, raw)
    # A well-formed checksum that the file does not match: the pipeline rejects the bytes.
    tampered_dir = model_dirs("bad-sum")
    tampered = local_card(tampered_dir, "org/bad-sum")
    (tampered_dir / "tokenizer_config.json").write_text('{"tampered": true}')
    tampered_key = await put_card(etcd, ns, tampered)
    ok_key = await put_card(etcd, ns, local_card(model_dirs("bad-ok"), "org/bad-ok"))

    fe = await start_frontend(procs, shared_etcd.client_url, tmp_path / "cache", "--namespace", ns)
    await wait_until(lambda: fe.model_ids(http), timeout=DEADLINE, message=fe.proc.describe)

    async def tampered_failed() -> bool:
        return await fe.metric(http, 'discovery_mdc_pipelines_total{result="failed"}') >= 1

    await wait_until(tampered_failed, timeout=DEADLINE, message=fe.proc.describe)
    assert await fe.model_ids(http) == {"org/bad-ok"}
    assert await fe.instances(http) == {ok_key}
    assert await fe.metric(http, "discovery_mdc_malformed_cards_total") == 2
    log = fe.proc.log()
    assert f"skipping malformed card at {garbage_key}" in log
    assert f"skipping malformed card at {syntax_key}" in log
    assert "model 'org/bad-sum'" in log and "not ready" in log
    assert tampered_key not in await fe.instances(http)
    # The tampered bytes never entered blobs/, and every blob there is what its name says.
    blobs = tmp_path / "cache" / "blobs"
    assert not (blobs / hash_file(tampered_dir / "tokenizer_config.json")[0].hex).exists()
    assert all(hash_file(b)[0].hex == b.name for b in blobs.iterdir())


async def test_namespace_filters_admit_exact_prefix_and_global(
    shared_etcd: EtcdServer,
    etcd: EtcdClient,
    http: aiohttp.ClientSession,
    procs: Procs,
    model_dirs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    card = local_card(model_dirs("flt"), "org/flt")
    by_ns = {
        ns: await put_card(etcd, ns, card.replace(display_name=f"org/flt-{ns}"))
        for ns in ("ns1", "ns10", "other")
    }
    url = shared_etcd.client_url
    cache = tmp_path / "cache"
    spawned = [
        spawn_frontend(procs, url, cache, "--namespace", "ns1", name="exact"),
        spawn_frontend(procs, url, cache, "--namespace-prefix", "ns1", name="prefix"),
        spawn_frontend(procs, url, cache, name="global"),
    ]
    exact, prefix, global_ = [await frontend_ready(p, f, cache) for p, f in spawned]

    async def lists(fe: Frontend, expected: set[str]) -> bool:
        return expected <= await fe.model_ids(http)

    for fe, expected in (
        (exact, {"org/flt-ns1"}),
        (prefix, {"org/flt-ns1", "org/flt-ns10"}),
        (global_, {"org/flt-ns1", "org/flt-ns10", "org/flt-other"}),
    ):
        await wait_until(
            lambda fe=fe, expected=expected: lists(fe, expected),  # type: ignore[misc]
            timeout=DEADLINE,
            message=fe.proc.describe,
        )
    assert await exact.model_ids(http) == {"org/flt-ns1"}
    assert await exact.instances(http) == {by_ns["ns1"]}
    assert {m for m in await prefix.model_ids(http) if m.startswith("org/flt")} == {
        "org/flt-ns1",
        "org/flt-ns10",
    }
    assert await prefix.instances(http, "org/flt-ns1", "org/flt-ns10") == {
        by_ns["ns1"],
        by_ns["ns10"],
    }


async def test_two_frontends_sharing_a_cache_fetch_each_blob_once(
    shared_etcd: EtcdServer,
    etcd: EtcdClient,
    http: aiohttp.ClientSession,
    procs: Procs,
    model_dirs: Callable[..., Path],
    tmp_path: Path,
) -> None:
    url = shared_etcd.client_url
    model_dir = model_dirs("shared")
    worker = await start_worker(procs, url, model_dir, "org/shared", "shared")
    cache = tmp_path / "cache"
    spawned = [
        spawn_frontend(procs, url, cache, "--namespace", "shared", name=f"fe{i}") for i in (1, 2)
    ]
    fes = [await frontend_ready(p, f, cache) for p, f in spawned]
    for fe in fes:
        await wait_until(
            lambda fe=fe: fe.model_ids(http),  # type: ignore[misc]
            timeout=DEADLINE,
            message=fe.proc.describe,
        )
        assert await fe.model_ids(http) == {"org/shared"}
    files = card_files(await published_card(etcd, worker.key))
    assert await worker.metadata_200s(http) == len(files)
    # Between them the two frontends fetched every byte exactly once.
    fetched = [await fe.metric(http, "discovery_mdc_fetched_bytes_total") for fe in fes]
    assert sum(fetched) == sum((model_dir / name).stat().st_size for name in files)
