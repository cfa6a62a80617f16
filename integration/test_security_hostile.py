"""Hostile input end to end: cards pointing at files outside any model, and ``../`` in slugs
and file names, through a real frontend process (the status server's fuzz is in
``test_status_server_fuzz.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from discovery_mdc.card import (
    CheckedFile,
    Checksum,
    ModelDeploymentCard,
    Slot,
    SlotVariant,
    from_dir,
    hash_bytes,
)
from discovery_mdc.etcd import EtcdClient
from testkit import FrontendProcess, MetaServer, envelope_kv, model_dirs, wait_until

DEADLINE = 60.0


# --------------------------------------------------------------------------- frontend


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


async def test_cards_pointing_at_files_outside_any_model_are_rejected_end_to_end(
    etcd_client: EtcdClient, frontend: FrontendProcess, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:secret\n")
    fake = Checksum("0" * 64)
    passwd_size = os.stat("/etc/passwd").st_size
    cards = [
        ModelDeploymentCard.new(
            "evil-passwd",
            model_info=Slot(
                SlotVariant.HF_CONFIG_JSON, CheckedFile("file:///etc/passwd", fake, passwd_size)
            ),
        ),
        # A bare absolute path is treated as file://, same rules.
        ModelDeploymentCard.new(
            "evil-secret",
            model_info=Slot(
                SlotVariant.HF_CONFIG_JSON,
                CheckedFile(str(secret), fake, secret.stat().st_size),
            ),
        ),
        # Right hash of a different file: the size cap and the hash both stand in the way.
        ModelDeploymentCard.new(
            "evil-shadow",
            model_info=Slot(
                SlotVariant.HF_CONFIG_JSON,
                CheckedFile("file:///etc/passwd", hash_bytes(b"{}"), 2),
            ),
        ),
    ]
    for i, card in enumerate(cards):
        await etcd_client.put(*envelope_kv(card, 0xE0 + i))
    await frontend.wait_listening()
    # Every pipeline failed at least twice (it retries): the rejection is not a fluke of timing.
    await wait_until(
        lambda: frontend.counter_at_least('discovery_mdc_pipelines_total{result="failed"}', 6),
        timeout=DEADLINE,
        message=frontend.describe,
    )
    assert await frontend.model_ids() == set()
    cache = frontend.cache_dir
    assert [p for p in files_under(cache) if "blobs" in p.parts or "by-slug" in p.parts] == []
    for p in files_under(cache):
        assert b"root:" not in p.read_bytes(), p
    log = frontend.log()
    assert "file:///etc/passwd" in log and "0" * 64 in log


async def test_dot_dot_in_slug_or_file_name_creates_nothing_outside_by_slug(
    etcd_client: EtcdClient, frontend: FrontendProcess, tmp_path: Path
) -> None:
    good_dir, good_dir2 = model_dirs(tmp_path / "models", 2)
    good = from_dir(good_dir)
    # 1. A slug with ../ never decodes (the watcher skips the key).
    key, value = envelope_kv(good, 0xA1)
    env = json.loads(value)
    env["card_json"]["slug"] = "../../../escape"
    await etcd_client.put(key, json.dumps(env).encode())
    # 2. File names that decode to ../ (or are ..) are refused before any path is built,
    #    even with the right checksum and size, served by a real server.
    body = b'{"escape": true}'
    async with MetaServer() as server:
        names = ["..%2F..%2F..%2Fescape", "%2E%2E", "a%2F..%2F..%2Fescape", "..%5Cescape"]
        for i, name in enumerate(names):
            server.files[f"/m/{name}"] = body
            card = ModelDeploymentCard.new(
                f"evil-name-{i}",
                model_info=Slot(
                    SlotVariant.HF_CONFIG_JSON,
                    CheckedFile(server.url(f"/m/{name}"), hash_bytes(body), len(body)),
                ),
            )
            await etcd_client.put(*envelope_kv(card, 0xB0 + i))
        # A good model alongside, so we know the frontend processed everything.
        await etcd_client.put(*envelope_kv(from_dir(good_dir2), 0xC1))
        await frontend.wait_listening()
        await wait_until(
            lambda: frontend.counter_at_least('discovery_mdc_pipelines_total{result="failed"}', 4),
            timeout=DEADLINE,
            message=frontend.describe,
        )
        await wait_until(lambda: frontend.lists_only("model-1"), timeout=DEADLINE)
        assert (await frontend.metrics())["discovery_mdc_malformed_cards_total"] >= 1
        assert sum(server.gets.values()) == 0  # refused before any request
    cache = frontend.cache_dir
    for p in files_under(tmp_path):
        assert "escape" not in p.name, p
    for p in (cache / "by-slug").rglob("*"):
        assert p.resolve().is_relative_to(cache.resolve()), p
    assert {p.name for p in (cache / "by-slug").iterdir()} == {good_dir2.name}
