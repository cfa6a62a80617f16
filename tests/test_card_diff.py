"""card_diff names every field that makes two cards' mdcsums differ, with both values."""

from __future__ import annotations

import msgspec
import pytest

from discovery_mdc.card import (
    CheckedFile,
    Checksum,
    ModelDeploymentCard,
    Slot,
    SlotVariant,
    WorkerType,
    card_diff,
    explain_card_diff,
    mdcsum,
)


def _file(name: str, digit: str, size: int = 3, host: str = "w1") -> CheckedFile:
    return CheckedFile(f"http://{host}/v1/metadata/m/{name}", Checksum(digit * 64), size)


def _card(**changes: object) -> ModelDeploymentCard:
    card = ModelDeploymentCard.new(
        "org/m",
        model_info=Slot(SlotVariant.HF_CONFIG_JSON, _file("config.json", "1")),
        tokenizer=Slot(SlotVariant.HF_TOKENIZER_JSON, _file("tokenizer.json", "2")),
        worker_type=WorkerType.AGGREGATED,
        context_length=4096,
    )
    return card.replace(**changes)


def test_replicas_that_differ_only_in_urls_have_no_diff() -> None:
    other = _card(
        model_info=Slot(SlotVariant.HF_CONFIG_JSON, _file("config.json", "1", host="w2")),
        tokenizer=Slot(SlotVariant.HF_TOKENIZER_JSON, _file("tokenizer.json", "2", host="w2")),
    )
    assert mdcsum(other) == mdcsum(_card())
    assert card_diff(_card(), other) == ()
    assert explain_card_diff(()) == "no field the mdcsum covers differs"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"tokenizer": Slot(SlotVariant.HF_TOKENIZER_JSON, _file("tokenizer.json", "9", 5))},
            [("tokenizer", f"blake3:{'2' * 64} (3 bytes)", f"blake3:{'9' * 64} (5 bytes)")],
        ),
        ({"tokenizer": None}, [("tokenizer", f"blake3:{'2' * 64} (3 bytes)", "absent")]),
        (
            {"gen_config": Slot(SlotVariant.HF_GENERATION_CONFIG_JSON, _file("g.json", "4"))},
            [("gen_config", "absent", f"blake3:{'4' * 64} (3 bytes)")],
        ),
        ({"extra_files": (_file("merges.txt", "5"),)},
         [("extra file merges.txt", "absent", f"blake3:{'5' * 64} (3 bytes)")]),
        ({"context_length": 8192}, [("context_length", "4096", "8192")]),
        ({"kv_cache_block_size": 64}, [("kv_cache_block_size", "16", "64")]),
        ({"worker_type": WorkerType.PREFILL}, [("worker_type", "aggregated", "prefill")]),
        ({"display_name": "org/n"}, [("display_name", "'org/m'", "'org/n'")]),
        ({"source_path": "/models/m"}, [("source_path", "None", "'/models/m'")]),
        ({"aliases": ("m",)}, [("aliases", "[]", "['m']")]),
        (
            {"opaque": {"router_config": msgspec.Raw(b'{"a":1}')}},
            [("router_config", "absent", '{"a":1}')],
        ),
    ],
)  # fmt: skip
def test_each_field_that_changes_the_mdcsum_is_named_with_both_values(
    changes: dict[str, object], expected: list[tuple[str, str, str]]
) -> None:
    other = _card(**changes)
    assert mdcsum(other) != mdcsum(_card())
    diffs = card_diff(_card(), other)
    assert [(d.field, d.first, d.second) for d in diffs] == expected
    assert explain_card_diff(diffs) == "; ".join(f"{f} {a} vs {b}" for f, a, b in expected)
