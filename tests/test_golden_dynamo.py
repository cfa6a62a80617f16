"""Golden tests on etcd values captured from a real NVIDIA Dynamo 1.6.1 worker.

The data in ``tests/data/dynamo/`` was produced by ``python -m testkit.dynamo capture``:
one file per etcd value, exactly as Dynamo wrote it, plus ``manifest.json`` with the key, the
scenario and Dynamo's own mdcsum for each card (``ModelDeploymentCard.local_dir()`` from the
Rust runtime). The model dirs the workers served are committed next to them, so ``from_dir``
can be checked against Dynamo's card for the same bytes. No peer is needed at run time.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import msgspec
import pytest

from discovery_mdc.card import (
    decode_envelope,
    encode_card,
    encode_envelope,
    endpoint_key,
    from_dir,
    is_new_format,
    mdcsum,
    parse_card_key,
)
from discovery_mdc.worker import build_worker_card

DATA = Path(__file__).parent / "data" / "dynamo"
_raw_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])


@cache
def _manifest() -> dict[str, Any]:
    result: dict[str, Any] = json.loads((DATA / "manifest.json").read_text())
    return result


def _envelopes() -> list[dict[str, Any]]:
    return list(_manifest()["envelopes"])


def _instances() -> list[dict[str, Any]]:
    return list(_manifest()["instances"])


def _raw(entry: dict[str, Any]) -> bytes:
    return (DATA / str(entry["file"])).read_bytes()


def _raw_card_fields(envelope: bytes) -> dict[str, msgspec.Raw]:
    return _raw_fields.decode(bytes(_raw_fields.decode(envelope)["card_json"]))


ENVELOPES = pytest.mark.parametrize("entry", _envelopes(), ids=lambda e: e["file"])
BASE_ENVELOPES = pytest.mark.parametrize(
    "entry", [e for e in _envelopes() if e["key"].count("/") == 5], ids=lambda e: e["file"]
)
INSTANCES = pytest.mark.parametrize("entry", _instances(), ids=lambda e: e["file"])


def test_capture_covers_the_interesting_cases() -> None:
    scenarios = {e["scenario"] for e in _envelopes()}
    assert len(_envelopes()) >= 15
    assert {"selfhost", "noport", "selfhost_off", "extras_selfhost", "lora_selfhost"} <= scenarios
    assert _manifest()["dynamo"] == {"ai-dynamo": "1.6.1", "ai-dynamo-runtime": "1.6.1"}


@ENVELOPES
def test_dynamo_envelope_decodes_and_matches_its_key(entry: dict[str, Any]) -> None:
    env = decode_envelope(_raw(entry))
    key = parse_card_key(entry["key"])
    assert key is not None
    assert (key.namespace, key.component, key.endpoint) == (
        env.namespace,
        env.component,
        env.endpoint,
    )
    assert key.instance_id == env.instance_id
    assert key.lora_slug == env.model_suffix
    assert env.key == entry["key"]
    assert env.card.slug == entry["oracle_slug"]


@ENVELOPES
def test_reencoding_a_dynamo_envelope_is_stable_and_byte_identical(
    entry: dict[str, Any],
) -> None:
    raw = _raw(entry)
    once = encode_envelope(decode_envelope(raw))
    twice = encode_envelope(decode_envelope(once))
    assert once == twice
    # Stronger than the brief asks: field order, null handling and opaque fields all line up,
    # so our encoder reproduces Dynamo's bytes exactly.
    assert once == raw


@ENVELOPES
def test_mdcsum_equals_dynamo_oracle(entry: dict[str, Any]) -> None:
    card = decode_envelope(_raw(entry)).card
    assert mdcsum(card) == entry["oracle_mdcsum"]
    assert entry["oracle_local_dir"].endswith(f"/by-slug/{card.slug}/{entry['oracle_mdcsum']}")


@ENVELOPES
def test_mdcsum_is_unchanged_by_our_reencoding(entry: dict[str, Any]) -> None:
    card = decode_envelope(_raw(entry)).card
    again = decode_envelope(encode_envelope(decode_envelope(_raw(entry)))).card
    assert mdcsum(again) == mdcsum(card)


@ENVELOPES
def test_runtime_config_bytes_survive_unchanged(entry: dict[str, Any]) -> None:
    raw = _raw(entry)
    original = bytes(_raw_card_fields(raw)["runtime_config"])
    card = decode_envelope(raw).card
    assert card.runtime_config is not None
    assert bytes(card.runtime_config) == original
    assert bytes(_raw_card_fields(encode_envelope(decode_envelope(raw)))["runtime_config"]) == (
        original
    )


@ENVELOPES
def test_decoded_card_keeps_every_slot_and_extra_file(entry: dict[str, Any]) -> None:
    raw = _raw(entry)
    wire = json.loads(raw)["card_json"]
    card = decode_envelope(raw).card
    for name in ("model_info", "tokenizer", "prompt_formatter", "chat_template_file", "gen_config"):
        slot = getattr(card, name)
        if wire.get(name) is None:
            assert slot is None, name
            continue
        ((tag, payload),) = wire[name].items()
        file = payload.get("file", payload)
        assert slot is not None, name
        assert slot.variant.value == tag
        assert (slot.file.path, str(slot.file.checksum), slot.file.size) == (
            file["path"],
            file["checksum"],
            file["size"],
        )
        if "file" in payload:
            assert slot.is_custom == payload["is_custom"]
    assert [(f.path, str(f.checksum), f.size) for f in card.extra_files] == [
        (f["path"], f["checksum"], f["size"]) for f in wire.get("extra_files", [])
    ]
    # Fields we do not model are kept verbatim.
    for name in ("user_data", "router_config", "media_decoder", "media_fetcher"):
        if name in wire:
            assert json.loads(bytes(card.opaque[name])) == wire[name]


@ENVELOPES
def test_dynamo_cards_are_new_format_and_context_is_effective(entry: dict[str, Any]) -> None:
    wire = json.loads(_raw(entry))["card_json"]
    card = decode_envelope(_raw(entry)).card
    assert is_new_format(card)  # 1.6.1 writes size on every file
    # Dynamo writes context_length as the effective value (runtime_config wins).
    assert card.effective_context_length() == wire["context_length"]
    assert card.architectural_max_context_length == wire["architectural_max_context_length"]


@ENVELOPES
def test_extra_files_and_urls_appear_only_when_self_hosting(entry: dict[str, Any]) -> None:
    card = decode_envelope(_raw(entry)).card
    self_hosted = entry["system_port"] and entry["DYN_SELF_HOST_METADATA"] is not False
    files = [f for _, f in card.files()]
    assert all(f.is_url == self_hosted for f in files)
    if not self_hosted:
        assert card.extra_files == ()
        return
    env = decode_envelope(_raw(entry))
    suffix = env.model_suffix or "_base"
    pattern = re.compile(
        r"http://127\.0\.0\.1:\d+/v1/metadata/"
        + re.escape(f"{env.namespace}/{env.component}/{env.endpoint}/{card.slug}/{suffix}/")
        + r"[^/]+"
    )
    for f in files:
        assert pattern.fullmatch(f.path), f.path


@BASE_ENVELOPES
def test_dynamo_frontend_cache_dir_is_the_oracle_dir(entry: dict[str, Any]) -> None:
    card = decode_envelope(_raw(entry)).card
    cached = entry["frontend_cache_files"]
    assert cached is not None, "the Dynamo frontend cached nothing under by-slug/<slug>/<mdcsum>"
    names = {f.basename for _, f in card.files()}
    if entry["system_port"] and entry["DYN_SELF_HOST_METADATA"] is not False:
        assert set(cached) == names  # exactly the card's files, extra_files included
    else:
        assert names <= set(cached)  # local paths: Dynamo copies the source dir (see docs)


@BASE_ENVELOPES
def test_from_dir_matches_dynamo_card_for_the_same_model_dir(entry: dict[str, Any]) -> None:
    theirs = decode_envelope(_raw(entry)).card
    register = entry["register"].get("register_kwargs", {})
    custom = register.get("custom_template_path")
    ours = from_dir(
        DATA / entry["model_dir"],
        display_name=entry["display_name"],
        source_path=theirs.source_path,  # the path as the peer was given it
        custom_template=DATA / "models" / Path(custom).name if custom else None,
        model_type=theirs.model_type,
        worker_type=theirs.worker_type,
        kv_cache_block_size=theirs.kv_cache_block_size,
        include_extra_files=bool(theirs.extra_files),
    )
    assert [(n, s.variant, s.file.checksum, s.file.size, s.is_custom) for n, s in ours.slots()] == [
        (n, s.variant, s.file.checksum, s.file.size, s.is_custom) for n, s in theirs.slots()
    ]
    assert sorted((f.basename, f.checksum.hex, f.size) for f in ours.extra_files) == sorted(
        (f.basename, f.checksum.hex, f.size) for f in theirs.extra_files
    )
    assert ours.architectural_max_context_length == theirs.architectural_max_context_length
    # Same worker set: give our card the registration-time knobs from_dir does not model.
    ours = ours.replace(
        needs=theirs.needs,
        aliases=theirs.aliases,
        runtime_config=theirs.runtime_config,
        opaque={k: v for k, v in theirs.opaque.items() if k == "router_config"},
    )
    assert mdcsum(ours) == entry["oracle_mdcsum"]
    # And our encoding of it carries the same mdcsum through a decode.
    assert mdcsum(decode_envelope(encode_envelope(decode_envelope(_raw(entry)))).card) == (
        mdcsum(ours)
    )
    assert encode_card(ours)  # encodable


@INSTANCES
def test_dynamo_endpoint_instance_record_shape(entry: dict[str, Any]) -> None:
    record = json.loads(_raw(entry))
    assert list(record) == [
        "type",
        "component",
        "endpoint",
        "namespace",
        "instance_id",
        "transport",
        "device_type",
        "request_plane_codec",
    ]
    assert record["type"] == "Endpoint"
    key = endpoint_key(
        record["namespace"], record["component"], record["endpoint"], record["instance_id"]
    )
    assert key == entry["key"]
    ((kind, address),) = record["transport"].items()
    assert kind == "tcp"
    assert re.fullmatch(
        rf"127\.0\.0\.1:\d+/{record['instance_id']:x}/"
        + re.escape(f"{record['namespace']}/{record['component']}/{record['endpoint']}"),
        address,
    )
    assert record["device_type"] == "cuda"  # even on this CPU-only host
    assert record["request_plane_codec"] == "msgpack"
    # Same lease, same instance id as the worker's card(s).
    cards = [e for e in _envelopes() if e["scenario"] == entry["scenario"]]
    assert cards
    for card_entry in cards:
        assert decode_envelope(_raw(card_entry)).instance_id == record["instance_id"]


@pytest.mark.parametrize(
    "entry", [e for e in _envelopes() if e["key"].count("/") == 6], ids=lambda e: e["file"]
)
def test_our_worker_lora_card_is_named_as_dynamo_names_it(entry: dict[str, Any]) -> None:
    """Dynamo names a LoRA card after the adapter (display_name and slug), whatever the base
    is served as; our worker does the same, so both agree on the mdcsum."""
    theirs = decode_envelope(_raw(entry)).card
    ((lora_name, _),) = entry["register"]["loras"]
    ours = build_worker_card(
        str(DATA / entry["model_dir"]),
        base_url=None,
        self_host=False,
        namespace="dynamo",
        component="backend",
        endpoint="generate",
        display_name=entry["display_name"],  # the base model's served name
        lora_name=lora_name,
    ).card
    assert (ours.display_name, ours.slug, ours.lora) == (
        theirs.display_name,
        theirs.slug,
        theirs.lora,
    )
    # The path string is where the capture ran; the extras exist only when self-hosting.
    ours = ours.replace(source_path=theirs.source_path, extra_files=theirs.extra_files)
    assert mdcsum(ours) == entry["oracle_mdcsum"]
