"""Operator commands against real processes: ``cache rm`` and ``cache prune --older-than``
while a frontend serves the same cache, a self-hosted file name that needs encoding,
``ls --json``/``-q`` against real etcd, and ``prune``/``verify --fix`` asking on a terminal.

Every command runs as a real ``python -m discovery_mdc`` process; ``--json`` output is parsed.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from discovery_mdc.cache import CacheLayout, resolve_metadata_files
from discovery_mdc.card import encode_card, from_dir, hash_file
from discovery_mdc.etcd import EtcdClient, EtcdServer
from testkit import (
    FrontendProcess,
    Process,
    Spawn,
    backdate,
    model_dirs,
    run_cli,
    snapshot,
    wait_until,
)

DEADLINE = 60.0
DAY = 86400.0


async def cli(*argv: str, code: int | None = 0) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.to_thread(run_cli, "--log-level", "warning", *argv, timeout=DEADLINE)
    if code is not None:
        assert proc.returncode == code, (argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


async def cli_json(*argv: str) -> Any:
    return json.loads((await cli(*argv, "--json")).stdout)


def on_terminal(answer: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """The CLI with a terminal (a pty) as stdin, on which ``answer`` is typed."""
    primary, secondary = pty.openpty()
    try:
        os.write(primary, answer.encode())
        return run_cli("--log-level", "warning", *argv, stdin=secondary, timeout=DEADLINE)
    finally:
        os.close(primary)
        os.close(secondary)


async def served_files_intact(fe: FrontendProcess, expected: set[str]) -> bool:
    """The frontend lists exactly ``expected``, and every file of every listed model is in its
    cache dir with the bytes its card names."""
    if await fe.model_ids() != expected:
        return False
    for model in expected:
        status, body = await fe.get_json(f"/v1/models/{model}")
        assert status == 200, (model, body)
        paths = [path for ws in body["worker_sets"] for path in ws["files"]]
        if not await asyncio.to_thread(all, map(os.path.exists, paths)):
            return False
    return True


async def test_rm_and_prune_older_than_while_a_frontend_serves_the_same_cache(
    etcd_server: EtcdServer, procs: list[Process], spawn_worker: Spawn, tmp_path: Path
) -> None:
    etcd = etcd_server.client_url
    cache = tmp_path / "cache"
    dirs = model_dirs(tmp_path / "models", 5)
    served = {d.name for d in dirs[:2]}
    fe = FrontendProcess(etcd, tmp=tmp_path, cache_dir=cache, reconcile_interval=1.0)
    procs.append(fe)
    for d in dirs[:2]:
        spawn_worker(d)
    await fe.wait_listening()
    await wait_until(lambda: served_files_intact(fe, served), timeout=DEADLINE,
                     message=fe.describe)  # fmt: skip

    # Cards nobody serves any more, fetched earlier into the same cache and unused for 40 days.
    stale = []
    for d in dirs[2:4]:
        card_file = tmp_path / f"{d.name}.json"
        card_file.write_bytes(encode_card(from_dir(d)))
        local = Path(
            (await cli("card", "fetch", str(card_file), "--cache-dir", str(cache))).stdout.strip()
        )
        backdate(local, 40 * DAY)
        stale.append(local)
    # A served card whose links look 40 days old: the frontend marks it used again.
    listing = {
        c["id"]: c for c in (await cli_json("cache", "ls", "--cache-dir", str(cache)))["cards"]
    }
    served_dirs = [Path(c["path"]) for c in listing.values() if c["model"] in served]
    assert len(served_dirs) == 2
    backdate(served_dirs[0], 40 * DAY)

    async def refreshed() -> bool:
        doc = await cli_json("cache", "ls", "--cache-dir", str(cache))
        ages = {c["path"]: time.time() - c["last_used_unix"] for c in doc["cards"]}
        return bool(ages[str(served_dirs[0])] < 3600)

    await wait_until(refreshed, timeout=DEADLINE, message=fe.describe)

    # A new model comes up while the prune runs.
    spawn_worker(dirs[4])
    doc = await cli_json("cache", "prune", "--older-than", "30d", "-y", "--cache-dir", str(cache))
    removed = {i["path"] for i in doc["result"]["removed"] if i["kind"] == "card"}
    assert removed == {str(p) for p in stale}, doc
    assert doc["result"]["failed"] == []
    served.add(dirs[4].name)
    await wait_until(lambda: served_files_intact(fe, served), timeout=DEADLINE,
                     message=fe.describe)  # fmt: skip

    # cache rm of a served model: the frontend keeps listing it and fetches it again.
    victim = dirs[1].name
    doc = await cli_json("cache", "rm", victim, "-y", "--cache-dir", str(cache))
    assert [i["model"] for i in doc["result"]["removed"] if i["kind"] == "card"] == [victim]
    assert await fe.model_ids() == served
    await wait_until(lambda: served_files_intact(fe, served), timeout=DEADLINE,
                     message=fe.describe)  # fmt: skip
    await fe.wait_log(r"were removed while it is served; fetching them again")
    status, health = await fe.get_json("/health")
    assert status == 200 and health["models"] == len(served)
    # Whatever is cached verifies, and nothing half made is left behind.
    assert (await cli("cache", "verify", "--cache-dir", str(cache))).returncode == 0
    final = await cli_json("cache", "ls", "--cache-dir", str(cache))
    assert {c["model"] for c in final["cards"]} == served and final["incomplete"] == []
    for card in final["cards"]:
        for f in card["files"]:
            assert hash_file(Path(card["path"]) / f["name"])[0].hex == f["blake3"]


async def test_a_custom_template_named_with_a_space_is_served_and_cached_under_its_name(
    etcd_server: EtcdServer,
    etcd_client: EtcdClient,
    procs: list[Process],
    spawn_worker: Spawn,
    tmp_path: Path,
) -> None:
    etcd = etcd_server.client_url
    [model] = model_dirs(tmp_path / "models", 1)
    template = tmp_path / "my template.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    fe = FrontendProcess(etcd, tmp=tmp_path, cache_dir=tmp_path / "cache", reconcile_interval=1.0)
    procs.append(fe)
    worker = spawn_worker(model, extra_args=("--custom-template", str(template)))
    key = (await worker.wait_registered()).key
    kv = await etcd_client.get(key)
    assert kv is not None and b"/my%20template.jinja" in kv.value
    await fe.wait_listening()
    await wait_until(lambda: served_files_intact(fe, {model.name}), timeout=DEADLINE,
                     message=fe.describe)  # fmt: skip
    _, body = await fe.get_json(f"/v1/models/{model.name}")
    local = Path(body["worker_sets"][0]["local_dir"])
    assert (local / "my template.jinja").read_bytes() == template.read_bytes()


async def test_ls_json_and_quiet_against_real_etcd(
    etcd_server: EtcdServer,
    etcd_client: EtcdClient,
    procs: list[Process],
    spawn_worker: Spawn,
    tmp_path: Path,
) -> None:
    etcd = etcd_server.client_url
    [model] = model_dirs(tmp_path / "models", 1)
    worker = spawn_worker(model)
    reg = await worker.wait_registered()
    key, lease = reg.key, reg.lease
    await etcd_client.put("v1/mdc/dynamo/backend/generate/abc", b"{not json")
    await etcd_client.put("v1/mdc/stray", b"x")
    doc = await cli_json("ls", "--etcd", etcd)
    assert isinstance(doc["revision"], int)
    rows = {r["key"]: r for r in doc["cards"]}
    assert set(rows) == {key, "v1/mdc/dynamo/backend/generate/abc", "v1/mdc/stray"}
    for row in rows.values():
        assert set(row) == {"key", "namespace", "component", "endpoint", "model", "mdcsum",
                            "lease", "status", "reason", "diff"}  # fmt: skip
    ok = rows[key]
    assert (ok["status"], ok["reason"], ok["model"], ok["lease"]) == ("ok", None, model.name,
                                                                     f"{lease:x}")  # fmt: skip
    assert ok["diff"] is None
    assert (ok["namespace"], ok["component"], ok["endpoint"]) == ("dynamo", "backend", "generate")
    assert len(ok["mdcsum"]) == 64
    bad = rows["v1/mdc/dynamo/backend/generate/abc"]
    assert bad["status"] == "malformed" and bad["reason"] and bad["model"] is None
    assert rows["v1/mdc/stray"]["status"] == "not_a_card_key"
    quiet = await cli("ls", "-q", "--etcd", etcd)
    assert sorted(quiet.stdout.split()) == sorted(rows)


# --------------------------------------------------------------------------- on a terminal


@pytest.mark.parametrize(("answer", "code"), [("n\n", 1), ("y\n", 0)])
async def test_on_a_terminal_prune_and_verify_fix_ask_first(
    tmp_path: Path, answer: str, code: int
) -> None:
    cache = CacheLayout(tmp_path / "cache")
    old, new, corrupt = [
        await resolve_metadata_files(from_dir(d), cache_dir=cache.root)
        for d in model_dirs(tmp_path / "models", 3)
    ]
    assert old.local_dir is not None and corrupt.local_dir is not None
    backdate(old.local_dir, 40 * DAY)
    root = str(cache.root)

    before = snapshot(cache.root)
    proc = await asyncio.to_thread(on_terminal, answer, "cache", "prune", "--older-than", "30d",
                                   "--cache-dir", root)  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert "Delete these? [y/N]" in proc.stderr
    assert old.local_dir.exists() is bool(code)
    assert new.local_dir is not None and new.local_dir.exists()
    if code:
        assert snapshot(cache.root) == before

    _, config = next(corrupt.card.files())
    cache.blob(config.checksum.hex).write_bytes(b"garbage")
    before = snapshot(cache.root)
    proc = await asyncio.to_thread(on_terminal, answer, "cache", "verify", "--fix",
                                   "--cache-dir", root)  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert "Delete these? [y/N]" in proc.stderr
    if code:
        assert snapshot(cache.root) == before
    else:
        assert not corrupt.local_dir.exists()
        assert not cache.blob(config.checksum.hex).exists()
        assert (await cli("cache", "verify", "--cache-dir", root)).returncode == 0
