"""Wire-format encode/decode of cards and envelopes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from discovery_mdc.card import (
    Checksum,
    ModelEnvelope,
    SlotVariant,
    decode_card,
    decode_envelope,
    encode_card,
    encode_envelope,
    from_dir,
    parse_model_type,
)
from discovery_mdc.errors import CardDecodeError, CardError

H1 = "a" * 64
H2 = "b" * 64
H3 = "c" * 64


def _file(name: str, h: str, size: int | None = 10) -> dict[str, Any]:
    out: dict[str, Any] = {"path": f"/models/m/{name}", "checksum": f"blake3:{h}"}
    if size is not None:
        out["size"] = size
    return out


def _card(**overrides: Any) -> dict[str, Any]:
    card: dict[str, Any] = {
        "display_name": "org/Model-1",
        "slug": "org_model-1",
        "source_path": "org/Model-1",
        "model_info": {"hf_config_json": _file("config.json", H1)},
        "tokenizer": {"hf_tokenizer_json": _file("tokenizer.json", H2)},
        "prompt_formatter": {"hf_tokenizer_config_json": _file("tokenizer_config.json", H3)},
        "context_length": 4096,
        "kv_cache_block_size": 16,
        "migration_limit": 0,
        "model_type": "Chat | Completions",
        "model_input": "Tokens",
        "worker_type": "aggregated",
        "needs": [],
        "runtime_config": {"context_length": None, "tool_call_parser": "x", "f": 1.50},
    }
    card.update(overrides)
    return card


def _roundtrip_stable(raw: bytes) -> bytes:
    once = encode_card(decode_card(raw))
    twice = encode_card(decode_card(once))
    assert once == twice
    return once


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"model_info": {"hf_config_json": _file("config.json", H1, None)}},
        {
            "chat_template_file": {
                "hf_chat_template_json": {"is_custom": False, "file": _file("c.json", H1)}
            }
        },
        {"extra_files": [_file("special_tokens_map.json", H1), _file("a.model", H2)]},
        {"lora": {"name": "Adapter A", "max_gpu_lora_count": 4}},
        {"user_data": {"k": [1, 2.5e10, None]}, "brand_new_field": {"x": 1}},
        {"aliases": ["m1", "m2"], "prompt_context": ["oai_chat"]},
    ],
)
def test_encode_is_idempotent_for_card_shapes(variant: dict[str, Any]) -> None:
    raw = json.dumps(_card(**variant)).encode()
    once = _roundtrip_stable(raw)
    assert decode_card(once) == decode_card(raw)


def test_runtime_config_passes_through_byte_for_byte() -> None:
    runtime = b'{"context_length":null,"f":1.50,"big":123456789012345678901,"z":{"b":1,"a":2}}'
    raw = (
        json.dumps(_card())
        .encode()
        .replace(json.dumps(_card()["runtime_config"]).encode(), runtime)
    )
    assert runtime in raw
    assert runtime in encode_card(decode_card(raw))


def test_unknown_fields_are_kept_after_known_ones() -> None:
    raw = json.dumps({"zzz_unknown": [1], **_card(media_decoder=None)}).encode()
    out = json.loads(encode_card(decode_card(raw)))
    assert out["zzz_unknown"] == [1]
    assert list(out)[-1] == "zzz_unknown"
    assert "media_decoder" in out and out["media_decoder"] is None


def test_pre_size_json_decodes_with_size_none() -> None:
    raw = json.dumps(_card(model_info={"hf_config_json": _file("config.json", H1, None)}))
    card = decode_card(raw)
    assert card.model_info is not None and card.model_info.file.size is None
    assert b'"size"' not in encode_card(card).split(b'"tokenizer"')[0]


def test_empty_model_info_and_tokenizer_are_written_as_null() -> None:
    card = decode_card(json.dumps(_card(model_info=None, tokenizer=None)))
    out = json.loads(encode_card(card))
    assert out["model_info"] is None and out["tokenizer"] is None
    minimal = decode_card(json.dumps({"display_name": "x", "slug": "x"}))
    out = json.loads(encode_card(minimal))
    assert out["model_info"] is None and out["tokenizer"] is None
    assert out["context_length"] == 0
    assert "prompt_formatter" not in out and "extra_files" not in out


def test_chat_template_read_alias_and_write_tag() -> None:
    slot = {"hf_chat_template_jinja": {"is_custom": True, "file": _file("t.jinja", H1)}}
    card = decode_card(json.dumps(_card(chat_template_file=slot)))
    assert card.chat_template_file is not None
    assert card.chat_template_file.variant is SlotVariant.HF_CHAT_TEMPLATE
    assert card.chat_template_file.is_custom
    out = json.loads(encode_card(card))
    assert list(out["chat_template_file"]) == ["hf_chat_template"]
    assert out["chat_template_file"]["hf_chat_template"] == {
        "is_custom": True,
        "file": _file("t.jinja", H1),
    }


def test_checked_file_key_order_and_size_omitted_when_unknown() -> None:
    card = decode_card(
        json.dumps(_card(tokenizer={"hf_tokenizer_json": _file("t.json", H2, None)}))
    )
    text = encode_card(card).decode()
    assert f'{{"path":"/models/m/config.json","checksum":"blake3:{H1}","size":10}}' in text
    assert f'{{"path":"/models/m/t.json","checksum":"blake3:{H2}"}}' in text


def test_model_type_reads_with_or_without_spaces_and_writes_spaced() -> None:
    assert parse_model_type("Chat|Completions") == ("Chat", "Completions")
    assert parse_model_type("Completions | Chat") == ("Chat", "Completions")
    assert parse_model_type("") == ()
    card = decode_card(json.dumps(_card(model_type="Completions|Chat")))
    assert json.loads(encode_card(card))["model_type"] == "Chat | Completions"
    with pytest.raises(CardDecodeError, match="chat"):
        decode_card(json.dumps(_card(model_type="chat")))


@pytest.mark.parametrize(
    "bad",
    [
        "blake3:" + "A" * 64,
        "blake3:" + "a" * 63,
        "blake3:" + "a" * 65,
        "blake3:" + "g" * 64,
        "blake3:../" + "a" * 61,
        "sha256:" + "a" * 64,
        "a" * 64,
        "",
    ],
)
def test_checksum_decode_rejects_bad_hashes(bad: str) -> None:
    with pytest.raises(CardError):
        Checksum.parse(bad)
    card = _card(model_info={"hf_config_json": {"path": "/x", "checksum": bad}})
    with pytest.raises(CardDecodeError, match="model_info") as info:
        decode_card(json.dumps(card))
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("slug", ["Upper", "a/b", "../x", "a.b", "日本", "a b"])
def test_slug_decode_rejects_characters_outside_the_alphabet(slug: str) -> None:
    with pytest.raises(CardDecodeError, match="slug") as info:
        decode_card(json.dumps(_card(slug=slug)))
    assert repr(slug) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kv_cache_block_size", -1),
        ("kv_cache_block_size", 2**32),
        ("context_length", "4096"),
        ("model_input", "tokens"),
        ("worker_type", "Prefill"),
        ("needs", [["bogus"]]),
        ("display_name", 5),
        ("tokenizer", {"hf_tokenizer_json": _file("a", H1), "tik_token_model": _file("b", H1)}),
        ("tokenizer", {"hf_config_json": _file("a", H1)}),
        ("model_info", {"hf_config_json": {"path": "/x", "checksum": f"blake3:{H1}", "size": -3}}),
        ("extra_files", [{"path": "/x"}]),
    ],
)
def test_bad_fields_raise_value_errors_naming_field_and_value(field: str, value: Any) -> None:
    with pytest.raises(CardDecodeError) as info:
        decode_card(json.dumps(_card(**{field: value})))
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(CardDecodeError, match="display_name"):
        decode_card(b'{"slug": "x"}')
    with pytest.raises(CardDecodeError, match="not a JSON object"):
        decode_card(b"[1,2]")


def test_envelope_roundtrip_keeps_instance_id_beyond_2_53() -> None:
    big = 2**63 + 12345
    env_json = {
        "type": "Model",
        "namespace": "dynamo",
        "component": "backend",
        "endpoint": "generate",
        "instance_id": big,
        "card_json": _card(),
    }
    raw = json.dumps(env_json).encode()
    env = decode_envelope(raw)
    assert env.instance_id == big
    out = encode_envelope(env)
    assert f'"instance_id":{big}'.encode() in out
    assert encode_envelope(decode_envelope(out)) == out
    assert env.key == f"v1/mdc/dynamo/backend/generate/{big:x}"
    assert list(json.loads(out)) == [
        "type", "namespace", "component", "endpoint", "instance_id", "card_json",
    ]  # fmt: skip


def test_envelope_with_lora_suffix() -> None:
    card = decode_card(json.dumps(_card(lora={"name": "adapterA"})))
    env = ModelEnvelope(
        namespace="ns", component="c", endpoint="e", instance_id=0x694D9981145A61AD,
        card=card, model_suffix="adaptera",
    )  # fmt: skip
    out = encode_envelope(env)
    assert json.loads(out)["model_suffix"] == "adaptera"
    assert decode_envelope(out).key == "v1/mdc/ns/c/e/694d9981145a61ad/adaptera"


@pytest.mark.parametrize(
    "bad",
    [
        b"not json",
        b'{"type": "Endpoint", "instance_id": 1}',
        b'{"type": "Model", "namespace": "n", "component": "c", "endpoint": "e",'
        b' "instance_id": -1, "card_json": {"display_name": "x", "slug": "x"}}',
        b'{"type": "Model", "namespace": "n", "component": "c", "endpoint": "e", "instance_id": 1}',
    ],
)
def test_bad_envelopes_raise_card_decode_error(bad: bytes) -> None:
    with pytest.raises(CardDecodeError):
        decode_envelope(bad)


def test_card_built_from_dir_roundtrips(make_model_dir: Any) -> None:
    model = make_model_dir()
    card = from_dir(model, include_extra_files=True)
    raw = encode_card(card)
    assert encode_card(decode_card(raw)) == raw
    assert decode_card(raw) == card


def test_opaque_field_order_survives(tmp_path: Path) -> None:
    raw = json.dumps(_card(router_config={"b": 1, "a": 2}), separators=(",", ":")).encode()
    out = encode_card(decode_card(raw))
    assert b'"router_config":{"b":1,"a":2}' in out
    assert msgspec.json.decode(out)["router_config"] == {"b": 1, "a": 2}
