"""`card fetch` and `cache ls|verify|prune` through the real CLI entry point."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from discovery_mdc import cli
from discovery_mdc.cache import CacheLayout, plan_prune, resolve_metadata_files, scan_cache
from discovery_mdc.cache._store import forget_verified
from discovery_mdc.card import CheckedFile, ModelDeploymentCard, encode_card, from_dir


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYN_MDC_CACHE_DIR", raising=False)
    forget_verified()


@pytest.fixture
def cache(tmp_path: Path) -> CacheLayout:
    return CacheLayout(tmp_path / "cache")


def run(*argv: str) -> int:
    return cli.main(list(argv))


def write_card(path: Path, card: ModelDeploymentCard) -> Path:
    path.write_bytes(encode_card(card))
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its link target or content."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p)] = p.read_bytes().hex()
        else:
            out[str(p)] = "dir"
    return out


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- card fetch


def test_card_fetch_prints_the_local_dir(
    make_model_dir: Callable[..., Path],
    cache: CacheLayout,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    card = from_dir(make_model_dir())
    path = write_card(tmp_path / "card.json", card)
    assert run("card", "fetch", str(path), "--cache-dir", str(cache.root)) == 0
    local = Path(capsys.readouterr().out.strip())
    assert local.parent.parent == cache.by_slug
    assert sorted(p.name for p in local.iterdir()) == sorted(f.basename for _, f in card.files())


def test_card_fetch_accepts_an_envelope(
    make_model_dir: Callable[..., Path], cache: CacheLayout, tmp_path: Path
) -> None:
    card_json = json.loads(encode_card(from_dir(make_model_dir())))
    envelope = {
        "type": "Model",
        "namespace": "dynamo",
        "component": "backend",
        "endpoint": "generate",
        "instance_id": 2**63 + 5,
        "card_json": card_json,
    }
    path = tmp_path / "env.json"
    path.write_text(json.dumps(envelope))
    assert run("card", "fetch", str(path), "--cache-dir", str(cache.root)) == 0


def test_card_fetch_bad_input_exits_2(
    tmp_path: Path, cache: CacheLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert run("card", "fetch", str(bad), "--cache-dir", str(cache.root)) == 2
    assert run("card", "fetch", str(tmp_path / "missing.json")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2


def test_card_fetch_unsafe_name_exits_2(
    make_model_dir: Callable[..., Path], tmp_path: Path, cache: CacheLayout
) -> None:
    card = from_dir(make_model_dir()).with_paths(lambda _, f: "http://127.0.0.1:9/%2E%2E")
    assert (
        run(
            "card",
            "fetch",
            str(write_card(tmp_path / "c.json", card)),
            "--cache-dir",
            str(cache.root),
        )
        == 2
    )
    assert not cache.blobs.exists() or not list(cache.blobs.iterdir())


def test_card_fetch_failure_exits_1_with_one_line(
    make_model_dir: Callable[..., Path],
    tmp_path: Path,
    cache: CacheLayout,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = make_model_dir()
    card = from_dir(model)
    (model / "config.json").write_text("{}")  # the file no longer matches the card
    path = write_card(tmp_path / "c.json", card)
    assert (
        run("--log-level", "error", "card", "fetch", str(path), "--cache-dir", str(cache.root)) == 1
    )
    err = [line for line in capsys.readouterr().err.splitlines() if "discovery-mdc: error" in line]
    assert len(err) == 1 and "checksum mismatch" in err[0]


# --------------------------------------------------------------------------- ls / verify


def test_cache_ls_lists_cards_files_and_sizes(
    make_model_dir: Callable[..., Path], cache: CacheLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    card = from_dir(make_model_dir("ls-model"))
    resolved = asyncio.run(resolve_metadata_files(card, cache_dir=cache.root))
    capsys.readouterr()
    assert run("cache", "ls", "--cache-dir", str(cache.root)) == 0
    out = capsys.readouterr().out
    assert "ls-model" in out and resolved.mdcsum in out and "last used" in out
    for _, f in card.files():
        assert f.basename in out and f.checksum.hex in out


def test_cache_ls_of_a_missing_cache_is_empty(
    cache: CacheLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("cache", "ls", "--cache-dir", str(cache.root)) == 0
    assert "no cached cards" in capsys.readouterr().out


def test_cache_verify_reports_corrupt_blobs(
    make_model_dir: Callable[..., Path], cache: CacheLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    card = from_dir(make_model_dir())
    asyncio.run(resolve_metadata_files(card, cache_dir=cache.root))
    assert run("cache", "verify", "--cache-dir", str(cache.root)) == 0
    _, config = next(card.files())
    cache.blob(config.checksum.hex).write_bytes(b"garbage")
    assert run("cache", "verify", "--cache-dir", str(cache.root)) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {cache.blob(config.checksum.hex)}" in out


def test_cache_dir_defaults_to_env(
    make_model_dir: Callable[..., Path],
    cache: CacheLayout,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DYN_MDC_CACHE_DIR", str(cache.root))
    asyncio.run(resolve_metadata_files(from_dir(make_model_dir("env-model"))))
    assert run("cache", "ls") == 0
    assert "env-model" in capsys.readouterr().out


# --------------------------------------------------------------------------- prune


@pytest.fixture
def messy_cache(make_model_dir: Callable[..., Path], cache: CacheLayout) -> ModelDeploymentCard:
    """A cache with a live card, a card whose blob vanished (broken link), blobs of a card
    whose links were removed (unreferenced), a dead writer's temp file and a live one."""
    keep = from_dir(make_model_dir("keep", seed=1))
    broken = from_dir(make_model_dir("broken", seed=2))
    orphan = from_dir(make_model_dir("orphan", seed=3))
    for card in (keep, broken, orphan):
        asyncio.run(resolve_metadata_files(card, cache_dir=cache.root))
    _, tok = list(broken.files())[1]
    cache.blob(tok.checksum.hex).unlink()
    orphan_dir = next(cache.by_slug.glob("orphan/*"))
    for link in orphan_dir.iterdir():
        link.unlink()
    orphan_dir.rmdir()
    (cache.tmp / f"{'d' * 64}.{dead_pid()}.{uuid.uuid4().hex}.part").write_bytes(b"x" * 10)
    (cache.tmp / f"{'e' * 64}.{os.getpid()}.{uuid.uuid4().hex}.part").write_bytes(b"y" * 10)
    return keep


def test_prune_dry_run_changes_nothing(
    messy_cache: ModelDeploymentCard, cache: CacheLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(cache.root)
    assert run("cache", "prune", "--dry-run", "--cache-dir", str(cache.root)) == 0
    assert snapshot(cache.root) == before
    out = capsys.readouterr().out
    assert "to free" in out and "broken link" in out and "no link refers to it" in out


def test_prune_without_yes_on_a_non_tty_changes_nothing(
    messy_cache: ModelDeploymentCard,
    cache: CacheLayout,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    before = snapshot(cache.root)
    assert run("cache", "prune", "--cache-dir", str(cache.root)) == 0
    assert snapshot(cache.root) == before
    assert "pass -y" in capsys.readouterr().out


def test_prune_yes_removes_exactly_the_plan(
    messy_cache: ModelDeploymentCard, cache: CacheLayout
) -> None:
    plan = plan_prune(scan_cache(cache))
    kinds = sorted({i.kind for i in plan.items})
    assert kinds == ["blob", "dir", "link", "temp"]
    planned = {str(i.path) for i in plan.items}
    before = snapshot(cache.root)
    assert run("cache", "prune", "-y", "--cache-dir", str(cache.root)) == 0
    after = snapshot(cache.root)
    assert set(before) - set(after) == planned
    assert all(after[p] == before[p] for p in after)
    # The live card is intact and still verifies; the live writer's temp file is kept.
    assert run("cache", "verify", "--cache-dir", str(cache.root)) == 0
    assert len(list(cache.tmp.iterdir())) == 1
    resolved = asyncio.run(resolve_metadata_files(messy_cache, cache_dir=cache.root))
    assert all(Path(f.path).is_file() for _, f in resolved.card.files())
    # A second prune finds nothing.
    assert plan_prune(scan_cache(cache)).empty


def test_prune_of_legacy_in_place_paths_is_not_touched(
    make_model_dir: Callable[..., Path], cache: CacheLayout
) -> None:
    model = make_model_dir()
    legacy = from_dir(model).map_files(lambda _, f: CheckedFile(f.path, f.checksum))
    resolved = asyncio.run(resolve_metadata_files(legacy, cache_dir=cache.root))
    assert resolved.in_place and resolved.local_dir == model
    assert run("cache", "prune", "-y", "--cache-dir", str(cache.root)) == 0
    assert (model / "config.json").is_file()
