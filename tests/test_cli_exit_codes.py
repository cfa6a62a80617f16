"""Exit codes in-process: 1 on an unexpected error (one line unless debug), 130 on Ctrl-C (the
real process's exit codes and one-line errors: ``integration/test_cli_process.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from discovery_mdc.cli import main

# No ETCD_*/DYN_* from the caller's shell may change what these runs see.


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
