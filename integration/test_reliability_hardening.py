"""Hardening (issue 18): keys deleted behind a live lease, model dirs that would publish cards
no frontend accepts, symlinks out of the model, slowloris on the status server, signals while
hashing, and unreadable model files. Real etcd, real worker and frontend processes."""

from __future__ import annotations

import asyncio
import ctypes
import os
import resource
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import ModelDeploymentCard
from discovery_mdc.etcd import EtcdClient, EtcdServer, find_etcd_binary
from testkit import (
    FrontendProcess,
    Spawn,
    WorkerProcess,
    child_env,
    parse_metrics,
    published_card,
    run_cli,
    wait_until,
)

START = 60.0
FRONTEND_CEILING = 1 << 30  # the largest metadata file a frontend accepts


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


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
    etcd_server: EtcdServer, spawn: Spawn, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    model = write_sample_model(tmp_path / "models" / "deleted-model")
    ttl = 3  # keys are checked every 3 keepalives, i.e. about once per TTL
    worker = spawn(
        "--etcd", etcd_server.client_url, "--model-path", str(model), "--lease-ttl", str(ttl),
        "--instance-transport", "tcp://127.0.0.1:9/generate",
        env=child_env(DYN_SYSTEM_PORT="0", DYN_SYSTEM_HOST="127.0.0.1"),
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
        frontend.stop()


# --------------------------------------------------------------------------- helpers


def file_permissions_apply() -> None:
    """``preexec_fn``: the child cannot bypass file permissions, even as root, so a file with
    mode 000 is really unreadable to it (root keeps every other capability)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_worker(
    etcd: str, model: Path, *, unprivileged: bool = False
) -> subprocess.CompletedProcess[str]:
    """A worker that is expected to exit by itself (bad input)."""
    return run_cli(
        "worker", "--etcd", etcd, "--model-path", str(model), timeout=START,
        preexec_fn=file_permissions_apply if unprivileged else None,
    )  # fmt: skip


def leases(etcd: str) -> list[str]:
    lines = etcdctl(etcd, "lease", "list").splitlines()
    return [ln for ln in lines[1:] if ln.strip()]  # after "found N leases"


async def publish(
    spawn: Spawn,
    etcd: EtcdServer,
    model: Path,
    preexec_fn: Callable[[], None] | None = None,
) -> tuple[WorkerProcess, ModelDeploymentCard]:
    """A self-hosting worker for ``model``, once registered, and the card it published."""
    worker = spawn(
        "--etcd", etcd.client_url, "--model-path", str(model),
        env=child_env(DYN_SYSTEM_PORT="0", DYN_SYSTEM_HOST="127.0.0.1"), preexec_fn=preexec_fn,
    )  # fmt: skip
    reg = await worker.wait_registered(timeout=START)
    async with EtcdClient([etcd.client_url]) as client:
        return worker, await published_card(client, reg.key)


def extra_names(card: ModelDeploymentCard) -> set[str]:
    return {f.basename for f in card.extra_files}


def assert_one_line_exit_2(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("discovery-mdc: error:"), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- item 3


async def test_stray_non_json_extra_and_huge_non_weight_files_still_list_the_model(
    etcd_server: EtcdServer, spawn: Spawn, tmp_path: Path
) -> None:
    model = write_sample_model(tmp_path / "models" / "odd-model")
    (model / "results.json").write_text("accuracy: 0.93  (not JSON)\n")
    for name in ("model.onnx_data", "model.ckpt"):
        with (model / name).open("wb") as fh:  # sparse: no disk, no hashing needed
            fh.truncate(FRONTEND_CEILING + (100 << 20))
    (model / "small.nemo").write_bytes(b"a small non-weight file")
    worker, card = await publish(spawn, etcd_server, model)
    assert {"results.json", "small.nemo"} <= extra_names(card)
    assert not {"model.onnx_data", "model.ckpt"} & extra_names(card)
    for name in ("model.onnx_data", "model.ckpt"):
        assert f"not publishing extra file {model / name}: " in worker.log()
    frontend = FrontendProcess(etcd_server.client_url, tmp=tmp_path / "fe")
    try:
        await frontend.wait_listening()
        await wait_until(lambda: frontend.model_ids(), timeout=START, message=frontend.describe)
        assert await frontend.model_ids() == {"odd-model"}
    finally:
        frontend.stop()


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("tokenizer.json", b"", "is empty"),
        ("tokenizer_config.json", b"{not json", "is not valid JSON"),
        ("generation_config.json", b"[1, 2", "is not valid JSON"),
    ],
    ids=["empty-tokenizer", "bad-tokenizer-config", "bad-generation-config"],
)
def test_a_typed_json_file_no_frontend_can_parse_is_refused_before_any_lease(
    etcd_server: EtcdServer, tmp_path: Path, name: str, content: bytes, needle: str
) -> None:
    model = write_sample_model(tmp_path / "models" / "broken")
    (model / name).write_bytes(content)
    done = run_worker(etcd_server.client_url, model)
    assert_one_line_exit_2(done, str(model / name), needle)
    assert leases(etcd_server.client_url) == []


# --------------------------------------------------------------------------- item 5


async def test_symlinks_out_of_the_model_are_never_published_or_served(
    etcd_server: EtcdServer, spawn: Spawn, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    model = write_sample_model(tmp_path / "models" / "linked")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.txt").write_text("s3cr3t\n")
    os.symlink("/etc/passwd", model / "passwd")
    os.symlink(outside / "secret.txt", model / "secret.txt")
    os.symlink("../../elsewhere/secret.txt", model / "relative-secret.txt")
    (model / "notes.txt").write_text("inside\n")
    os.symlink("notes.txt", model / "notes-link.txt")  # stays inside: fine
    worker, card = await publish(spawn, etcd_server, model)
    assert {"notes.txt", "notes-link.txt"} <= extra_names(card)
    assert not {"passwd", "secret.txt", "relative-secret.txt"} & extra_names(card)
    base = f"http://127.0.0.1:{worker.status_port()}/v1/metadata/{card.slug}"
    for name in ("passwd", "secret.txt", "relative-secret.txt"):
        assert f"not publishing extra file {model / name}: it resolves to" in worker.log()
        async with http.get(f"{base}/{name}") as resp:
            assert resp.status == 404
            assert b"s3cr3t" not in await resp.read()
    async with http.get(f"{base}/notes-link.txt") as resp:
        assert resp.status == 200 and await resp.read() == b"inside\n"


def test_a_typed_slot_linking_out_of_the_model_is_refused_before_any_lease(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    model = write_sample_model(tmp_path / "models" / "linked-config")
    real = tmp_path / "shared" / "config.json"
    real.parent.mkdir()
    (model / "config.json").rename(real)
    os.symlink(real, model / "config.json")
    done = run_worker(etcd_server.client_url, model)
    assert_one_line_exit_2(done, str(model / "config.json"), "outside the model")
    assert leases(etcd_server.client_url) == []


# ------------------------------------------------------- unreadable files: exit 2 or skip


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_an_unreadable_config_or_tokenizer_is_exit_2_with_one_line_before_any_lease(
    etcd_server: EtcdServer, tmp_path: Path, name: str
) -> None:
    model = write_sample_model(tmp_path / "models" / "unreadable")
    (model / name).chmod(0)
    done = run_worker(etcd_server.client_url, model, unprivileged=True)
    assert_one_line_exit_2(done, f"cannot read {model / name}", "Permission denied")
    assert leases(etcd_server.client_url) == []


async def test_an_unreadable_optional_extra_file_is_skipped_with_a_warning(
    etcd_server: EtcdServer, spawn: Spawn, tmp_path: Path
) -> None:
    model = write_sample_model(tmp_path / "models" / "unreadable-extra")
    (model / "private.txt").write_text("no\n")
    (model / "private.txt").chmod(0)
    (model / "public.txt").write_text("yes\n")
    worker, card = await publish(spawn, etcd_server, model, file_permissions_apply)
    assert "public.txt" in extra_names(card) and "private.txt" not in extra_names(card)
    warning = next(ln for ln in worker.log().splitlines() if "private.txt" in ln)
    assert "WARNING" in warning and "cannot read it: Permission denied" in warning


# --------------------------------------------------------------------------- item 9


def open_files(pid: int) -> list[str]:
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.append(os.readlink(fd))
        except OSError:
            continue  # closed meanwhile
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_while_hashing_large_extra_files_stops_the_worker_at_once(
    etcd_server: EtcdServer, spawn: Spawn, tmp_path: Path, sig: signal.Signals
) -> None:
    model = write_sample_model(tmp_path / "models" / "big-model")
    # 200 sparse extras just under the ceiling: ~195 GiB to hash, far more than the deadline
    # below allows at any hashing speed, and no disk used.
    for i in range(200):
        with (model / f"big-{i:03d}.data").open("wb") as fh:
            fh.truncate(FRONTEND_CEILING - (24 << 20))
    worker = spawn(
        "--etcd",
        etcd_server.client_url,
        "--model-path",
        str(model),
        env=child_env(DYN_SYSTEM_PORT="0", DYN_SYSTEM_HOST="127.0.0.1"),
    )

    def hashing() -> bool:
        return any(Path(p).name.startswith("big-") for p in open_files(worker.pid))

    await wait_until(hashing, timeout=START, message=worker.describe)
    worker.signal(sig)
    assert await worker.wait_exit(timeout=10) == 0
    assert "stopped before its model was registered" in worker.log()
    assert "Traceback" not in worker.log()
    assert leases(etcd_server.client_url) == []


# --------------------------------------------------------------------------- item 7


def limit_fds_to_1024() -> None:
    """``preexec_fn``: ``ulimit -n 1024`` for the child."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Let this test process hold a few thousand sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    assert want >= 2048, f"RLIMIT_NOFILE hard limit {hard} is too low for this test"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_slowloris_does_not_starve_real_clients_or_fill_the_log_with_emfile(
    etcd_server: EtcdServer,
    spawn: Spawn,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    many_fds: None,
) -> None:
    model = write_sample_model(tmp_path / "models" / "slowloris")
    worker, card = await publish(spawn, etcd_server, model, limit_fds_to_1024)
    assert card.model_info is not None
    url = card.model_info.file.path
    port = worker.status_port()
    expected = (model / "config.json").read_bytes()

    # 1,100 connections that send half a request head and then nothing, more than the
    # worker may hold open under `ulimit -n 1024`.
    stalled: list[asyncio.StreamWriter] = []
    head = f"GET /v1/metadata/{card.slug}/config.json HTTP/1.1\r\nHost: x\r\n".encode()
    try:
        for _ in range(1100):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            stalled.append(writer)
        await asyncio.gather(*(w.drain() for w in stalled))

        # Real clients, each on a new connection, are answered during the attack.
        fresh = aiohttp.TCPConnector(force_close=True)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=fresh, timeout=timeout) as client:
            for _ in range(20):
                async with client.get(url) as resp:
                    assert resp.status == 200 and await resp.read() == expected
                async with client.get(f"http://127.0.0.1:{port}/health") as resp:
                    assert resp.status == 200
        metrics = await worker_metrics(http, worker)
        closed = 'discovery_mdc_status_connections_closed_total{reason="evicted"}'
        assert metrics[closed] >= 1100 - 1024, metrics
        assert metrics["discovery_mdc_status_connections"] < 1024
    finally:
        for w in stalled:
            w.close()
    log_text = worker.log()
    for needle in ("Too many open files", "EMFILE", "out of system resource"):
        assert needle not in log_text, worker.describe()
    assert worker.alive
