"""Property tests: round-trips of generated cards and garbage input to the decoders."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery_mdc.card import (
    MODEL_TYPE_FLAGS,
    ModelEnvelope,
    decode_card,
    decode_envelope,
    encode_card,
    encode_envelope,
)
from discovery_mdc.errors import CardDecodeError

hexes = st.text("0123456789abcdef", min_size=64, max_size=64)
names = st.text(min_size=1, max_size=30).filter(lambda s: "\x00" not in s)
worker_types = st.sampled_from(["prefill", "decode", "encode", "aggregated"])


@st.composite
def checked_files(draw: st.DrawFn, sized: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": draw(st.sampled_from(["/m/", "http://h:1/v1/metadata/x/", "hf://o/r/"]))
        + draw(st.from_regex(r"[a-z_]{1,12}\.json", fullmatch=True)),
        "checksum": "blake3:" + draw(hexes),
    }
    if sized:
        out["size"] = draw(st.integers(0, 2**40))
    return out


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def cards(draw: st.DrawFn) -> dict[str, Any]:
    sized = draw(st.booleans())
    card: dict[str, Any] = {
        "display_name": draw(names),
        "slug": draw(st.from_regex(r"[a-z0-9_-]{0,20}", fullmatch=True)),
        "model_info": draw(st.none() | checked_files(sized).map(lambda f: {"hf_config_json": f})),
        "tokenizer": draw(
            st.none()
            | st.tuples(
                st.sampled_from(["hf_tokenizer_json", "tik_token_model"]), checked_files(sized)
            ).map(lambda t: {t[0]: t[1]})
        ),
        "kv_cache_block_size": draw(st.integers(0, 2**32 - 1)),
        "migration_limit": draw(st.integers(0, 2**32 - 1)),
        "model_type": " | ".join(draw(st.lists(st.sampled_from(MODEL_TYPE_FLAGS), unique=True))),
        "model_input": draw(st.sampled_from(["Text", "Tokens", "Tensor"])),
    }
    optional: dict[str, Any] = {
        "source_path": names,
        "context_length": st.integers(0, 2**32 - 1),
        "architectural_max_context_length": st.integers(0, 2**32 - 1),
        "worker_type": st.none() | worker_types,
        "needs": st.lists(st.lists(worker_types, max_size=3), max_size=3),
        "chat_template_file": st.tuples(
            st.sampled_from(
                ["hf_chat_template", "hf_chat_template_jinja", "hf_chat_template_json"]
            ),
            st.booleans(),
            checked_files(sized),
        ).map(lambda t: {t[0]: {"is_custom": t[1], "file": t[2]}}),
        "gen_config": checked_files(sized).map(lambda f: {"hf_generation_config_json": f}),
        "extra_files": st.lists(checked_files(sized), max_size=3),
        "lora": st.builds(
            lambda n, c: {"name": n, **({"max_gpu_lora_count": c} if c else {})},
            names,
            st.none() | st.integers(1, 64),
        ),
        "aliases": st.lists(names, max_size=3),
        "runtime_config": st.dictionaries(st.text(max_size=8), json_values, max_size=4),
        "user_data": json_values,
        "some_future_field": json_values,
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            card[key] = draw(strategy)
    return card


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(cards())
def test_generated_cards_roundtrip_idempotently(card: dict[str, Any]) -> None:
    raw = json.dumps(card).encode()
    once = encode_card(decode_card(raw))
    assert encode_card(decode_card(once)) == once
    if "runtime_config" in card:
        assert json.loads(once)["runtime_config"] == card["runtime_config"]


@settings(max_examples=100)
@given(cards(), st.integers(0, 2**64 - 1))
def test_generated_envelopes_roundtrip(card: dict[str, Any], instance_id: int) -> None:
    env = {
        "type": "Model",
        "namespace": "ns",
        "component": "c",
        "endpoint": "e",
        "instance_id": instance_id,
        "card_json": card,
    }
    decoded = decode_envelope(json.dumps(env))
    assert decoded.instance_id == instance_id
    out = encode_envelope(decoded)
    assert encode_envelope(decode_envelope(out)) == out
    assert isinstance(decoded, ModelEnvelope)


def _mutations() -> st.SearchStrategy[bytes]:
    garbage = st.binary(max_size=200)
    text = st.text(max_size=200).map(str.encode)
    structured = json_values.map(lambda v: json.dumps(v).encode())
    mutated_card = st.tuples(
        cards(),
        st.sampled_from(
            [
                "display_name",
                "slug",
                "model_info",
                "tokenizer",
                "needs",
                "worker_type",
                "model_type",
                "context_length",
                "extra_files",
                "lora",
                "chat_template_file",
            ]
        ),
        json_values,
    ).map(lambda t: json.dumps({**t[0], t[1]: t[2]}).encode())
    return garbage | text | structured | mutated_card


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_garbage_never_raises_anything_but_card_decode_error(data: bytes) -> None:
    for decode in (decode_card, decode_envelope):
        with contextlib.suppress(CardDecodeError):
            decode(data)
