"""The card decoder's table of field decoders, the one u32 rule, and the context-length rule
``from_dir`` reads a model's JSON by (all pure)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from discovery_mdc.card import ModelDeploymentCard, decode_card
from discovery_mdc.card._build import context_length
from discovery_mdc.card._model import _FIELD_DECODERS, U32_MAX, is_u32
from discovery_mdc.errors import CardDecodeError, CardError

BASE: dict[str, Any] = {"display_name": "m", "slug": "m"}
CONFIG = Path("/models/m/config.json")


def _decode(**fields: Any) -> ModelDeploymentCard:
    return decode_card(json.dumps({**BASE, **fields}))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, True),
        (1, True),
        (U32_MAX, True),
        (2**32, False),
        (-1, False),
        (True, False),  # JSON true is not a number, though Python's bool is an int
        (False, False),
        (1.0, False),
        ("1", False),
        (None, False),
    ],
)
def test_the_u32_rule_is_an_int_in_0_to_2_32_minus_1(value: object, expected: bool) -> None:
    assert is_u32(value) is expected
    assert U32_MAX == 2**32 - 1


def test_every_known_card_field_has_exactly_one_decoder() -> None:
    known = set(ModelDeploymentCard.__struct_fields__) - {"opaque"}
    assert set(_FIELD_DECODERS) == known


def test_fields_without_a_decoder_stay_opaque_byte_for_byte() -> None:
    card = decode_card(b'{"display_name":"m","slug":"m","user_data":{"k": [1, 2.50]},"z":null}')
    assert card.opaque == {
        "user_data": msgspec.Raw(b'{"k": [1, 2.50]}'),
        "z": msgspec.Raw(b"null"),
    }


U32_FIELDS = [
    (("context_length",), "context_length"),
    (("architectural_max_context_length",), "architectural_max_context_length"),
    (("kv_cache_block_size",), "kv_cache_block_size"),
    (("migration_limit",), "migration_limit"),
    (("lora", "max_gpu_lora_count"), "lora.max_gpu_lora_count"),
    (("runtime_config", "context_length"), "runtime_config.context_length"),
]


def _nested(path: tuple[str, ...], value: object) -> dict[str, Any]:
    if len(path) == 1:
        return {path[0]: value}
    inner: dict[str, Any] = {path[1]: value}
    if path[0] == "lora":
        inner["name"] = "a"
    return {path[0]: inner}


@pytest.mark.parametrize(("path", "name"), U32_FIELDS, ids=[n for _, n in U32_FIELDS])
@pytest.mark.parametrize("bad", [-1, 2**32])
def test_every_u32_field_rejects_values_outside_u32_naming_the_field(
    path: tuple[str, ...], name: str, bad: int
) -> None:
    with pytest.raises(CardDecodeError, match=rf"'{name}': {bad} is not a u32"):
        _decode(**_nested(path, bad))


@pytest.mark.parametrize(("path", "name"), U32_FIELDS, ids=[n for _, n in U32_FIELDS])
def test_every_u32_field_takes_the_largest_u32(path: tuple[str, ...], name: str) -> None:
    card = _decode(**_nested(path, U32_MAX))
    if path == ("lora", "max_gpu_lora_count"):
        assert card.lora is not None and card.lora.max_gpu_lora_count == U32_MAX
    elif path == ("runtime_config", "context_length"):
        assert card.runtime_context_length == U32_MAX
    else:
        assert getattr(card, name) == U32_MAX


def test_a_null_u32_field_keeps_its_default_and_other_nulls_mean_absent() -> None:
    card = _decode(
        context_length=None,
        kv_cache_block_size=None,
        migration_limit=None,
        needs=None,
        aliases=None,
        extra_files=None,
        lora=None,
        worker_type=None,
        runtime_config=None,
        tokenizer=None,
    )
    defaults = ModelDeploymentCard(display_name="m", slug="m")
    assert card == defaults


# --------------------------------------------------------------------------- context length


@pytest.mark.parametrize(
    ("config", "tokenizer_config", "expected"),
    [
        ({"max_position_embeddings": 8192}, {"model_max_length": 2048}, 8192),
        # The top-level value wins; text_config is then not even looked at.
        ({"max_position_embeddings": 8192, "text_config": {"max_position_embeddings": 0}}, 0, 8192),
        ({"text_config": {"max_position_embeddings": 32768}}, None, 32768),
        ({}, {"model_max_length": 2048}, 2048),
        ({}, {"model_max_length": U32_MAX}, U32_MAX),
        # An unusable model_max_length (HF's 1e30 "unset", 0, too large, a bool) is absent.
        ({}, {"model_max_length": 1e30}, None),
        ({}, {"model_max_length": 0}, None),
        ({}, {"model_max_length": 2**32}, None),
        ({}, {"model_max_length": True}, None),
        ({}, [1, 2], None),
        ({}, None, None),
        ([], None, None),
    ],
)
def test_context_length_takes_the_first_usable_source(
    config: Any, tokenizer_config: Any, expected: int | None
) -> None:
    assert context_length(config, tokenizer_config, CONFIG) == expected


@pytest.mark.parametrize("bad", [0, -1, 2**32, True, "big", 1.5, None])
@pytest.mark.parametrize(
    "where", ["max_position_embeddings", "text_config.max_position_embeddings"]
)
def test_a_present_max_position_embeddings_must_be_a_positive_u32(bad: object, where: str) -> None:
    config: dict[str, Any] = {}
    node = config
    *parents, leaf = where.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = bad
    with pytest.raises(CardError, match=rf"config\.json: {where} must be a positive u32"):
        context_length(config, {"model_max_length": 2048}, CONFIG)
