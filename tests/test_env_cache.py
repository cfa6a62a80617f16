"""DYN_MDC_CACHE_DIR is where the frontend, ``card fetch`` and ``cache ls`` keep the cache."""

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
from discovery_mdc.card import ModelEnvelope, encode_card, encode_envelope, from_dir, mdcsum
from discovery_mdc.etcd import EtcdClient, EtcdServer

_CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "DYN_"))}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment whose HOME is empty, so the default cache root would be noticed."""
    home = tmp_path / "home"
    home.mkdir()
    return {**_CLEAN_ENV, "HOME": str(home), "DYN_MDC_CACHE_DIR": str(tmp_path / "mdc-cache")}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "discovery_mdc", *args],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip


def _assert_cached(cache: Path, model: Path, home: Path) -> None:
    card = from_dir(model)
    hexes = {f.checksum.hex for _, f in card.files()}
    assert {p.name for p in (cache / "blobs").iterdir()} == hexes
    links = cache / "by-slug" / card.slug / mdcsum(card)
    assert {p.name for p in links.iterdir()} == {Path(f.path).name for _, f in card.files()}
    assert not (home / ".cache").exists(), "the default cache root was used"


def test_cache_ls_reads_dyn_mdc_cache_dir(env: dict[str, str]) -> None:
    proc = _cli(env, "cache", "ls")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{env['DYN_MDC_CACHE_DIR']}: no cached cards"


def test_card_fetch_caches_into_dyn_mdc_cache_dir(env: dict[str, str], tmp_path: Path) -> None:
    model = write_sample_model(tmp_path / "fetch-model")
    card_file = tmp_path / "card.json"
    card_file.write_bytes(encode_card(from_dir(model)))
    proc = _cli(env, "card", "fetch", str(card_file))
    assert proc.returncode == 0, proc.stderr
    cache = Path(env["DYN_MDC_CACHE_DIR"])
    assert proc.stdout.strip().startswith(str(cache / "by-slug"))
    _assert_cached(cache, model, Path(env["HOME"]))
    listed = _cli(env, "cache", "ls")
    assert listed.returncode == 0 and "fetch-model" in listed.stdout


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "discovery_mdc", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _model_ids(url: str) -> list[str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return [m["id"] for m in json.loads(resp.read())["data"]]


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


async def test_frontend_caches_into_dyn_mdc_cache_dir(
    env: dict[str, str], tmp_path: Path, etcd: EtcdServer
) -> None:
    model = write_sample_model(tmp_path / "frontend-model")
    envelope = ModelEnvelope(
        namespace="dynamo", component="backend", endpoint="generate", instance_id=0x1F,
        card=from_dir(model),  # local paths: the frontend copies them via file://
    )  # fmt: skip
    async with EtcdClient([etcd.client_url]) as client:
        await client.put(envelope.key, encode_envelope(envelope))
    port_file = tmp_path / "port"
    proc = _spawn(
        ["frontend", "--http-port", "0", "--port-file", str(port_file)],
        {**env, "ETCD_ENDPOINTS": etcd.client_url},
    )
    try:
        deadline = time.monotonic() + 30
        models: list[str] = []
        while "frontend-model" not in models:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "frontend did not list the model within 30s"
            await asyncio.sleep(0.05)
            if not port_file.is_file() or not port_file.read_text():
                continue
            url = f"http://127.0.0.1:{port_file.read_text()}/v1/models"
            models = await asyncio.to_thread(_model_ids, url)
        _assert_cached(Path(env["DYN_MDC_CACHE_DIR"]), model, Path(env["HOME"]))
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
