"""`card fetch` and `cache ls|verify|prune|rm` through the real CLI (a `python -m
discovery_mdc` process; `--json` output is parsed, not grepped)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from discovery_mdc import cli
from discovery_mdc.cache import (
    CacheLayout,
    ResolvedCard,
    plan_prune,
    resolve_metadata_files,
    scan_cache,
)
from discovery_mdc.cache._store import remove_link_dir
from discovery_mdc.card import CheckedFile, ModelDeploymentCard, encode_card, from_dir
from discovery_mdc.errors import ChecksumMismatchError
from testkit import backdate, snapshot

DAY = 86400.0


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DYN_MDC_CACHE_DIR", "DYN_LOGGING_JSONL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdin is not a terminal, whatever pytest was started from (as a piped CLI run)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


def cli_main(*argv: str) -> subprocess.CompletedProcess[str]:
    """The CLI entry point in this process (stdin is not a terminal: ``_no_terminal``)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["--log-level", "warning", *argv])
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def cli_json(*argv: str, code: int = 0) -> Any:
    proc = cli_main(*argv, "--json")
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    return json.loads(proc.stdout)


def write_card(path: Path, card: ModelDeploymentCard) -> Path:
    path.write_bytes(encode_card(card))
    return path


def resolve(card: ModelDeploymentCard, cache: CacheLayout) -> ResolvedCard:
    return asyncio.run(resolve_metadata_files(card, cache_dir=cache.root))


def linked_hexes(card_dir: Path) -> set[str]:
    """The blobs a card directory's links point at."""
    return {Path(os.readlink(link)).name for link in card_dir.iterdir()}


def dead_pid() -> int:
    """A PID no process has: above the kernel's highest."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def cards_by_id(cache: CacheLayout) -> dict[str, Any]:
    return {c["id"]: c for c in cli_json("cache", "ls", "--cache-dir", str(cache.root))["cards"]}


# --------------------------------------------------------------------------- card fetch


def test_card_fetch_prints_the_local_dir_or_json(
    make_model_dir: Callable[..., Path], cache: CacheLayout, tmp_path: Path
) -> None:
    card = from_dir(make_model_dir())
    path = write_card(tmp_path / "card.json", card)
    proc = cli_main("card", "fetch", str(path), "--cache-dir", str(cache.root))
    assert proc.returncode == 0, proc.stderr
    local = Path(proc.stdout.strip())
    assert local.parent.parent == cache.by_slug
    assert sorted(p.name for p in local.iterdir()) == sorted(f.basename for _, f in card.files())
    doc = cli_json("card", "fetch", str(path), "--cache-dir", str(cache.root))
    assert set(doc) == {"model", "slug", "mdcsum", "local_dir", "in_place", "files"}
    assert (doc["model"], doc["slug"], doc["local_dir"]) == ("sample-model", "sample-model",
                                                             str(local))  # fmt: skip
    assert local.name == doc["mdcsum"] and doc["in_place"] is False
    expected = {slot: (f.basename, f.checksum.hex, f.size) for slot, f in card.files()}
    assert {f["slot"]: (f["name"], f["blake3"], f["size"]) for f in doc["files"]} == expected
    assert all(Path(f["path"]).parent == local for f in doc["files"])


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
    assert cli.main(["card", "fetch", str(path), "--cache-dir", str(cache.root)]) == 0


def test_card_fetch_bad_input_exits_2(
    tmp_path: Path, cache: CacheLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert cli.main(["card", "fetch", str(bad), "--cache-dir", str(cache.root)]) == 2
    assert cli.main(["card", "fetch", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2


def test_card_fetch_unsafe_name_exits_2(
    make_model_dir: Callable[..., Path], tmp_path: Path, cache: CacheLayout
) -> None:
    card = from_dir(make_model_dir()).with_paths(lambda _, f: "http://127.0.0.1:9/%2E%2E")
    path = write_card(tmp_path / "c.json", card)
    assert cli.main(["card", "fetch", str(path), "--cache-dir", str(cache.root)]) == 2
    assert not cache.blobs.exists() or not list(cache.blobs.iterdir())


def test_card_fetch_failure_exits_1_with_one_line(
    make_model_dir: Callable[..., Path], tmp_path: Path, cache: CacheLayout
) -> None:
    model = make_model_dir()
    card = from_dir(model)
    (model / "config.json").write_text("{}")  # the file no longer matches the card
    proc = cli_main("card", "fetch", str(write_card(tmp_path / "c.json", card)),
                   "--cache-dir", str(cache.root))  # fmt: skip
    assert proc.returncode == 1
    err = [line for line in proc.stderr.splitlines() if "discovery-mdc: error" in line]
    assert len(err) == 1 and "checksum mismatch" in err[0]


# --------------------------------------------------------------------------- cache hygiene


def test_a_card_that_never_verifies_leaves_no_card_directory(
    make_model_dir: Callable[..., Path], cache: CacheLayout
) -> None:
    model = make_model_dir("never")
    card = from_dir(model)
    (model / "tokenizer_config.json").write_text("{}")  # one of the files no longer verifies
    with pytest.raises(ChecksumMismatchError):
        resolve(card, cache)
    # The files that did verify are cached as blobs, but no by-slug/<slug>/<mdcsum>/ with
    # some of the files exists: `cache ls` shows no card, and no staging dir is left.
    assert list(cache.by_slug.rglob("*")) in ([], [cache.by_slug / "never"])
    assert len(list(cache.blobs.iterdir())) == len(list(card.files())) - 1
    doc = cli_json("cache", "ls", "--cache-dir", str(cache.root))
    assert doc["cards"] == [] and doc["incomplete"] == []
    # prune cleans up after it: the orphaned blobs and the empty model dir go.
    assert cli_main("cache", "prune", "-y", "--cache-dir", str(cache.root)).returncode == 0
    assert list(cache.blobs.iterdir()) == [] and list(cache.by_slug.iterdir()) == []


def test_a_staging_dir_left_by_a_killed_process_is_incomplete_and_pruned(
    make_model_dir: Callable[..., Path], cache: CacheLayout
) -> None:
    card = from_dir(make_model_dir("killed"))
    done = resolve(card, cache)
    assert done.local_dir is not None
    # What a frontend killed between its 4th and 5th link leaves: a staging dir.
    staging = done.local_dir.parent / f".tmp-card.{done.mdcsum}.{dead_pid()}.{uuid.uuid4().hex}"
    done.local_dir.rename(staging)
    next(staging.iterdir()).unlink()
    doc = cli_json("cache", "ls", "--cache-dir", str(cache.root))
    assert doc["cards"] == []
    [inc] = doc["incomplete"]
    assert (inc["path"], inc["model"], inc["mdcsum"]) == (str(staging), "killed", done.mdcsum)
    assert inc["owner_alive"] is False
    plan = cli_json("cache", "prune", "--dry-run", "--cache-dir", str(cache.root))
    assert [i["kind"] for i in plan["items"]].count("incomplete") == 1
    result = cli_json("cache", "prune", "-y", "--cache-dir", str(cache.root))["result"]
    assert {i["kind"] for i in result["removed"]} == {"incomplete", "blob", "dir"}
    assert not staging.exists() and list(cache.blobs.iterdir()) == []
    # And the card resolves again from scratch.
    assert resolve(card, cache).local_dir == done.local_dir


def test_prune_removes_a_card_with_a_broken_link_as_a_whole(
    make_model_dir: Callable[..., Path], cache: CacheLayout
) -> None:
    broken = from_dir(make_model_dir("broken", seed=2))
    keep = from_dir(make_model_dir("keep", seed=1))
    bad = resolve(broken, cache)
    resolve(keep, cache)
    _, tok = list(broken.files())[1]
    cache.blob(tok.checksum.hex).unlink()
    assert cards_by_id(cache)[f"broken/{bad.mdcsum}"]["broken"] is True
    doc = cli_json("cache", "prune", "-y", "--cache-dir", str(cache.root))
    removed = {(i["kind"], i["path"]) for i in doc["result"]["removed"]}
    assert ("card", str(bad.local_dir)) in removed
    assert not (cache.by_slug / "broken").exists()  # never a card dir with 4 of 5 links
    assert list(cards_by_id(cache)) == [f"keep/{resolve(keep, cache).mdcsum}"]


# --------------------------------------------------------------------------- ls / verify


def test_cache_ls_table_quiet_and_json(
    make_model_dir: Callable[..., Path], cache: CacheLayout
) -> None:
    card = from_dir(make_model_dir("ls-model"))
    resolved = resolve(card, cache)
    proc = cli_main("cache", "ls", "--cache-dir", str(cache.root))
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["ID", "FILES", "SIZE", "LAST", "USED"]
    ident = f"ls-model/{resolved.mdcsum}"
    assert lines[1].split()[0] == ident
    for _, f in card.files():
        assert any(f.basename in line and f.checksum.hex in line for line in lines)
    quiet = cli_main("cache", "ls", "-q", "--cache-dir", str(cache.root))
    assert quiet.stdout.splitlines() == [ident]
    doc = cli_json("cache", "ls", "--cache-dir", str(cache.root))
    assert set(doc) == {"cache_dir", "cards", "incomplete", "blobs", "size_on_disk", "warnings"}
    [entry] = doc["cards"]
    assert set(entry) == {"id", "model", "mdcsum", "path", "size", "last_used",
                          "last_used_unix", "broken", "files"}  # fmt: skip
    assert (entry["id"], entry["model"], entry["mdcsum"]) == (ident, "ls-model", resolved.mdcsum)
    assert entry["path"] == str(resolved.local_dir) and entry["broken"] is False
    assert entry["size"] == sum(f.size or 0 for _, f in card.files())
    assert entry["last_used"].endswith("Z") and abs(entry["last_used_unix"] - time.time()) < 120
    assert sorted((f["name"], f["blake3"]) for f in entry["files"]) == sorted(
        (f.basename, f.checksum.hex) for _, f in card.files()
    )
    assert doc["blobs"] == len(list(card.files())) and doc["cache_dir"] == str(cache.root)


def test_cache_ls_of_a_missing_cache_is_empty(cache: CacheLayout) -> None:
    assert "no cached cards" in cli_main("cache", "ls", "--cache-dir", str(cache.root)).stdout
    assert cli_json("cache", "ls", "--cache-dir", str(cache.root))["cards"] == []


def test_last_used_is_the_last_resolve_not_a_dir_mtime_prune_moves(
    make_model_dir: Callable[..., Path], cache: CacheLayout
) -> None:
    card = from_dir(make_model_dir("used"))
    resolved = resolve(card, cache)
    assert resolved.local_dir is not None
    when = backdate(resolved.local_dir, 40 * DAY)
    # A dead writer's temp link in the card dir: prune removes it, which moves the dir's mtime.
    stray = resolved.local_dir / f".tmp-link.{dead_pid()}.{uuid.uuid4().hex}"
    os.symlink("nowhere", stray)
    os.utime(resolved.local_dir, (when, when))
    assert cli_main("cache", "prune", "-y", "--cache-dir", str(cache.root)).returncode == 0
    assert not os.path.lexists(stray)
    [entry] = cards_by_id(cache).values()
    assert abs(entry["last_used_unix"] - when) < 2
    # Using the card is what moves it.
    resolve(card, cache)
    [entry] = cards_by_id(cache).values()
    assert abs(entry["last_used_unix"] - time.time()) < 120


def test_cache_verify_reports_corrupt_blobs(
    make_model_dir: Callable[..., Path], cache: CacheLayout
) -> None:
    card = from_dir(make_model_dir())
    resolve(card, cache)
    assert cli_main("cache", "verify", "--cache-dir", str(cache.root)).returncode == 0
    _, config = next(card.files())
    cache.blob(config.checksum.hex).write_bytes(b"garbage")
    proc = cli_main("cache", "verify", "--cache-dir", str(cache.root))
    assert proc.returncode == 1
    assert f"CORRUPT {cache.blob(config.checksum.hex)}" in proc.stdout
    doc = cli_json("cache", "verify", "--cache-dir", str(cache.root), code=1)
    assert set(doc) == {"cache_dir", "checked", "ok", "corrupt", "broken_links", "fix"}
    assert doc["ok"] is False and doc["fix"] is None
    assert doc["checked"] == len(list(card.files()))
    [bad] = doc["corrupt"]
    assert (bad["blake3"], bad["path"]) == (config.checksum.hex,
                                            str(cache.blob(config.checksum.hex)))  # fmt: skip


def test_verify_fix_removes_corrupt_blobs_and_their_cards_then_verify_passes(
    make_model_dir: Callable[..., Path], cache: CacheLayout
) -> None:
    sick_model = make_model_dir("sick", seed=1)
    (sick_model / "config.json").write_text(json.dumps({"model_type": "llama", "sick": True}))
    sick = from_dir(sick_model)
    well = from_dir(make_model_dir("well", seed=2))
    sick_dir = resolve(sick, cache).local_dir
    well_dir = resolve(well, cache).local_dir
    assert sick_dir is not None and well_dir is not None
    well_files = snapshot(well_dir)
    # The two models share some files; the sick one's tokenizer and config are its own.
    well_hexes = linked_hexes(well_dir)
    only_sick = linked_hexes(sick_dir) - well_hexes
    config = next(f for _, f in sick.files() if f.checksum.hex in only_sick)
    cache.blob(config.checksum.hex).write_bytes(b"garbage")
    # prune alone does not hash, so it cannot see the corruption (the report).
    assert cli_main("cache", "prune", "-y", "--cache-dir", str(cache.root)).returncode == 0
    assert cli_main("cache", "verify", "--cache-dir", str(cache.root)).returncode == 1
    doc = cli_json("cache", "verify", "--fix", "-y", "--cache-dir", str(cache.root), code=0)
    assert doc["fix"]["dry_run"] is False
    removed = {(i["kind"], i["path"]) for i in doc["fix"]["result"]["removed"]}
    assert ("blob", str(cache.blob(config.checksum.hex))) in removed
    assert ("card", str(sick_dir)) in removed
    # The sick card's other blob went with it (as `cache rm` takes it), the shared ones
    # stayed: nothing is left for a prune.
    assert len(only_sick) == 2
    assert {i["blake3"] for i in doc["fix"]["result"]["removed"] if i["kind"] == "blob"} == (
        only_sick
    )
    assert all(os.path.exists(cache.blob(h)) for h in well_hexes)
    assert plan_prune(scan_cache(cache)).empty
    assert cli_main("cache", "verify", "--cache-dir", str(cache.root)).returncode == 0
    # The healthy card is untouched; the sick one is fetched and verified anew when needed.
    assert snapshot(well_dir) == well_files
    assert resolve(sick, cache).local_dir == sick_dir


def test_verify_fix_plans_first_and_deletes_only_when_confirmed(
    make_model_dir: Callable[..., Path], cache: CacheLayout
) -> None:
    card = from_dir(make_model_dir())
    local_dir = resolve(card, cache).local_dir
    _, config = next(card.files())
    cache.blob(config.checksum.hex).write_bytes(b"garbage")
    root = str(cache.root)
    before = snapshot(cache.root)
    # No -y and no terminal: nothing deleted, exit 1, as prune and rm.
    proc = cli_main("cache", "verify", "--fix", "--cache-dir", root)
    assert proc.returncode == 1, proc.stderr
    assert f"card       {local_dir}" in proc.stdout  # the plan is printed first
    assert proc.stderr.strip().splitlines() == [
        "discovery-mdc: nothing deleted: stdin is not a terminal; pass -y to delete (or --dry-run)"
    ]
    assert snapshot(cache.root) == before
    # --dry-run: the plan only; still exit 1, since the blob is still corrupt.
    proc = cli_main("cache", "verify", "--fix", "--dry-run", "--json", "--cache-dir", root)
    assert proc.returncode == 1 and proc.stderr == ""
    fix = json.loads(proc.stdout)["fix"]
    assert fix["dry_run"] is True and fix["result"] is None
    assert {(i["kind"], i["path"]) for i in fix["items"]} >= {
        ("card", str(local_dir)), ("blob", str(cache.blob(config.checksum.hex)))
    }  # fmt: skip
    assert snapshot(cache.root) == before
    # -y and --dry-run mean something only with --fix.
    for flag in ("-y", "--dry-run"):
        proc = cli_main("cache", "verify", flag, "--cache-dir", root)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert f"{flag} only applies to --fix" in proc.stderr
    # On a terminal it asks: integration/test_cache_operator.py.


# --------------------------------------------------------------------------- prune


@pytest.fixture
def revisions(make_model_dir: Callable[..., Path], cache: CacheLayout) -> list[ResolvedCard]:
    """Three revisions of one model (different config, same tokenizer), last used 40, 20
    and 0 days ago, and another model used 40 days ago."""
    out = []
    for i, age in enumerate((40, 20, 0)):
        model = make_model_dir(f"rev{i}", seed=7)
        (model / "config.json").write_text(json.dumps({"model_type": "llama", "rev": i}))
        resolved = resolve(from_dir(model, display_name="Org/Model"), cache)
        assert resolved.local_dir is not None
        backdate(resolved.local_dir, age * DAY)
        out.append(resolved)
    other = resolve(from_dir(make_model_dir("other", seed=9)), cache)
    assert other.local_dir is not None
    backdate(other.local_dir, 40 * DAY)
    out.append(other)
    return out


def _card_paths(items: list[dict[str, Any]]) -> set[str]:
    return {i["path"] for i in items if i["kind"] == "card"}


def test_prune_older_than_evicts_unused_cards_and_the_blobs_only_they_link(
    revisions: list[ResolvedCard], cache: CacheLayout
) -> None:
    old, mid, new, other = revisions
    root = str(cache.root)
    before = snapshot(cache.root)
    plan = cli_json("cache", "prune", "--older-than", "30d", "--dry-run", "--cache-dir", root)
    assert snapshot(cache.root) == before
    assert plan["dry_run"] is True and plan["result"] is None
    assert set(plan) == {"cache_dir", "dry_run", "items", "bytes_to_free", "result",
                         "older_than_seconds", "keep"}  # fmt: skip
    assert all(set(i) == {"kind", "path", "size", "reason", "model", "mdcsum", "blake3"}
               for i in plan["items"])  # fmt: skip
    assert plan["older_than_seconds"] == 30 * DAY
    assert _card_paths(plan["items"]) == {str(old.local_dir), str(other.local_dir)}
    assert all(i["reason"].startswith("last used 40d") for i in plan["items"]
               if i["kind"] == "card")  # fmt: skip
    # Only blobs no surviving card links: old's config and the other model's files; the
    # tokenizer old shares with the newer revisions stays.
    shared = {f.checksum.hex for _, f in new.card.files()} | {
        f.checksum.hex for _, f in mid.card.files()
    }
    planned_blobs = {i["blake3"] for i in plan["items"] if i["kind"] == "blob"}
    assert planned_blobs and not planned_blobs & shared
    assert plan["bytes_to_free"] == sum(i["size"] for i in plan["items"])
    doc = cli_json("cache", "prune", "--older-than", "30d", "-y", "--cache-dir", root)
    assert doc["dry_run"] is False
    assert _card_paths(doc["result"]["removed"]) == _card_paths(plan["items"])
    assert doc["result"]["skipped"] == [] and doc["result"]["failed"] == []
    assert doc["result"]["freed_bytes"] == plan["bytes_to_free"]
    assert set(doc["result"]) == {"removed", "skipped", "failed", "freed_bytes"}
    assert set(cards_by_id(cache)) == {f"org_model/{mid.mdcsum}", f"org_model/{new.mdcsum}"}
    assert cli_main("cache", "verify", "--cache-dir", root).returncode == 0


def test_prune_keep_n_keeps_the_most_recently_used_mdcsums_per_model(
    revisions: list[ResolvedCard], cache: CacheLayout
) -> None:
    old, mid, new, other = revisions
    doc = cli_json("cache", "prune", "--keep", "1", "-y", "--cache-dir", str(cache.root))
    assert _card_paths(doc["result"]["removed"]) == {str(old.local_dir), str(mid.local_dir)}
    assert set(cards_by_id(cache)) == {f"org_model/{new.mdcsum}", f"other/{other.mdcsum}"}
    combined = cli_json("cache", "prune", "--keep", "1", "--older-than", "30d", "--dry-run",
                        "--cache-dir", str(cache.root))  # fmt: skip
    assert _card_paths(combined["items"]) == {str(other.local_dir)}


def test_prune_and_rm_without_yes_and_without_a_terminal_exit_1_and_delete_nothing(
    revisions: list[ResolvedCard], cache: CacheLayout
) -> None:
    root = str(cache.root)
    before = snapshot(cache.root)
    for argv in (
        ("cache", "prune", "--older-than", "30d"),
        ("cache", "rm", "Org/Model"),
        ("cache", "prune", "--older-than", "30d", "--json"),
    ):
        proc = cli_main(*argv, "--cache-dir", root)
        assert proc.returncode == 1, (argv, proc.stdout, proc.stderr)
        assert "nothing deleted" in proc.stderr and "-y" in proc.stderr
        assert snapshot(cache.root) == before
    doc = json.loads(cli_main("cache", "rm", "other", "--json", "--cache-dir", root).stdout)
    assert doc["result"] is None and doc["items"]
    assert cli_main("cache", "prune", "--older-than", "30d", "--dry-run",
                   "--cache-dir", root).returncode == 0  # fmt: skip
    assert snapshot(cache.root) == before


# --------------------------------------------------------------------------- rm


def test_rm_a_model_or_one_mdcsum(revisions: list[ResolvedCard], cache: CacheLayout) -> None:
    old, mid, new, other = revisions
    root = str(cache.root)
    # One mdcsum, by a unique prefix.
    doc = cli_json("cache", "rm", f"org_model/{mid.mdcsum[:10]}", "-y", "--cache-dir", root)
    assert doc["models"] == [f"org_model/{mid.mdcsum[:10]}"]
    assert _card_paths(doc["result"]["removed"]) == {str(mid.local_dir)}
    # mid's config went with it, the tokenizer the others share stayed.
    blobs = {i["blake3"] for i in doc["result"]["removed"] if i["kind"] == "blob"}
    mid_only = {f.checksum.hex for _, f in mid.card.files()} - {
        f.checksum.hex for r in (old, new) for _, f in r.card.files()
    }
    assert blobs == mid_only
    # A whole model, by its name (or its slug).
    plan = cli_json("cache", "rm", "Org/Model", "--dry-run", "--cache-dir", root)
    assert _card_paths(plan["items"]) == {str(old.local_dir), str(new.local_dir)}
    assert cli_main("cache", "rm", "Org/Model", "-y", "--cache-dir", root).returncode == 0
    assert set(cards_by_id(cache)) == {f"other/{other.mdcsum}"}
    assert not (cache.by_slug / "org_model").exists()
    assert cli_main("cache", "verify", "--cache-dir", root).returncode == 0
    # Naming nothing in the cache is bad input (exit 2, one line) that deletes nothing.
    before = snapshot(cache.root)
    proc = cli_main("cache", "rm", "other", "Org/Nope", "-y", "--cache-dir", root)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"discovery-mdc: error: nothing in {root} matches 'Org/Nope' "
        "(see `discovery-mdc cache ls -q`); nothing deleted"
    ]
    assert snapshot(cache.root) == before


def test_rm_takes_only_a_unique_mdcsum_prefix_of_4_or_more_hex_digits(
    revisions: list[ResolvedCard], cache: CacheLayout
) -> None:
    old, mid, new, _ = revisions
    assert old.local_dir is not None and mid.local_dir is not None
    # Two cards of the model whose mdcsums share their first four hex digits.
    twins = [f"abcd{d * 60}" for d in "12"]
    for card_dir, name in zip((old.local_dir, mid.local_dir), twins, strict=True):
        card_dir.rename(card_dir.with_name(name))
    root = str(cache.root)
    before = snapshot(cache.root)
    for spec, message in (
        (
            "org_model/abcd",
            f"'org_model/abcd' is ambiguous: it matches 2 cards (org_model/{twins[0]}, "
            f"org_model/{twins[1]}); give more of the mdcsum",
        ),
        (
            "Org/Model/ABC",
            "'Org/Model/ABC': the mdcsum prefix 'ABC' is too short; give at least 4 hex "
            "digits (see `discovery-mdc cache ls -q`)",
        ),
    ):
        for argv in (("-y",), ("--dry-run", "--json")):
            proc = cli_main("cache", "rm", spec, *argv, "--cache-dir", root)
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.splitlines() == [f"discovery-mdc: error: {message}"]
            assert proc.stdout == ""
            assert snapshot(cache.root) == before
    # A longer prefix picks one of them; the full mdcsum too.
    doc = cli_json("cache", "rm", "org_model/abcd1", "--dry-run", "--cache-dir", root)
    assert _card_paths(doc["items"]) == {str(cache.by_slug / "org_model" / twins[0])}
    doc = cli_json("cache", "rm", f"Org/Model/{new.mdcsum}", "-y", "--cache-dir", root)
    assert _card_paths(doc["result"]["removed"]) == {str(new.local_dir)}


def test_final_lines_of_cache_commands_are_json_with_json_logs(
    revisions: list[ResolvedCard], cache: CacheLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(cache.root)
    for argv, env, code, text in (
        (("cache", "prune", "--older-than", "30d", "--log-format", "json"), {}, 1,
         "nothing deleted: stdin is not a terminal"),
        (("cache", "rm", "Org/Model"), {"DYN_LOGGING_JSONL": "1"}, 1,
         "nothing deleted: stdin is not a terminal"),
        (("cache", "rm", "Org/Nope", "-y"), {"DYN_LOGGING_JSONL": "true"}, 2,
         "nothing in"),
        (("cache", "rm", "org_model/abc", "-y", "--log-format", "json"), {}, 2,
         "is too short"),
    ):  # fmt: skip
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            proc = cli_main(*argv, "--cache-dir", root)
        assert proc.returncode == code, proc.stderr
        (line,) = proc.stderr.splitlines()
        record = json.loads(line)
        assert record["exit_code"] == code and record["level"] == "error"
        assert text in record["msg"]


def test_prune_of_legacy_in_place_paths_is_not_touched(
    make_model_dir: Callable[..., Path], cache: CacheLayout
) -> None:
    model = make_model_dir()
    legacy = from_dir(model).map_files(lambda _, f: CheckedFile(f.path, f.checksum))
    resolved = resolve(legacy, cache)
    assert resolved.in_place and resolved.local_dir == model
    assert cli_main("cache", "prune", "-y", "--cache-dir", str(cache.root)).returncode == 0
    assert (model / "config.json").is_file()


def test_cache_dir_defaults_to_env(
    make_model_dir: Callable[..., Path], cache: CacheLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(resolve_metadata_files(from_dir(make_model_dir("env-model")), cache_dir=cache.root))
    monkeypatch.setenv("DYN_MDC_CACHE_DIR", str(cache.root))
    ids = cli_main("cache", "ls", "-q").stdout
    assert ids.startswith("env-model/")


def test_prune_plan_is_empty_after_a_prune(
    make_model_dir: Callable[..., Path], cache: CacheLayout
) -> None:
    resolve(from_dir(make_model_dir()), cache)
    (cache.tmp / f"{'d' * 64}.{dead_pid()}.{uuid.uuid4().hex}.part").write_bytes(b"x" * 10)
    live = cache.tmp / f"{'e' * 64}.{os.getpid()}.{uuid.uuid4().hex}.part"
    live.write_bytes(b"y")
    assert cli_main("cache", "prune", "-y", "--cache-dir", str(cache.root)).returncode == 0
    assert list(cache.tmp.iterdir()) == [live]  # a live writer's temp file is kept
    assert plan_prune(scan_cache(cache)).empty


# --------------------------------------------------------------------------- concurrency


def unpublished(card: ModelDeploymentCard, cache: CacheLayout) -> tuple[Path, Path]:
    """Resolve ``card``, then rename its directory back to a staging name, as it was just
    before being published: ``(card dir, staging dir)``."""
    done = resolve(card, cache)
    assert done.local_dir is not None
    staging = done.local_dir.parent / f".tmp-card.{done.mdcsum}.{os.getpid()}.{uuid.uuid4().hex}"
    done.local_dir.rename(staging)
    return done.local_dir, staging


def test_a_reference_scan_sees_links_whose_dir_is_renamed_during_the_scan(
    make_model_dir: Callable[..., Path], cache: CacheLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staging dir renamed onto its card dir after the listing, before it is read: the next
    listing shows it under its new name and its links still count (else prune could delete a
    blob a just-published card links)."""
    from discovery_mdc.cache import _manage

    card = from_dir(make_model_dir("moving"))
    local_dir, staging = unpublished(card, cache)
    expected = {f.checksum.hex for _, f in card.files()}
    real_scandir = _manage._scandir
    renamed: list[bool] = []

    def scandir_then_publish(path: Path) -> list[os.DirEntry[str]]:
        entries = real_scandir(path)
        if path == staging.parent and not renamed:
            staging.rename(local_dir)  # the publish lands right after the listing
            renamed.append(True)
        return entries

    monkeypatch.setattr(_manage, "_scandir", scandir_then_publish)
    assert _manage.referenced_hexes(cache) == expected
    assert renamed


def test_a_reference_scan_sees_the_links_of_a_dir_renamed_while_it_is_read(
    make_model_dir: Callable[..., Path], cache: CacheLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staging dir published (renamed) after its entries were listed, before its links were
    read: they still count (reading them by path then found nothing, and a prune deleted the
    blobs of a card just published)."""
    from discovery_mdc.cache import _manage

    card = from_dir(make_model_dir("moving"))
    card_dir, staging = unpublished(card, cache)
    real_readlink = os.readlink
    renamed: list[bool] = []

    def publish_then_readlink(path: Any, *, dir_fd: int | None = None) -> Any:
        if not renamed:
            staging.rename(card_dir)  # the publish lands between listing and reading
            renamed.append(True)
        return real_readlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "readlink", publish_then_readlink)
    assert _manage.referenced_hexes(cache) == {f.checksum.hex for _, f in card.files()}
    assert renamed


def test_a_scan_never_fails_on_a_card_dir_renamed_under_it(
    make_model_dir: Callable[..., Path], cache: CacheLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    from discovery_mdc.cache import _manage

    card_dir, staging = unpublished(from_dir(make_model_dir("moving")), cache)
    real_scandir = _manage._scandir

    def scandir_then_publish(path: Path) -> list[os.DirEntry[str]]:
        entries = real_scandir(path)
        if path == staging.parent and staging.exists():
            staging.rename(card_dir)  # the publish lands right after the listing
        return entries

    monkeypatch.setattr(_manage, "_scandir", scandir_then_publish)
    scan = scan_cache(cache)
    assert scan.warnings == () and scan.incomplete == ()
    assert card_dir.is_dir() and not staging.exists()


@pytest.mark.parametrize("window", ["after making it", "after finding it"])
def test_staging_a_card_outlives_a_prune_removing_its_empty_model_dir(
    window: str,
    make_model_dir: Callable[..., Path],
    cache: CacheLayout,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    card = from_dir(make_model_dir("again"))
    model_dir = resolve(card, cache).local_dir
    assert model_dir is not None
    remove_link_dir(model_dir)  # the model dir is left empty: a prune removes it
    model_parent = model_dir.parent
    if window == "after making it":
        model_parent.rmdir()
    real_mkdir = os.mkdir
    pruned: list[bool] = []

    def mkdir_then_prune(path: Any, mode: int = 0o777) -> None:
        if Path(path) != model_parent or pruned:
            return real_mkdir(path, mode)
        pruned.append(True)
        try:
            real_mkdir(path, mode)
        finally:
            os.rmdir(path)  # the prune's rmdir lands right after the resolve's mkdir

    monkeypatch.setattr(os, "mkdir", mkdir_then_prune)
    assert resolve(card, cache).local_dir == model_dir
    assert pruned and plan_prune(scan_cache(cache)).empty


async def test_prune_racing_resolves_never_leaves_a_card_with_a_missing_blob(
    make_model_dir: Callable[..., Path], cache: CacheLayout
) -> None:
    from discovery_mdc.cache import execute_plan

    cards = [from_dir(make_model_dir(f"race{i}", seed=i)) for i in range(4)]
    for _ in range(12):
        # Every blob orphaned: what a prune wants to delete and a resolve wants to link.
        for card in cards:
            done = await resolve_metadata_files(card, cache_dir=cache.root)
            assert done.local_dir is not None
            remove_link_dir(done.local_dir)
        pruning = asyncio.to_thread(lambda: execute_plan(plan_prune(scan_cache(cache))))
        pruned, _ = await asyncio.gather(
            pruning,
            asyncio.gather(*(resolve_metadata_files(c, cache_dir=cache.root) for c in cards)),
        )
        assert not pruned.failed
        scan = scan_cache(cache)
        assert len(scan.cards) == len(cards) and not any(c.broken for c in scan.cards)
        assert scan.incomplete == ()
