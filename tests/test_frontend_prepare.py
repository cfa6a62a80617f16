"""The default prepare hook: every typed JSON file of a resolved card must parse, by the rule
workers publish by (``card.load_json``), without building objects for standard JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from discovery_mdc.card import (
    CheckedFile,
    Checksum,
    ModelDeploymentCard,
    Slot,
    SlotVariant,
    hash_bytes,
)
from discovery_mdc.errors import CardError
from discovery_mdc.frontend import check_json_files


def _card_with(tmp_path: Path, name: str, body: bytes) -> ModelDeploymentCard:
    path = tmp_path / name
    path.write_bytes(body)
    config = tmp_path / "config.json"
    config.write_bytes(b'{"vocab_size": 3}')
    return ModelDeploymentCard.new(
        "org/m",
        model_info=Slot(
            SlotVariant.HF_CONFIG_JSON, CheckedFile(str(config), hash_bytes(b"x"), None)
        ),
        tokenizer=Slot(
            SlotVariant.HF_TOKENIZER_JSON, CheckedFile(str(path), Checksum("2" * 64), None)
        ),
    )


async def test_standard_json_is_checked_without_json_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_objects(data: bytes, where: str) -> None:
        raise AssertionError(f"{where} went through json.loads")

    monkeypatch.setattr("discovery_mdc.frontend._prepare.load_json", no_objects)
    body = b'{"model": {"vocab": {"\xc3\xa9": 1}}, "added_tokens": [], "x": [1.5, null, true]}'
    await check_json_files(_card_with(tmp_path, "tokenizer.json", body), tmp_path)


@pytest.mark.parametrize("body", [b'{"a": NaN}', b'{"a": "\\ud800"}', b"\xef\xbb\xbf{}"])
async def test_what_the_worker_accepts_beyond_standard_json_still_passes(
    tmp_path: Path, body: bytes
) -> None:
    await check_json_files(_card_with(tmp_path, "tokenizer.json", body), tmp_path)


@pytest.mark.parametrize(
    "body",
    [b'{"model": [1, 2,, 3]}', b'{"model": ', b'{"a": 1} trailing', b'{"a": "\xff"}', b"",
     b"[" * 50_000 + b"]" * 50_000],
)  # fmt: skip
async def test_a_malformed_json_file_is_a_card_error_naming_it(tmp_path: Path, body: bytes) -> None:
    card = _card_with(tmp_path, "tokenizer.json", body)
    where = r"tokenizer file .*tokenizer\.json is (not valid JSON|empty)"
    with pytest.raises(CardError, match=where):
        await check_json_files(card, tmp_path)


async def test_files_that_are_not_json_are_not_checked(tmp_path: Path) -> None:
    await check_json_files(_card_with(tmp_path, "tokenizer.model", b"\x00\xff binary"), tmp_path)
