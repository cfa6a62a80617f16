"""The publisher and the ``worker`` CLI against real etcd and real worker processes:
publish, create-if-absent, graceful stop, kill -9, self-hosting, and the CLI's input errors.

One etcd serves the whole module; each test uses its own namespace, so they never interfere.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from blake3 import blake3

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import CheckedFile, ModelDeploymentCard, decode_envelope
from discovery_mdc.etcd import EtcdClient, EtcdServer, KeyExistsError
from discovery_mdc.worker import Worker
from testkit import (
    Spawn,
    child_env,
    etcd_get_prefix,
    published_card,
    run_cli,
    silent_port,
    wait_until,
)

# A generous bound for process start-up on a busy machine; not a behavioural bound.
START = 60.0


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_sample_model(tmp_path / "models" / "Tiny-Llama-1.1")


def card_files(card: ModelDeploymentCard) -> list[CheckedFile]:
    return [f for _, f in card.files()]


# ------------------------------------------------------------------ publish


async def test_published_card_is_visible_by_raw_range_with_the_spec_key_and_envelope(
    shared_etcd: EtcdServer, shared_client: EtcdClient, spawn: Spawn, model_dir: Path
) -> None:
    worker = spawn(
        "--etcd", shared_etcd.client_url, "--namespace", "pub", "--model-path", model_dir.name,
        cwd=model_dir.parent,
    )  # fmt: skip
    reg = await worker.wait_registered(timeout=START)
    assert reg.key == f"v1/mdc/pub/backend/generate/{reg.lease:x}"

    listed = etcd_get_prefix(shared_etcd.client_url, "v1/mdc/pub/")
    assert list(listed) == [reg.key]
    envelope = json.loads(listed[reg.key])
    assert list(envelope) == [
        "type", "namespace", "component", "endpoint", "instance_id", "card_json",
    ]  # fmt: skip
    assert envelope["type"] == "Model"
    assert (envelope["namespace"], envelope["component"], envelope["endpoint"]) == (
        "pub", "backend", "generate",
    )  # fmt: skip
    assert envelope["instance_id"] == reg.lease
    card = envelope["card_json"]
    # The name defaults to the dir's basename; source_path is the path as given.
    assert card["display_name"] == reg.name == "Tiny-Llama-1.1"
    assert card["slug"] == "tiny-llama-1_1"
    assert card["source_path"] == "Tiny-Llama-1.1"
    assert decode_envelope(listed[reg.key]).instance_id == reg.lease

    kv = await shared_client.get(reg.key)
    assert kv is not None and kv.lease == reg.lease and kv.version == 1
    info = await shared_client.lease_time_to_live(reg.lease)
    assert info.keys == (reg.key,)
    assert 0 < info.ttl <= info.granted_ttl == 10
    # One line names the key and the lease in hex.
    assert len(worker.registered_lines()) == 1


async def test_a_second_publish_of_the_same_key_does_not_overwrite_it(
    shared_client: EtcdClient, model_dir: Path, tmp_path: Path
) -> None:
    async with Worker(shared_client, lease_ttl=5, system_port=None, self_host_metadata=False) as w:
        first = await w.register_model(model_dir, namespace="twice")
        assert first.key is not None
        before = await shared_client.get(first.key)
        other = write_sample_model(tmp_path / "other", seed=7)
        with pytest.raises(KeyExistsError):
            await w.register_model(other, namespace="twice")
        with pytest.raises(KeyExistsError):
            await w.register_model(model_dir, namespace="twice")
        after = await shared_client.get(first.key)
        assert after == before and after is not None and after.version == 1
        assert [kv.key for kv in (await shared_client.range("v1/mdc/twice/", prefix=True)).kvs] == [
            first.key
        ]
    assert (await shared_client.range("v1/mdc/twice/", prefix=True)).kvs == ()


# ------------------------------------------------------------------ stop and kill


async def test_sigterm_revokes_the_lease_so_keys_vanish_at_once_and_exit_is_0(
    shared_etcd: EtcdServer, shared_client: EtcdClient, spawn: Spawn, model_dir: Path
) -> None:
    worker = spawn(
        "--etcd", shared_etcd.client_url, "--namespace", "stop", "--model-path", str(model_dir),
        "--instance-transport", "tcp://127.0.0.1:9999/generate",
    )  # fmt: skip
    reg = await worker.wait_registered(timeout=START)
    assert len((await shared_client.lease_time_to_live(reg.lease)).keys) == 2
    worker.signal(signal.SIGTERM)
    assert await worker.wait_exit(timeout=START) == 0

    async def gone() -> bool:
        listed = await shared_client.range("v1/", prefix=True)
        return not any("/stop/" in kv.key for kv in listed.kvs)

    await wait_until(gone, timeout=1.0, message="keys still present 1 s after a graceful stop")
    assert (await shared_client.lease_time_to_live(reg.lease)).ttl == -1
    assert f"revoked etcd lease {reg.lease:x}" in worker.log()


async def test_sigterm_stops_a_worker_still_waiting_for_etcd(spawn: Spawn, model_dir: Path) -> None:
    # An "etcd" that accepts connections and never answers: registration hangs in there.
    with silent_port() as port:
        url = f"http://127.0.0.1:{port}"
        worker = spawn("--etcd", url, "--namespace", "hang", "--model-path", str(model_dir))
        await wait_until(lambda: "self-hosting" in worker.log(), timeout=START)
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit(timeout=START) == 0
        assert "stopped before its model was registered" in worker.log()


async def test_kill_9_leaves_the_keys_to_expire_within_ttl_plus_2s(
    shared_etcd: EtcdServer, shared_client: EtcdClient, spawn: Spawn, model_dir: Path
) -> None:
    ttl = 3
    worker = spawn(
        "--etcd", shared_etcd.client_url, "--namespace", "kill", "--model-path", str(model_dir),
        "--lease-ttl", str(ttl),
    )  # fmt: skip
    reg = await worker.wait_registered(timeout=START)
    assert await shared_client.get(reg.key) is not None
    worker.signal(signal.SIGKILL)
    killed = time.monotonic()
    await worker.wait_exit(timeout=START)

    async def gone() -> bool:
        return await shared_client.get(reg.key) is None

    remaining = ttl + 2 - (time.monotonic() - killed)
    await wait_until(gone, timeout=max(0.0, remaining),
                     message=f"{reg.key} outlived TTL + 2 s after kill -9")  # fmt: skip


# ------------------------------------------------------------------ self-hosting


async def fetch(http: aiohttp.ClientSession, method: str, url: str) -> tuple[int, bytes, str]:
    async with http.request(method, url) as resp:
        return resp.status, await resp.read(), resp.headers.get("Content-Length", "")


async def test_self_hosted_card_serves_every_slot_with_its_blake3_and_length(
    shared_etcd: EtcdServer, shared_client: EtcdClient, spawn: Spawn, model_dir: Path
) -> None:
    env = child_env(DYN_SYSTEM_PORT="0", DYN_SYSTEM_HOST="127.0.0.1")
    worker = spawn(
        "--etcd", shared_etcd.client_url, "--namespace", "self", "--model-path", str(model_dir),
        env=env,
    )  # fmt: skip
    reg = await worker.wait_registered(timeout=START)
    port = worker.status_port()
    card = await published_card(shared_client, reg.key)
    files = card_files(card)
    names = sorted(f.basename for f in files)
    assert "tokenizer.json" in names and "special_tokens_map.json" in names  # an extra file
    async with aiohttp.ClientSession() as http:
        for f in files:
            assert f.path == f"http://127.0.0.1:{port}/v1/metadata/{card.slug}/{f.basename}"
            status, body, length = await fetch(http, "GET", f.path)
            assert status == 200, f.path
            assert blake3(body).hexdigest() == f.checksum.hex
            assert len(body) == f.size == int(length)
            status, head_body, head_length = await fetch(http, "HEAD", f.path)
            assert (status, head_body, head_length) == (200, b"", length)
        status, _, _ = await fetch(http, "GET", f"http://127.0.0.1:{port}/health")
        assert status == 200


async def test_self_hosting_an_hf_cache_snapshot_keeps_the_real_file_names(
    shared_etcd: EtcdServer, shared_client: EtcdClient, spawn: Spawn, tmp_path: Path
) -> None:
    import hashlib
    import os

    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--Org--Tiny"
    staging = write_sample_model(tmp_path / "staging")
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for source in sorted(staging.iterdir()):
        sha = hashlib.sha256(source.read_bytes()).hexdigest()
        (repo / "blobs" / sha).write_bytes(source.read_bytes())
        os.symlink(f"../../blobs/{sha}", snapshot / source.name)

    env = child_env(DYN_SYSTEM_PORT="0", DYN_SYSTEM_HOST="127.0.0.1", HF_HUB_CACHE=str(cache))
    worker = spawn(
        "--etcd", shared_etcd.client_url, "--namespace", "hf", "--model-path", "Org/Tiny",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    reg = await worker.wait_registered(timeout=START)
    card = await published_card(shared_client, reg.key)
    assert card.display_name == reg.name == "Org/Tiny"
    assert card.source_path == "Org/Tiny"
    urls = {f.path.rsplit("/", 1)[1]: f for f in card_files(card)}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(urls)
    async with aiohttp.ClientSession() as http:
        for f in urls.values():
            status, body, _ = await fetch(http, "GET", f.path)
            assert status == 200 and blake3(body).hexdigest() == f.checksum.hex


@pytest.mark.parametrize(
    ("extra_env", "server"),
    [({"DYN_SYSTEM_PORT": "0", "DYN_SELF_HOST_METADATA": "off"}, True), ({}, False)],
    ids=["self-host-off", "no-status-port"],
)
async def test_without_self_hosting_the_card_keeps_local_paths_and_still_publishes(
    shared_etcd: EtcdServer,
    shared_client: EtcdClient,
    spawn: Spawn,
    model_dir: Path,
    extra_env: dict[str, str],
    server: bool,
) -> None:
    env = child_env(DYN_SYSTEM_HOST="127.0.0.1", **extra_env)
    ns = "local-" + ("a" if server else "b")
    worker = spawn(
        "--etcd", shared_etcd.client_url, "--namespace", ns, "--model-path", str(model_dir),
        env=env,
    )  # fmt: skip
    reg = await worker.wait_registered(timeout=START)
    card = await published_card(shared_client, reg.key)
    for f in card_files(card):
        assert f.path == str(model_dir / f.basename)
    skipped = [ln for ln in worker.log().splitlines() if "self-hosting" in ln]
    if server:
        assert skipped == []
        async with aiohttp.ClientSession() as http:
            port = worker.status_port()
            status, _, _ = await fetch(http, "GET", f"http://127.0.0.1:{port}/health")
            assert status == 200
    else:
        assert len(skipped) == 1 and " INFO " in skipped[0] and "skipped" in skipped[0]
        assert "status server listening" not in worker.log()


# ------------------------------------------------------------------ CLI input errors


def run_worker(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("worker", *args, cwd=cwd, timeout=START)


def test_help_lists_the_options() -> None:
    done = run_worker("--help")
    assert done.returncode == 0
    for flag in ("--model-path", "--model-name", "--namespace", "--component", "--endpoint",
                 "--etcd", "--lease-ttl", "--no-self-host"):  # fmt: skip
        assert flag in done.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--model-path", "m", "--bogus"],
        [],  # --model-path is required
        ["--model-path", "m", "--lease-ttl", "0"],
        ["--model-path", "m", "--lease-ttl", "ten"],
        ["--model-path", "m", "--system-port", "70000"],
    ],
    ids=["unknown-flag", "missing-model-path", "ttl-zero", "ttl-text", "port-range"],
)
def test_bad_flags_exit_2_with_one_line(args: list[str]) -> None:
    done = run_worker(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], done.stderr


def test_a_bad_model_path_exits_2_with_one_line_before_contacting_etcd(tmp_path: Path) -> None:
    # The endpoint is unreachable: the model path must be rejected first.
    for bad in [str(tmp_path / "absent"), str(tmp_path)]:
        done = run_worker("--etcd", "http://127.0.0.1:9", "--model-path", bad)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("discovery-mdc: error:"), done.stderr
        assert bad in lines[0] or "config.json" in lines[0]
