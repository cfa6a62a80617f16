"""The CLI as a real process (``python -m discovery_mdc``): exit codes 0, 1 and 2 with one-line
errors and no traceback, ``card inspect``, and ``--help`` through the console entry point.

The in-process halves of these checks (and everything that needs no process) are in
``tests/test_cli_*.py``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from discovery_mdc.card import decode_card, encode_card, encode_envelope, from_dir, mdcsum
from discovery_mdc.card._envelope import ModelEnvelope
from testkit import child_env, free_port, run_cli


def test_inspect_model_dir_prints_one_wire_object(make_model_dir: Callable[..., Path]) -> None:
    model = make_model_dir()
    proc = run_cli("card", "inspect", str(model), "--name", "org/Model")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    card = decode_card(lines[0])
    assert card.display_name == "org/Model" and card.slug == "org_model"
    assert encode_card(card).decode() == lines[0]


@pytest.mark.parametrize(
    "content",
    [None, b"not json", b"[1]", b'{"display_name": "x", "slug": "BAD SLUG"}'],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(
    tmp_path: Path, content: bytes | None
) -> None:
    path = tmp_path / "input.json"
    if content is not None:
        path.write_bytes(content)
    proc = run_cli("card", "inspect", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_model_dir_without_config_exits_2(tmp_path: Path) -> None:
    proc = run_cli("card", "inspect", str(tmp_path))
    assert proc.returncode == 2
    assert str(tmp_path) in proc.stderr and "config.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_flags_exit_2() -> None:
    proc = run_cli("card", "inspect", "--no-such-flag", "x")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("frobnicate")
    assert proc.returncode == 2


def test_help_works() -> None:
    proc = run_cli("card", "inspect", "--help")
    assert proc.returncode == 0 and "--mdcsum" in proc.stdout


def test_json_envelope_card_json_survives(
    tmp_path: Path, make_model_dir: Callable[..., Path]
) -> None:
    card = from_dir(make_model_dir())
    env = tmp_path / "env.json"
    env.write_bytes(encode_envelope(ModelEnvelope(
        namespace="n", component="c", endpoint="e", instance_id=1, card=card)))  # fmt: skip
    proc = run_cli("card", "inspect", str(env))
    assert json.loads(proc.stdout) == json.loads(encode_card(card))


def test_inspect_takes_an_hf_repo_id_like_the_worker(
    tmp_path: Path, make_model_dir: Callable[..., Path], make_hf_repo: Callable[..., Path]
) -> None:
    hub = tmp_path / "hub"
    snapshot = make_hf_repo(hub, "Org/Tiny", make_model_dir())
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("card", "inspect", "Org/Tiny", env=child_env(**env))
    assert proc.returncode == 0, proc.stderr
    card = decode_card(proc.stdout)
    assert (card.display_name, card.source_path) == ("Org/Tiny", "Org/Tiny")
    assert {Path(f.path).parent for _, f in card.files()} == {snapshot}
    expected = from_dir(snapshot, display_name="Org/Tiny", source_path="Org/Tiny")
    assert run_cli(
        "card", "inspect", "Org/Tiny", "--mdcsum", env=child_env(**env)
    ).stdout.strip() == mdcsum(expected)
    missing = run_cli("card", "inspect", "Org/Absent", env=child_env(**env))
    assert missing.returncode == 2
    assert "(hf download Org/Absent)" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


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
    _assert_one_line_error(run_cli(*argv), 2)


def test_nonexistent_model_path_exits_2_before_connecting(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    # etcd is unreachable too: the model path is checked first, so this is bad input (2).
    line = _assert_one_line_error(
        run_cli("worker", "--model-path", missing, "--etcd", _dead_endpoint()), 2
    )
    assert "no-such-model" in line
    line = _assert_one_line_error(run_cli("demo", "--model-path", missing), 2)
    assert "no-such-model" in line


def test_model_dir_without_config_json_exits_2(tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    line = _assert_one_line_error(run_cli("card", "inspect", str(tmp_path / "empty-model")), 2)
    assert "config.json" in line


@pytest.mark.parametrize(
    "content", [b"not json", b"[1, 2]", b'{"display_name": 3}'], ids=["garbage", "array", "typed"]
)
def test_bad_card_file_exits_2(tmp_path: Path, content: bytes) -> None:
    card = tmp_path / "card.json"
    card.write_bytes(content)
    _assert_one_line_error(run_cli("card", "inspect", str(card)), 2)
    _assert_one_line_error(
        run_cli("card", "fetch", str(card), "--cache-dir", str(tmp_path / "c")), 2
    )


def test_missing_card_file_exits_2(tmp_path: Path) -> None:
    _assert_one_line_error(run_cli("card", "fetch", str(tmp_path / "nope.json")), 2)


def test_ls_against_unreachable_etcd_exits_1_naming_every_endpoint() -> None:
    a, b = _dead_endpoint(), _dead_endpoint()
    # Bounded: its retries are capped, so it gives up within this run's 30 s deadline.
    proc = run_cli("ls", "--etcd", f"{a},{b}", timeout=30)
    line = _assert_one_line_error(proc, 1)
    assert a in line and b in line


def test_cache_verify_exit_codes(tmp_path: Path, make_model_dir: Callable[..., Path]) -> None:
    cache = tmp_path / "cache"
    assert run_cli("cache", "verify", "--cache-dir", str(cache)).returncode == 0
    blob = cache / "blobs" / ("0" * 64)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"not what the name says")
    proc = run_cli("cache", "verify", "--cache-dir", str(cache))
    assert proc.returncode == 1 and "CORRUPT" in proc.stdout


def test_help_through_the_console_entry_point() -> None:
    proc = run_cli("worker", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--model-path" in proc.stdout and proc.stderr == ""
