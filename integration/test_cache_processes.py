"""The cache across real processes: kill -9 mid-download, two fetchers on one cache, a full
disk, a lock left by a killed holder, and bounded memory for a 1 GiB file."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
from pathlib import Path

from aiohttp import web

from discovery_mdc._sample import write_sample_model
from discovery_mdc.cache import (
    MAX_BLOB_SIZE,
    CacheLayout,
    plan_prune,
    resolve_metadata_files,
    scan_cache,
    verify_cache,
)
from discovery_mdc.card import (
    CheckedFile,
    ModelDeploymentCard,
    Slot,
    SlotVariant,
    encode_card,
    from_dir,
    hash_file,
)
from testkit import CliProcess, Handler, MetaServer, Process, run_cli, run_python, wait_until

DEADLINE = 60.0


def model_card(tmp_path: Path, name: str = "proc-model", **kwargs: object) -> ModelDeploymentCard:
    return from_dir(write_sample_model(tmp_path / "models" / name, **kwargs))  # type: ignore[arg-type]


def write_card(tmp_path: Path, card: ModelDeploymentCard) -> Path:
    path = tmp_path / f"{card.slug}.json"
    path.write_bytes(encode_card(card))
    return path


def parts(cache: CacheLayout, hexdigest: str) -> list[Path]:
    return sorted(cache.tmp.glob(f"{hexdigest}.*.part")) if cache.tmp.exists() else []


async def test_kill_9_mid_download_leaves_no_blob_and_the_next_run_completes(
    meta_server: MetaServer, cache: CacheLayout, tmp_path: Path, procs: list[Process]
) -> None:
    card = meta_server.http_card(model_card(tmp_path))
    _, tok = list(card.files())[1]
    tok_path = f"/v1/metadata/{card.slug}/tokenizer.json"
    meta_server.gated.add(tok_path)  # half of it, then the server holds the connection
    card_file = write_card(tmp_path, card)

    fetch = ["card", "fetch", str(card_file), "--cache-dir", str(cache.root)]
    proc = CliProcess(fetch, log_path=tmp_path / "fetch.log")
    procs.append(proc)
    await asyncio.wait_for(meta_server.half_sent.wait(), DEADLINE)
    await wait_until(
        lambda: any(p.stat().st_size > 0 for p in parts(cache, tok.checksum.hex)), timeout=DEADLINE
    )
    proc.signal(signal.SIGKILL)
    assert await proc.wait_exit(DEADLINE) == -signal.SIGKILL

    assert not cache.blob(tok.checksum.hex).exists()
    assert verify_cache(cache).ok  # whatever was published is whole and verified
    assert parts(cache, tok.checksum.hex)  # the held download left its part file
    # ... and so may any other file in flight at the kill: prune offers exactly those.
    leftover = set(cache.tmp.glob("*.part"))
    assert {i.path for i in plan_prune(scan_cache(cache)).temp_files} == leftover

    meta_server.gated.discard(tok_path)
    done = await asyncio.to_thread(run_cli, *fetch, timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    local = Path(done.stdout.strip())
    assert hash_file(local / "tokenizer.json")[0] == tok.checksum
    assert meta_server.gets[tok_path] == 2
    assert verify_cache(cache).ok


async def test_two_processes_on_one_cache_make_one_get_per_blob(
    meta_server: MetaServer, cache: CacheLayout, tmp_path: Path, procs: list[Process]
) -> None:
    card = meta_server.http_card(model_card(tmp_path))
    gate = asyncio.Event()
    paths = {f"/v1/metadata/{card.slug}/{f.basename}": f.checksum.hex for _, f in card.files()}

    def gated(body: bytes) -> Handler:
        async def handler(_: web.Request) -> web.StreamResponse:
            await gate.wait()
            return web.Response(body=body)

        return handler

    for path in paths:
        meta_server.handlers[path] = gated(meta_server.files[path])  # type: ignore[arg-type]
    card_file = write_card(tmp_path, card)
    argv = ["--log-level", "debug", "card", "fetch", str(card_file), "--cache-dir", str(cache.root)]
    fetchers = [CliProcess(argv, log_path=tmp_path / f"fetch-{i}.log") for i in range(2)]
    procs.extend(fetchers)

    def contended(path: str) -> bool:
        # One process is fetching it (the server holds its GET) and another waits on its lock.
        waiting = f"lock {cache.lock(paths[path])} is held by another process"
        return meta_server.gets[path] >= 1 and any(waiting in p.log() for p in fetchers)

    await wait_until(lambda: all(contended(p) for p in paths), timeout=DEADLINE)
    gate.set()
    for proc in fetchers:
        assert await proc.wait_exit(DEADLINE) == 0, proc.describe()
    assert {p: meta_server.gets[p] for p in paths} == dict.fromkeys(paths, 1)
    assert verify_cache(cache).ok


def _limit_file_size() -> None:
    # Writes past the limit fail with EFBIG instead of killing the process with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))


async def test_full_disk_is_a_clear_error_and_leaves_no_partial_blob(
    meta_server: MetaServer, cache: CacheLayout, tmp_path: Path
) -> None:
    card = meta_server.http_card(model_card(tmp_path, vocab_size=5000))
    _, tok = list(card.files())[1]
    assert tok.size is not None and tok.size > 16 * 1024
    done = await asyncio.to_thread(
        run_cli, "card", "fetch", str(write_card(tmp_path, card)), "--cache-dir",
        str(cache.root), timeout=DEADLINE, preexec_fn=_limit_file_size,
    )  # fmt: skip
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "discovery-mdc: error" in line]
    assert len(errors) == 1
    assert "disk full or file size limit" in errors[0] and str(cache.tmp) in errors[0]
    assert not cache.blob(tok.checksum.hex).exists()
    assert list(cache.tmp.iterdir()) == []
    assert verify_cache(cache).ok


async def test_lock_left_by_a_killed_holder_does_not_block(
    meta_server: MetaServer, cache: CacheLayout, tmp_path: Path, procs: list[Process]
) -> None:
    card = meta_server.http_card(model_card(tmp_path))
    _, config = next(card.files())
    lock = cache.lock(config.checksum.hex)
    holder = Process(
        [sys.executable, "-c",
         "import sys, time, filelock; filelock.FileLock(sys.argv[1]).acquire(); "
         "print('locked', flush=True); time.sleep(3600)",
         str(lock)],
        log_path=tmp_path / "holder.log",
    )  # fmt: skip
    procs.append(holder)
    await holder.wait_log("^locked$", timeout=DEADLINE)
    holder.signal(signal.SIGKILL)
    await holder.wait_exit(DEADLINE)
    assert lock.exists()
    resolved = await resolve_metadata_files(card, cache_dir=cache.root, lock_timeout=DEADLINE)
    assert verify_cache(cache).checked == len(resolved.files)


# VmHWM is the peak RSS of this address space; ru_maxrss would include the forked parent's.
RSS_SCRIPT = """
import asyncio, sys
from pathlib import Path
from discovery_mdc.cache import resolve_metadata_files
from discovery_mdc.cli._common import load_card_file

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

card = load_card_file(Path(sys.argv[1]))
before = peak_kib()
asyncio.run(resolve_metadata_files(card, cache_dir=sys.argv[2]))
print(before, peak_kib())
"""


async def test_a_1_gib_file_fetches_with_bounded_memory(
    meta_server: MetaServer, cache: CacheLayout, tmp_path: Path
) -> None:
    big = tmp_path / "config.json"
    with big.open("wb") as f:
        f.truncate(MAX_BLOB_SIZE - 4096)
        f.seek(0, os.SEEK_END)
        f.write(os.urandom(4096))
    checksum, size, _ = hash_file(big)
    meta_server.files["/big/config.json"] = big
    card = ModelDeploymentCard.new(
        "Big",
        model_info=Slot(
            SlotVariant.HF_CONFIG_JSON,
            CheckedFile(meta_server.url("/big/config.json"), checksum, size),
        ),
    )
    done = await asyncio.to_thread(
        run_python, "-c", RSS_SCRIPT, str(write_card(tmp_path, card)), str(cache.root),
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    before_kib, after_kib = map(int, done.stdout.split())
    try:
        assert cache.blob(checksum.hex).stat().st_size == size
        print(f"peak RSS before {before_kib} KiB, after {after_kib} KiB")
        assert after_kib - before_kib < 128 * 1024, (before_kib, after_kib)
    finally:
        cache.blob(checksum.hex).unlink(missing_ok=True)
        big.unlink()
