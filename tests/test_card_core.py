"""slug, mdcsum, is_new_format, keys and path rewriting."""

from __future__ import annotations

import logging
import struct

import blake3
import msgspec
import pytest

from discovery_mdc.card import (
    CheckedFile,
    Checksum,
    LoraInfo,
    ModelDeploymentCard,
    Slot,
    SlotVariant,
    WorkerType,
    card_key,
    is_new_format,
    mdcsum,
    parse_card_key,
    slugify,
)


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("Qwen/Qwen3-0.6B", "qwen_qwen3-0_6b"),
        ("A.B C/D", "a_b_c_d"),
        ("  x  ", "x__"),
        ("Über-Model", "ber-model"),
        ("-a-", "-a-"),
        ("a:b@c#d", "a_b_c_d"),
        ("日本語", ""),
        ("a/b/", "a_b_"),
        ("mock-llama-3.1-8b-instruct", "mock-llama-3_1-8b-instruct"),
        ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama_llama-3_1-8b-instruct"),
        ("TinyLlama/TinyLlama_v1.1", "tinyllama_tinyllama_v1_1"),
        ("/data/models/x", "data_models_x"),
    ],
)
def test_slug_examples_from_the_spec(name: str, slug: str) -> None:
    assert slugify(name) == slug


def _cf(name: str, ch: str, *, size: int | None = 1, url: bool = False) -> CheckedFile:
    path = f"http://10.0.0.1:9/v1/metadata/m/{name}" if url else f"/m/{name}"
    return CheckedFile(path, Checksum(ch * 64), size)


def _base(**kw: object) -> ModelDeploymentCard:
    fields: dict[str, object] = {
        "source_path": "org/m",
        "model_info": Slot(SlotVariant.HF_CONFIG_JSON, _cf("config.json", "1")),
        "tokenizer": Slot(SlotVariant.HF_TOKENIZER_JSON, _cf("tokenizer.json", "2")),
        "prompt_formatter": Slot(SlotVariant.HF_TOKENIZER_CONFIG_JSON, _cf("tc.json", "3")),
        "chat_template_file": Slot(SlotVariant.HF_CHAT_TEMPLATE, _cf("t.jinja", "4")),
        "gen_config": Slot(SlotVariant.HF_GENERATION_CONFIG_JSON, _cf("gen.json", "5")),
        "context_length": 4096,
        "worker_type": WorkerType.AGGREGATED,
        "extra_files": (_cf("a.json", "6"), _cf("b.model", "7")),
    }
    fields.update(kw)
    return ModelDeploymentCard.new("org/m", **fields)


def test_mdcsum_matches_the_spec_byte_layout() -> None:
    card = _base(needs=((WorkerType.DECODE,), (WorkerType.PREFILL, WorkerType.DECODE)),
                 aliases=("x", "yy"), prompt_context=("oai_chat", "llama3_date_time"))  # fmt: skip
    b = b"org/m" + b"org/m"
    for ch in "12345":
        b += f"blake3:{ch * 64}".encode()
    b += b"a.json\x00" + b"6" * 64 + b"b.model\x00" + b"7" * 64
    b += b"[OaiChat, Llama3DateTime]"
    b += struct.pack(">II", 4096, 16) + b"\x04"
    b += struct.pack(">I", 2) + struct.pack(">I", 1) + b"\x02" + struct.pack(">I", 2) + b"\x01\x02"
    b += struct.pack(">I", 2) + struct.pack(">I", 1) + b"x" + struct.pack(">I", 2) + b"yy"
    assert mdcsum(card) == blake3.blake3(b).hexdigest()


def test_mdcsum_ignores_paths_urls_and_sizes() -> None:
    card = _base()
    moved = card.map_files(lambda _, f: CheckedFile(f"http://h:1/x/{f.basename}", f.checksum))
    assert moved.model_info is not None and moved.model_info.file.size is None
    assert mdcsum(moved) == mdcsum(card)


def test_mdcsum_is_insensitive_to_extra_files_order() -> None:
    card = _base()
    assert mdcsum(card.replace(extra_files=card.extra_files[::-1])) == mdcsum(card)


@pytest.mark.parametrize(
    "change",
    [
        {"display_name": "other"},
        {"source_path": "other/m"},
        {"source_path": None},
        {"context_length": 8192},
        {"runtime_config": msgspec.Raw(b'{"context_length": 0}')},
        {"kv_cache_block_size": 32},
        {"worker_type": WorkerType.PREFILL},
        {"worker_type": None},
        {"needs": ((WorkerType.DECODE,),)},
        {"aliases": ("alias",)},
        {"extra_files": (_cf("renamed.json", "6"), _cf("b.model", "7"))},
        {"extra_files": (_cf("a.json", "8"), _cf("b.model", "7"))},
        {"tokenizer": Slot(SlotVariant.HF_TOKENIZER_JSON, _cf("tokenizer.json", "9"))},
        {"gen_config": None},
        {"prompt_context": ("oai_chat",)},
    ],
)
def test_mdcsum_changes_with_every_hashed_field(change: dict[str, object]) -> None:
    card = _base()
    assert mdcsum(card.replace(**change)) != mdcsum(card)


@pytest.mark.parametrize(
    "change",
    [
        {"model_type": ("Completions",)},
        {"migration_limit": 3},
        {"lora": LoraInfo("x")},
        {"runtime_config": msgspec.Raw(b'{"other": 1}')},
    ],
)
def test_mdcsum_ignores_unhashed_fields(change: dict[str, object]) -> None:
    card = _base()
    assert mdcsum(card.replace(**change)) == mdcsum(card)


def test_is_new_format(caplog: pytest.LogCaptureFixture) -> None:
    card = _base()
    assert is_new_format(card)
    legacy = card.map_files(lambda _, f: CheckedFile(f.path, f.checksum))
    assert not is_new_format(legacy)
    assert "treating it as legacy" not in caplog.text
    with caplog.at_level(logging.WARNING):
        mixed = card.replace(extra_files=(_cf("a.json", "6", size=None),))
        assert not is_new_format(mixed)
    assert "org/m" in caplog.text and "legacy" in caplog.text


def test_files_iterate_in_spec_order_and_map_rewrites_every_path() -> None:
    card = _base()
    names = [name for name, _ in card.files()]
    assert names == [
        "model_info", "tokenizer", "prompt_formatter", "chat_template_file", "gen_config",
        "extra_files[0]", "extra_files[1]",
    ]  # fmt: skip
    rewritten = card.with_paths(lambda _, f: f"hf://org/m/{f.basename}")
    assert [f.path for _, f in rewritten.files()] == [
        f"hf://org/m/{f.basename}" for _, f in card.files()
    ]
    assert [f.checksum for _, f in rewritten.files()] == [f.checksum for _, f in card.files()]


def test_basename_of_url_and_path() -> None:
    assert _cf("tokenizer.json", "1", url=True).basename == "tokenizer.json"
    assert CheckedFile("hf://org/m@rev/config.json", Checksum("1" * 64)).basename == "config.json"
    assert CheckedFile("/a/b/c.json", Checksum("1" * 64)).basename == "c.json"


def test_card_keys_roundtrip_and_reject_non_hex() -> None:
    key = card_key("dynamo", "backend", "generate", 0x694D9981145A61AD)
    assert key == "v1/mdc/dynamo/backend/generate/694d9981145a61ad"
    parsed = parse_card_key(key)
    assert parsed is not None and parsed.instance_id == 0x694D9981145A61AD
    assert str(parsed) == key
    lora = parse_card_key(key + "/adapter-a")
    assert lora is not None and lora.lora_slug == "adapter-a"
    for bad in (
        "v1/mdc/dynamo/backend/generate/NOTHEX",
        "v1/mdc/dynamo/backend/generate/694D9981145A61AD",
        "v1/mdc/dynamo/backend/generate",
        "v1/mdc/dynamo/backend/generate/12/lora/extra",
        "v1/instances/dynamo/backend/generate/12",
        "v1/mdc/dynamo//generate/12",
    ):
        assert parse_card_key(bad) is None, bad
