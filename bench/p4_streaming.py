"""P4: streaming a 1 GiB blob from our status server, pipeline vs curl.

A status server (subprocess) serves one 1 GiB file. Ours: ``resolve_metadata_files`` of a
card with just that file, in a fresh subprocess with an empty cache: it streams, hashes
(blake3) and writes the body to a staging file, fsyncs it and renames it into ``blobs/``. The
time is taken inside the subprocess around the call; peak RSS growth is VmHWM minus VmRSS
just before the call. Peer: ``curl -s -o /dev/null`` of the same URL (its ``time_total``),
which neither hashes nor writes. A third row, for context, is curl writing to a file on the
same filesystem as the cache, then ``fsync`` (what our pipeline must do for durability).
Runs alternate ours/curl to spread machine noise evenly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench._ctx import Ctx
from bench._peers import ensure_tools
from bench._util import (
    Proc,
    Row,
    ScenarioResult,
    Stats,
    child_args,
    run_child,
)
from testkit import child_env

NAME = "P4"
TITLE = "Streaming a 1 GiB blob: pipeline fetch vs curl"
BLOCK = 1 << 20


def _write_blob(path: Path, size: int) -> None:
    """``size`` bytes of a repeated 1 MiB pseudo-random block (incompressible enough)."""
    block = os.urandom(BLOCK)
    with open(path, "wb") as f:
        for _ in range(size // BLOCK):
            f.write(block)


def _curl(curl: str, url: str, out: str) -> tuple[float, int]:
    done = subprocess.run(
        [curl, "-s", "-o", out, "-w", "%{time_total} %{size_download}", url],
        capture_output=True,
        check=True,
        timeout=600,
    )
    t, n = done.stdout.decode().split()
    return float(t), int(n)


def run(ctx: Ctx) -> ScenarioResult:
    from discovery_mdc.card import (
        CheckedFile,
        Checksum,
        ModelDeploymentCard,
        Slot,
        SlotVariant,
        encode_card,
    )

    result = ScenarioResult(NAME, TITLE)
    work = ctx.scenario_dir(NAME)
    curl = ensure_tools("curl")["curl"]
    if curl is None:
        raise RuntimeError("curl is not installed and apt-get could not install it")
    size = (1 << 30) if not ctx.quick else (256 << 20)
    blob = work / "blob.bin"
    _write_blob(blob, size)
    server = Proc(
        "status-server",
        child_args(
            "bench._child", "serve", "--file", str(blob), "--key", "bench-blob/tokenizer.model"
        ),
        log=work / "server.log",
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout_pipe=True,
    )
    try:
        info = server.recv(120)
        url = info["url"]
        card = ModelDeploymentCard.new(
            "bench-blob",
            tokenizer=Slot(
                SlotVariant.TIK_TOKEN_MODEL,
                CheckedFile(url, Checksum(info["checksum"]), info["size"]),
            ),
        )
        card_path = work / "card.json"
        card_path.write_bytes(encode_card(card))
        ours_mbps: list[float] = []
        growth: list[float] = []
        curl_mbps: list[float] = []
        curl_file_mbps: list[float] = []
        runs = ctx.n(3, 1)
        for i in range(runs):
            cache = work / f"cache-{i}"
            profile = ctx.profile_session(NAME) if i == 0 else None
            r = run_child(
                f"fetch-{i}",
                child_args(
                    "bench._child",
                    "fetch",
                    "--card",
                    str(card_path),
                    "--cache-dir",
                    str(cache),
                    profile_to=profile,
                ),
                log=work / f"fetch-{i}.log",
                timeout=600,
            )
            if r["bytes"] != size:
                raise RuntimeError(f"pipeline fetched {r['bytes']} bytes, want {size}")
            ours_mbps.append(size / r["elapsed"] / 1e6)
            growth.append((r["hwm_kb"] - r["rss_base_kb"]) / 1024)
            shutil.rmtree(cache, ignore_errors=True)

            t, n = _curl(curl, url, "/dev/null")
            if n != size:
                raise RuntimeError(f"curl got {n} bytes, want {size}")
            curl_mbps.append(size / t / 1e6)

            out = work / f"curl-{i}.bin"
            t0 = time.perf_counter()
            _curl(curl, url, str(out))
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            curl_file_mbps.append(size / (time.perf_counter() - t0) / 1e6)
            out.unlink()
        server.call({"op": "quit"}, 30)
    finally:
        server.stop()
        blob.unlink(missing_ok=True)

    o = Stats.of(ours_mbps, "MB/s")
    row = Row(
        NAME,
        f"throughput, {size >> 20} MiB blob",
        o,
        Stats.of(curl_mbps, "MB/s"),
        "curl -o /dev/null",
        "rate",
        "≥ 0.8 of curl",
    )
    row.met = row.ratio is not None and row.ratio >= 0.8
    row.note = "ours also hashes, writes, fsyncs and renames; curl discards"
    result.rows.append(row)
    result.rows.append(
        Row(
            NAME,
            "throughput vs curl writing a file + fsync",
            o,
            Stats.of(curl_file_mbps, "MB/s"),
            "curl -o FILE; fsync",
            "rate",
            note="context: the same durability work, no hashing",
        )
    )
    g = Stats.of(growth, "MB")
    result.rows.append(Row(NAME, "fetcher peak RSS growth", g, target="≤ 32 MB", met=g.max <= 32.0))
    result.notes.append(
        f"{runs} run(s), alternating; blob {size >> 20} MiB; server and fetcher are "
        f"separate processes on loopback; {json.dumps({'server_url': url})}"
    )
    return result
