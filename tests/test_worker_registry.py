"""The metadata registry: exact keys, canonical paths, conflicts, ownership."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from discovery_mdc.card import hash_bytes
from discovery_mdc.errors import RegistryError
from discovery_mdc.worker._registry import (
    MetadataRegistry,
    ModelRef,
    Registration,
    is_safe_name,
    url_segment,
)

MODEL_A = ModelRef("dynamo", "backend", "generate", "m")
MODEL_B = ModelRef("dynamo", "backend", "other", "m")


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(hash_bytes(data))


def test_register_stores_the_resolved_path_checksum_and_size(tmp_path: Path) -> None:
    checksum = write(tmp_path / "blobs" / "abc", b"hello")
    (tmp_path / "snap").mkdir()
    os.symlink("../blobs/abc", tmp_path / "snap" / "tokenizer.json")
    registry = MetadataRegistry()
    registered = registry.register(
        "m/tokenizer.json", tmp_path / "snap" / "tokenizer.json", checksum
    )
    assert registered.path == (tmp_path / "blobs" / "abc").resolve()
    assert registered.size == 5
    assert registered.etag == checksum.removeprefix("blake3:")
    assert registry.lookup("m/tokenizer.json") == registered
    assert registry.lookup("m/tokenizer.json/") is None
    assert registry.lookup("m/blobs/abc") is None


def test_same_file_again_is_a_no_op_and_a_different_file_is_an_error(tmp_path: Path) -> None:
    one = write(tmp_path / "a" / "config.json", b"1")
    two = write(tmp_path / "b" / "config.json", b"2")
    registry = MetadataRegistry()
    first = registry.register("m/config.json", tmp_path / "a" / "config.json", one)
    again = registry.register("m/config.json", tmp_path / "a" / ".." / "a" / "config.json", one)
    assert again == first and len(registry) == 1
    with pytest.raises(RegistryError, match="already registered"):
        registry.register("m/config.json", tmp_path / "b" / "config.json", two)
    assert registry.lookup("m/config.json") == first


def test_register_many_is_all_or_nothing(tmp_path: Path) -> None:
    one = write(tmp_path / "a" / "x.json", b"1")
    two = write(tmp_path / "b" / "x.json", b"2")
    registry = MetadataRegistry()
    with pytest.raises(RegistryError):
        registry.register_many(
            [
                Registration("m/ok.json", tmp_path / "a" / "x.json", one),
                Registration("m/x.json", tmp_path / "a" / "x.json", one),
                Registration("m/x.json", tmp_path / "b" / "x.json", two),
            ]
        )
    assert len(registry) == 0


@pytest.mark.parametrize(
    "key",
    [
        "config.json",
        "m/../config.json",
        "m/./config.json",
        "m/.hidden",
        "m/a%2Fb",
        "m/a b",
        "m/a\x00b",
        "/m/config.json",
        "m//config.json",
        "m/" + "a" * 256,
        "m/ü.json",
        "a/b/c/config.json",
    ],
)
def test_unsafe_keys_are_rejected(tmp_path: Path, key: str) -> None:
    checksum = write(tmp_path / "f", b"x")
    with pytest.raises(RegistryError, match="invalid metadata key"):
        MetadataRegistry().register(key, tmp_path / "f", checksum)


@pytest.mark.parametrize(
    ("name", "segment"),
    [
        ("config.json", "config.json"),
        ("my template.jinja", "my%20template.jinja"),
        ("ü.json", "%C3%BC.json"),
        ("100%.txt", "100%25.txt"),
        ("a?b#c.json", "a%3Fb%23c.json"),
        ("a(b)+c=d@e:f!.json", "a(b)+c=d@e:f!.json"),  # what a WHATWG URL parser keeps
        ("[x]{y}|z^`.json", "%5Bx%5D%7By%7D%7Cz%5E%60.json"),
        ("", None),
        (".", None),
        ("..", None),
        (".hidden", None),
        ("a/b", None),
        ("a\\b", None),
        ("tab\there", None),
        ("nul\x00", None),
        ("del\x7f", None),
        ("bad\udcff.json", None),  # a non-UTF-8 name as os.listdir decodes it
        ("é" * 128, None),  # 256 bytes
    ],
)
def test_url_segment_percent_encodes_what_a_url_cannot_hold(name: str, segment: str | None) -> None:
    assert url_segment(name) == segment


@pytest.mark.parametrize("name", ["my template.jinja", "ü.json", "100%.txt"])
def test_encoded_file_names_can_be_registered(tmp_path: Path, name: str) -> None:
    checksum = write(tmp_path / "f", b"x")
    key = f"m/{url_segment(name)}"
    MetadataRegistry().register(key, tmp_path / "f", checksum)
    # Any other spelling of the same name is not the key.
    for other in (f"m/{name}", "m/" + "".join(f"%{b:02X}" for b in name.encode())):
        if other != key:
            with pytest.raises(RegistryError, match="invalid metadata key"):
                MetadataRegistry().register(other, tmp_path / "f", checksum)


def test_missing_file_cannot_be_registered(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="not readable"):
        MetadataRegistry().register("m/x.json", tmp_path / "nope", str(hash_bytes(b"")))


def test_safe_names() -> None:
    assert is_safe_name("tokenizer.json")
    assert is_safe_name("_base")
    assert is_safe_name("a-b_c~d.e")
    for bad in ("", ".", "..", ".x", "a/b", "a%2e", "a b", "é", "a" * 256):
        assert not is_safe_name(bad), bad


def test_unregister_model_keeps_keys_another_model_still_holds(tmp_path: Path) -> None:
    checksum = write(tmp_path / "config.json", b"{}")
    registry = MetadataRegistry()
    for model in (MODEL_A, MODEL_B):
        registry.register_many(
            [
                Registration("m/config.json", tmp_path / "config.json", checksum),
                Registration(f"{model.prefix}/config.json", tmp_path / "config.json", checksum),
            ],
            owner=model,
        )
    assert len(registry) == 3
    assert registry.unregister_model(MODEL_A) == 1
    assert registry.keys() == ["dynamo/backend/other/m/_base/config.json", "m/config.json"]
    assert registry.unregister_model(MODEL_B) == 2
    assert len(registry) == 0
    assert registry.unregister_model(MODEL_B) == 0


def test_unregister_drops_a_key(tmp_path: Path) -> None:
    checksum = write(tmp_path / "f", b"x")
    registry = MetadataRegistry()
    registry.register("m/f", tmp_path / "f", checksum, owner=MODEL_A)
    assert registry.unregister("m/f")
    assert not registry.unregister("m/f")
    assert registry.unregister_model(MODEL_A) == 0
