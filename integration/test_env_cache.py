"""DYN_MDC_CACHE_DIR is where the frontend, ``card fetch`` and ``cache ls`` keep the cache (real
processes; the frontend on real etcd)."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from pathlib import Path

import pytest

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import ModelEnvelope, encode_card, encode_envelope, from_dir, mdcsum
from discovery_mdc.etcd import EtcdClient, EtcdServer
from testkit import CliProcess, Process, child_env, run_cli, wait_until


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment whose HOME is empty, so the default cache root would be noticed."""
    home = tmp_path / "home"
    home.mkdir()
    return child_env(HOME=str(home), DYN_MDC_CACHE_DIR=str(tmp_path / "mdc-cache"))


def _assert_cached(cache: Path, model: Path, home: Path) -> None:
    card = from_dir(model)
    hexes = {f.checksum.hex for _, f in card.files()}
    assert {p.name for p in (cache / "blobs").iterdir()} == hexes
    links = cache / "by-slug" / card.slug / mdcsum(card)
    assert {p.name for p in links.iterdir()} == {Path(f.path).name for _, f in card.files()}
    assert not (home / ".cache").exists(), "the default cache root was used"


def test_cache_ls_reads_dyn_mdc_cache_dir(env: dict[str, str]) -> None:
    proc = run_cli("cache", "ls", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{env['DYN_MDC_CACHE_DIR']}: no cached cards"


def test_card_fetch_caches_into_dyn_mdc_cache_dir(env: dict[str, str], tmp_path: Path) -> None:
    model = write_sample_model(tmp_path / "fetch-model")
    card_file = tmp_path / "card.json"
    card_file.write_bytes(encode_card(from_dir(model)))
    proc = run_cli("card", "fetch", str(card_file), env=env)
    assert proc.returncode == 0, proc.stderr
    cache = Path(env["DYN_MDC_CACHE_DIR"])
    assert proc.stdout.strip().startswith(str(cache / "by-slug"))
    _assert_cached(cache, model, Path(env["HOME"]))
    listed = run_cli("cache", "ls", env=env)
    assert listed.returncode == 0 and "fetch-model" in listed.stdout


async def test_frontend_caches_into_dyn_mdc_cache_dir(
    env: dict[str, str], tmp_path: Path, etcd_server: EtcdServer, procs: list[Process]
) -> None:
    model = write_sample_model(tmp_path / "frontend-model")
    envelope = ModelEnvelope(
        namespace="dynamo", component="backend", endpoint="generate", instance_id=0x1F,
        card=from_dir(model),  # local paths: the frontend copies them via file://
    )  # fmt: skip
    async with EtcdClient([etcd_server.client_url]) as client:
        await client.put(envelope.key, encode_envelope(envelope))
    port_file = tmp_path / "port"
    fe = CliProcess(
        ["frontend", "--http-port", "0", "--port-file", str(port_file)],
        log_path=tmp_path / "frontend.log",
        env={**env, "ETCD_ENDPOINTS": etcd_server.client_url},
    )
    procs.append(fe)

    def model_ids() -> list[str]:
        port = port_file.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
            return [m["id"] for m in json.loads(resp.read())["data"]]

    await wait_until(lambda: asyncio.to_thread(model_ids), timeout=30, message=fe.describe, proc=fe)
    assert await asyncio.to_thread(model_ids) == ["frontend-model"]
    _assert_cached(Path(env["DYN_MDC_CACHE_DIR"]), model, Path(env["HOME"]))
    fe.signal(signal.SIGTERM)
    assert await fe.wait_exit(timeout=30) == 0, fe.describe()
