"""``discovery-mdc card inspect`` through a real subprocess and in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from discovery_mdc.card import decode_card, encode_card, encode_envelope, from_dir, mdcsum
from discovery_mdc.card._envelope import ModelEnvelope
from discovery_mdc.cli import main


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "discovery_mdc", *args],
        capture_output=True, text=True, timeout=60, check=False,
        env=None if env is None else {**os.environ, **env},
    )  # fmt: skip


def test_inspect_model_dir_prints_one_wire_object(make_model_dir: Callable[..., Path]) -> None:
    model = make_model_dir()
    proc = _run("card", "inspect", str(model), "--name", "org/Model")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    card = decode_card(lines[0])
    assert card.display_name == "org/Model" and card.slug == "org_model"
    assert encode_card(card).decode() == lines[0]


def test_inspect_name_renames_a_card_file_and_its_slug_as_building_under_that_name_does(
    make_model_dir: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_model_dir("old-name")
    path = tmp_path / "card.json"
    path.write_bytes(encode_card(from_dir(model)))
    assert main(["card", "inspect", str(path), "--name", "Org/New Name"]) == 0
    renamed = decode_card(capsys.readouterr().out.strip())
    assert (renamed.display_name, renamed.slug) == ("Org/New Name", "org_new_name")
    assert renamed == from_dir(model, display_name="Org/New Name")


def test_inspect_mdcsum_of_card_and_envelope_files(
    make_model_dir: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = from_dir(make_model_dir())
    card_file = tmp_path / "card.json"
    card_file.write_bytes(encode_card(card))
    env_file = tmp_path / "env.json"
    env_file.write_bytes(encode_envelope(ModelEnvelope(
        namespace="n", component="c", endpoint="e", instance_id=2**60, card=card)))  # fmt: skip
    for path in (card_file, env_file):
        assert main(["card", "inspect", str(path), "--mdcsum"]) == 0
        out = capsys.readouterr().out.strip()
        assert out == mdcsum(card) and len(out) == 64


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
    proc = _run("card", "inspect", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_model_dir_without_config_exits_2(tmp_path: Path) -> None:
    proc = _run("card", "inspect", str(tmp_path))
    assert proc.returncode == 2
    assert str(tmp_path) in proc.stderr and "config.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_flags_exit_2() -> None:
    proc = _run("card", "inspect", "--no-such-flag", "x")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = _run("frobnicate")
    assert proc.returncode == 2


def test_help_works() -> None:
    proc = _run("card", "inspect", "--help")
    assert proc.returncode == 0 and "--mdcsum" in proc.stdout


def test_json_envelope_card_json_survives(
    tmp_path: Path, make_model_dir: Callable[..., Path]
) -> None:
    card = from_dir(make_model_dir())
    env = tmp_path / "env.json"
    env.write_bytes(encode_envelope(ModelEnvelope(
        namespace="n", component="c", endpoint="e", instance_id=1, card=card)))  # fmt: skip
    proc = _run("card", "inspect", str(env))
    assert json.loads(proc.stdout) == json.loads(encode_card(card))


def test_inspect_takes_an_hf_repo_id_like_the_worker(
    tmp_path: Path, make_model_dir: Callable[..., Path], make_hf_repo: Callable[..., Path]
) -> None:
    hub = tmp_path / "hub"
    snapshot = make_hf_repo(hub, "Org/Tiny", make_model_dir())
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    proc = _run("card", "inspect", "Org/Tiny", env=env)
    assert proc.returncode == 0, proc.stderr
    card = decode_card(proc.stdout)
    assert (card.display_name, card.source_path) == ("Org/Tiny", "Org/Tiny")
    assert {Path(f.path).parent for _, f in card.files()} == {snapshot}
    expected = from_dir(snapshot, display_name="Org/Tiny", source_path="Org/Tiny")
    assert _run("card", "inspect", "Org/Tiny", "--mdcsum", env=env).stdout.strip() == mdcsum(
        expected
    )
    missing = _run("card", "inspect", "Org/Absent", env=env)
    assert missing.returncode == 2
    assert "(hf download Org/Absent)" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
