"""Fuzz the card and envelope decoders: whatever bytes arrive from etcd, the only exception
that may escape is CardDecodeError (the watcher counts it and skips the key).

10,000 examples of raw bytes, arbitrary JSON, and valid envelopes mutated structurally
(a field replaced, removed or retyped at any depth) or byte by byte (flips, cuts, splices).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery_mdc.card import (
    CheckedFile,
    LoraInfo,
    ModelDeploymentCard,
    ModelEnvelope,
    Slot,
    SlotVariant,
    decode_card,
    decode_envelope,
    encode_envelope,
    hash_bytes,
    parse_card_key,
)
from discovery_mdc.errors import CardDecodeError


def _valid_envelope() -> dict[str, Any]:
    def f(name: str, data: bytes) -> CheckedFile:
        return CheckedFile(
            f"http://10.0.0.1:9090/v1/metadata/m/{name}", hash_bytes(data), len(data)
        )

    card = ModelDeploymentCard.new(
        "Org/Model-7B",
        model_info=Slot(SlotVariant.HF_CONFIG_JSON, f("config.json", b"{}")),
        tokenizer=Slot(SlotVariant.HF_TOKENIZER_JSON, f("tokenizer.json", b"{ }")),
        gen_config=Slot(SlotVariant.HF_GENERATION_CONFIG_JSON, f("generation_config.json", b"1")),
        extra_files=[f("special_tokens_map.json", b"2")],
        lora=LoraInfo("my-lora"),
        context_length=4096,
    )
    env = ModelEnvelope(
        namespace="dynamo",
        component="backend",
        endpoint="generate",
        instance_id=0x1234ABCD,
        card=card,
        model_suffix=card.lora_slug,
    )
    out: dict[str, Any] = json.loads(encode_envelope(env))
    return out


VALID = _valid_envelope()
VALID_BYTES = json.dumps(VALID).encode()

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["", "..", "../../etc/passwd", "\x00", "\ud7ff", "blake3:" + "0" * 64,
                       "file:///etc/passwd", "http://h/%2e%2e/x", "sha256:00", "blake3:zz"])
)  # fmt: skip
json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a node of a JSON tree."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(VALID)[1:]


def _replace(tree: Any, path: tuple[Any, ...], new: Any, delete: bool) -> None:
    node = tree
    for step in path[:-1]:
        node = node[step]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = new


@st.composite
def structural_mutations(draw: st.DrawFn) -> bytes:
    tree: Any = json.loads(VALID_BYTES)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        # An earlier mutation may have removed or retyped this path's parent: skip it then.
        with contextlib.suppress(KeyError, IndexError, TypeError):
            _replace(tree, path, draw(json_values), delete=draw(st.booleans()))
    return json.dumps(tree).encode()


@st.composite
def byte_mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID_BYTES)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if kind == "flip" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos : pos + draw(st.integers(1, 40))]
        elif kind == "insert":
            data[pos:pos] = draw(
                st.sampled_from([b"\x00", b"\\u0000", b"\\ud800", b'"', b"{", b"]", b",", b"1e999"])
                | st.binary(max_size=8)
            )
        else:
            del data[pos:]
    return bytes(data)


def _card_only(data: bytes) -> bytes:
    """The ``card_json`` of a mutated envelope, so decode_card sees near-valid cards too."""
    with contextlib.suppress(ValueError, RecursionError):
        tree = json.loads(data)
        if isinstance(tree, dict) and "card_json" in tree:
            return json.dumps(tree["card_json"]).encode()
    return data


inputs = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | structural_mutations()
    | byte_mutations()
    | st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass"))
)


@settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(inputs)
def test_fuzzed_envelopes_and_cards_raise_only_card_decode_error(data: bytes) -> None:
    for decode, payload in ((decode_envelope, data), (decode_card, _card_only(data))):
        try:
            decoded = decode(payload)
        except CardDecodeError:
            continue
        # Whatever decodes is a well-formed value: it encodes, and that encoding is stable.
        if isinstance(decoded, ModelEnvelope):
            once = encode_envelope(decoded)
            assert encode_envelope(decode_envelope(once)) == once


def test_pathological_nesting_and_sizes_raise_only_card_decode_error() -> None:
    cases = [
        b"[" * 100_000,
        b'{"a":' * 50_000,
        json.dumps({**VALID, "card_json": {**VALID["card_json"], "x": [[[[[[[]]]]]]]}}).encode(),
        json.dumps({**VALID, "instance_id": 2**64}).encode(),
        json.dumps({**VALID, "instance_id": -1}).encode(),
        json.dumps({**VALID, "instance_id": 1.5}).encode(),
        b"\xef\xbb\xbf" + VALID_BYTES,  # BOM
        VALID_BYTES.replace(b"Org/Model-7B", b"\\ud800"),
        VALID_BYTES + b"garbage",
        VALID_BYTES * 2,
        b"",
        b"null",
    ]
    for data in cases:
        for decode in (decode_envelope, decode_card):
            with contextlib.suppress(CardDecodeError):
                decode(data)


@settings(max_examples=2_000, deadline=None)
@given(
    st.text(max_size=120)
    | st.sampled_from(["v1/mdc/a/b/c/ff", "v1/mdc/a/b/c/ff/l", "v1/mdc//b/c/1"])
)
def test_fuzzed_keys_parse_or_are_refused_without_raising(key: str) -> None:
    parsed = parse_card_key(key)
    if parsed is not None:
        assert str(parsed) == key
