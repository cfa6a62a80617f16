"""Exit codes: 0 ok, 1 failed, 2 usage or bad input (one line, no traceback), 130 Ctrl-C."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from discovery_mdc.cli import main
from discovery_mdc.etcd._server import free_port

# No ETCD_*/DYN_* from the caller's shell may change what these runs see.
_CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "DYN_"))}


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "discovery_mdc", *args],
        capture_output=True, text=True, timeout=60, check=False, env={**_CLEAN_ENV, **(env or {})},
    )  # fmt: skip


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0]
    return lines[0]


def _dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"


BAD_USAGE = [
    ("no-subcommand", []),
    ("unknown-subcommand", ["frobnicate"]),
    ("unknown-flag", ["ls", "--frobnicate"]),
    ("bad-log-level", ["ls", "--log-level", "loud"]),
    ("bad-log-format", ["--log-format", "xml", "ls"]),
    ("bad-etcd-scheme", ["ls", "--etcd", "ftp://127.0.0.1:2379"]),
    ("bad-etcd-port", ["ls", "--etcd", "http://127.0.0.1:notaport"]),
    ("etcd-no-port", ["frontend", "--etcd", "http://127.0.0.1"]),
    ("etcd-with-path", ["ls", "--etcd", "http://127.0.0.1:2379/v3"]),
    ("empty-etcd", ["ls", "--etcd", ","]),
    ("bad-lease-ttl", ["worker", "--model-path", ".", "--lease-ttl", "abc"]),
    ("zero-lease-ttl", ["worker", "--model-path", ".", "--lease-ttl", "0"]),
    ("bad-system-port", ["worker", "--model-path", ".", "--system-port", "70000"]),
    ("worker-without-model", ["worker"]),
    ("bad-model-type", ["worker", "--model-path", ".", "--model-type", "chat"]),
    ("bad-http-port", ["frontend", "--http-port", "-1"]),
    ("bad-demo-timeout", ["demo", "--timeout", "0"]),
    ("cache-unknown", ["cache", "frob"]),
    ("prune-age-without-unit", ["cache", "prune", "--older-than", "30"]),
    ("prune-bad-age", ["cache", "prune", "--older-than", "soon"]),
    ("prune-keep-0", ["cache", "prune", "--keep", "0"]),
    ("rm-nothing", ["cache", "rm"]),
    ("ls-json-and-quiet", ["cache", "ls", "--json", "-q"]),
    ("card-fetch-no-file", ["card", "fetch"]),
]


@pytest.mark.parametrize("argv", [a for _, a in BAD_USAGE], ids=[n for n, _ in BAD_USAGE])
def test_bad_flags_exit_2_with_one_line(argv: list[str]) -> None:
    _assert_one_line_error(_run(*argv), 2)


def test_nonexistent_model_path_exits_2_before_connecting(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    # etcd is unreachable too: the model path is checked first, so this is bad input (2).
    line = _assert_one_line_error(
        _run("worker", "--model-path", missing, "--etcd", _dead_endpoint()), 2
    )
    assert "no-such-model" in line
    line = _assert_one_line_error(_run("demo", "--model-path", missing), 2)
    assert "no-such-model" in line


def test_model_dir_without_config_json_exits_2(tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    line = _assert_one_line_error(_run("card", "inspect", str(tmp_path / "empty-model")), 2)
    assert "config.json" in line


@pytest.mark.parametrize(
    "content", [b"not json", b"[1, 2]", b'{"display_name": 3}'], ids=["garbage", "array", "typed"]
)
def test_bad_card_file_exits_2(tmp_path: Path, content: bytes) -> None:
    card = tmp_path / "card.json"
    card.write_bytes(content)
    _assert_one_line_error(_run("card", "inspect", str(card)), 2)
    _assert_one_line_error(_run("card", "fetch", str(card), "--cache-dir", str(tmp_path / "c")), 2)


def test_missing_card_file_exits_2(tmp_path: Path) -> None:
    _assert_one_line_error(_run("card", "fetch", str(tmp_path / "nope.json")), 2)


def test_ls_against_unreachable_etcd_exits_1_naming_every_endpoint() -> None:
    a, b = _dead_endpoint(), _dead_endpoint()
    begin = time.monotonic()
    proc = _run("ls", "--etcd", f"{a},{b}")
    elapsed = time.monotonic() - begin
    line = _assert_one_line_error(proc, 1)
    assert a in line and b in line
    assert elapsed < 30, f"ls took {elapsed:.1f}s to give up"  # bounded: retries are capped


def test_unexpected_exception_is_one_line_exit_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr("discovery_mdc.cli._cache.scan_cache", boom)
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "discovery-mdc: error: RuntimeError: disk on fire (--log-level debug shows the traceback)"
    ]


def test_unexpected_exception_traceback_only_at_debug(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("discovery_mdc.cli._cache.scan_cache", boom)
    assert main(["cache", "ls", "--cache-dir", str(tmp_path), "--log-level", "debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "disk on fire" in err
    assert err.strip().splitlines()[-1] == "discovery-mdc: error: RuntimeError: disk on fire"


def test_keyboard_interrupt_exits_130(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("discovery_mdc.cli._cache.scan_cache", interrupted)
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "discovery-mdc: interrupted"


def test_cache_verify_exit_codes(tmp_path: Path, make_model_dir: Callable[..., Path]) -> None:
    cache = tmp_path / "cache"
    assert _run("cache", "verify", "--cache-dir", str(cache)).returncode == 0
    blob = cache / "blobs" / ("0" * 64)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"not what the name says")
    proc = _run("cache", "verify", "--cache-dir", str(cache))
    assert proc.returncode == 1 and "CORRUPT" in proc.stdout
