"""``discovery-mdc card inspect`` in-process (as a real process:
``integration/test_cli_process.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from discovery_mdc.card import decode_card, encode_card, encode_envelope, from_dir, mdcsum
from discovery_mdc.card._envelope import ModelEnvelope
from discovery_mdc.cli import main


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
