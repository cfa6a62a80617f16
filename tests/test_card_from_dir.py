"""Building a card from a model directory."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest

from discovery_mdc.card import (
    MAX_FILE_SIZE,
    HashCancelled,
    ModelDeploymentCard,
    SlotVariant,
    from_dir,
    hash_file,
    is_new_format,
    model_root,
)
from discovery_mdc.card._checksum import HASH_CHUNK, MMAP_THRESHOLD
from discovery_mdc.errors import CardError, ModelDirError
from discovery_mdc.frontend import check_json_files

MakeDir = Callable[..., Path]


def _blake(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


def test_every_slot_has_path_checksum_and_size(make_model_dir: MakeDir) -> None:
    model = make_model_dir(chat_template=False)
    (model / "chat_template.jinja").write_text("{{ messages }}")
    card = from_dir(model)
    assert is_new_format(card)
    expected = {
        "model_info": "config.json",
        "tokenizer": "tokenizer.json",
        "prompt_formatter": "tokenizer_config.json",
        "chat_template_file": "chat_template.jinja",
        "gen_config": "generation_config.json",
    }
    files = dict(card.files())
    assert set(files) == set(expected)
    for slot, name in expected.items():
        f = files[slot]
        assert f.path == str(model / name)
        assert f.checksum.hex == _blake(model / name)
        assert f.size == (model / name).stat().st_size
    assert card.display_name == model.name
    assert card.source_path == str(model)
    assert card.extra_files == ()


def test_missing_config_json_names_the_dir(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelDirError, match=str(tmp_path)) as info:
        from_dir(tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ModelDirError, match="nope"):
        from_dir(tmp_path / "nope")


def test_tokenizer_json_beats_tiktoken(make_model_dir: MakeDir) -> None:
    model = make_model_dir()
    (model / "tiktoken.model").write_text("x")
    card = from_dir(model)
    assert card.tokenizer is not None and card.tokenizer.variant is SlotVariant.HF_TOKENIZER_JSON


def test_tiktoken_model_then_single_star_tiktoken(make_model_dir: MakeDir) -> None:
    model = make_model_dir()
    (model / "tokenizer.json").unlink()
    (model / "tiktoken.model").write_text("a")
    (model / "other.tiktoken").write_text("b")
    card = from_dir(model)
    assert card.tokenizer is not None
    assert card.tokenizer.variant is SlotVariant.TIK_TOKEN_MODEL
    assert card.tokenizer.file.basename == "tiktoken.model"
    (model / "tiktoken.model").unlink()
    card = from_dir(model)
    assert card.tokenizer is not None and card.tokenizer.file.basename == "other.tiktoken"


def test_several_tiktoken_files_is_an_error(make_model_dir: MakeDir) -> None:
    model = make_model_dir()
    (model / "tokenizer.json").unlink()
    (model / "a.tiktoken").write_text("a")
    (model / "b.tiktoken").write_text("b")
    with pytest.raises(CardError, match=r"a\.tiktoken"):
        from_dir(model)


def test_no_tokenizer_leaves_slot_empty(make_model_dir: MakeDir) -> None:
    model = make_model_dir()
    (model / "tokenizer.json").unlink()
    assert from_dir(model).tokenizer is None


def test_optional_files_absent(make_model_dir: MakeDir) -> None:
    model = make_model_dir(generation_config=False)
    (model / "tokenizer_config.json").unlink()
    card = from_dir(model)
    assert card.prompt_formatter is None and card.gen_config is None
    assert card.chat_template_file is None


def test_chat_template_custom_then_jinja_then_json(make_model_dir: MakeDir, tmp_path: Path) -> None:
    model = make_model_dir()
    (model / "chat_template.json").write_text('{"chat_template": "x"}')
    card = from_dir(model)
    assert card.chat_template_file is not None
    assert card.chat_template_file.variant is SlotVariant.HF_CHAT_TEMPLATE_JSON
    (model / "chat_template.jinja").write_text("{{x}}")
    card = from_dir(model)
    assert card.chat_template_file is not None
    assert card.chat_template_file.variant is SlotVariant.HF_CHAT_TEMPLATE
    assert not card.chat_template_file.is_custom
    custom = tmp_path / "my_template.jinja"
    custom.write_text("{{custom}}")
    card = from_dir(model, custom_template=custom)
    assert card.chat_template_file is not None
    assert card.chat_template_file.is_custom
    assert card.chat_template_file.file.path == str(custom)
    with pytest.raises(ModelDirError, match=r"missing\.jinja"):
        from_dir(model, custom_template=tmp_path / "missing.jinja")


def test_context_length_sources_in_order(make_model_dir: MakeDir) -> None:
    model = make_model_dir(max_position_embeddings=8192)
    assert from_dir(model).effective_context_length() == 8192

    config = json.loads((model / "config.json").read_text())
    del config["max_position_embeddings"]
    config["text_config"] = {"max_position_embeddings": 32768}
    (model / "config.json").write_text(json.dumps(config))
    assert from_dir(model).effective_context_length() == 32768

    del config["text_config"]
    (model / "config.json").write_text(json.dumps(config))
    tc = json.loads((model / "tokenizer_config.json").read_text())
    tc["model_max_length"] = 2048
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    assert from_dir(model).effective_context_length() == 2048

    tc["model_max_length"] = 1e30  # HF's "unset" sentinel: ignored, as the reference does
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    assert from_dir(model).effective_context_length() == 0


def test_config_with_non_finite_numbers_is_accepted(make_model_dir: MakeDir) -> None:
    model = make_model_dir()
    (model / "config.json").write_text(
        '{"max_position_embeddings": 1024, "time_step_limit": [0.0, Infinity]}'
    )
    assert from_dir(model).effective_context_length() == 1024


def test_malformed_present_context_length_is_an_error(make_model_dir: MakeDir) -> None:
    model = make_model_dir()
    (model / "config.json").write_text('{"max_position_embeddings": "big"}')
    with pytest.raises(CardError, match="max_position_embeddings"):
        from_dir(model)


def test_extra_files_skip_weights_dotfiles_and_slot_files(make_model_dir: MakeDir) -> None:
    model = make_model_dir()
    for name in ("tokenizer.model", "preprocessor_config.json", ".gitattributes",
                 "pytorch_model.bin", "x.gguf", "w.pt", "w.pth", "m.onnx", "m.h5",
                 "f.msgpack", "t.tflite"):  # fmt: skip
        (model / name).write_text(name)
    (model / "subdir").mkdir()
    card = from_dir(model, include_extra_files=True)
    assert sorted(f.basename for f in card.extra_files) == [
        "preprocessor_config.json", "special_tokens_map.json", "tokenizer.model",
    ]  # fmt: skip
    assert all(f.size is not None for f in card.extra_files)


def test_hf_snapshot_symlinks_keep_real_names(tmp_path: Path, make_model_dir: MakeDir) -> None:
    src = make_model_dir()
    blobs = tmp_path / "blobs"
    snap = tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = blobs / _blake(f)
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    card = from_dir(snap, display_name="org/m", include_extra_files=True)
    assert {f.basename for _, f in card.files()} >= {"config.json", "tokenizer.json"}
    assert all(not f.basename.startswith(("0", "1")) or "." in f.basename for _, f in card.files())


def test_large_file_hashes_identically_via_mmap(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    chunk = os.urandom(1 << 20)
    with big.open("wb") as fh:
        for i in range(200):
            fh.write(chunk[i:] + chunk[:i])
    expected = blake3.blake3()
    with big.open("rb") as fh:
        while block := fh.read(1 << 22):
            expected.update(block)
    checksum, size, data = hash_file(big)
    assert data is None  # took the mmap path
    assert size == 200 << 20 == big.stat().st_size
    assert checksum.hex == expected.hexdigest()


def test_small_file_returns_its_bytes_once(tmp_path: Path) -> None:
    small = tmp_path / "s.json"
    small.write_bytes(b"x" * (MMAP_THRESHOLD - 1))
    checksum, size, data = hash_file(small)
    assert data == small.read_bytes() and size == MMAP_THRESHOLD - 1
    assert checksum.hex == _blake(small)
    empty = tmp_path / "e"
    empty.write_bytes(b"")
    assert hash_file(empty)[1:] == (0, b"")


def test_chunked_reading_hashes_like_the_mmap_path(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20) * 7)  # 21 MiB: more than one read chunk
    mapped = hash_file(big)
    read = hash_file(big, use_mmap=False)
    assert read == mapped and read[1] == 21 << 20 and read[2] is None


# ---------------------------------------------------------------- cards every frontend takes


def _extras(card: ModelDeploymentCard) -> set[str]:
    return {f.basename for f in card.extra_files}


def test_a_stray_non_json_extra_is_published_and_the_default_prepare_hook_accepts_it(
    make_model_dir: MakeDir,
) -> None:
    model = make_model_dir()
    (model / "results.json").write_text("accuracy: 0.93")
    card = from_dir(model, include_extra_files=True)
    assert "results.json" in _extras(card)
    asyncio.run(check_json_files(card, None))  # would raise if it parsed extras


def test_the_default_prepare_hook_still_refuses_a_typed_slot_that_is_not_json(
    make_model_dir: MakeDir,
) -> None:
    card = from_dir(make_model_dir())
    assert card.gen_config is not None
    Path(card.gen_config.file.path).write_text("{oops")
    with pytest.raises(CardError, match=r"gen_config file .*generation_config\.json"):
        asyncio.run(check_json_files(card, None))


@pytest.mark.parametrize("name", ["model.onnx_data", "model.ckpt", "model.nemo", "rank0.engine"])
def test_extra_files_above_the_frontend_ceiling_are_skipped_with_a_warning(
    make_model_dir: MakeDir, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_model_dir()
    with (model / name).open("wb") as fh:
        fh.truncate(MAX_FILE_SIZE + 1)  # sparse
    (model / "small.ckpt").write_bytes(b"x")
    card = from_dir(model, include_extra_files=True)
    assert "small.ckpt" in _extras(card) and name not in _extras(card)
    assert f"not publishing extra file {model / name}: {MAX_FILE_SIZE + 1} bytes" in caplog.text


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("tokenizer.json", b"", "tokenizer.json is empty"),
        ("tokenizer.json", b"  \n", "tokenizer.json is empty"),
        ("tokenizer_config.json", b"{", "tokenizer_config.json is not valid JSON"),
        ("generation_config.json", b"nope", "generation_config.json is not valid JSON"),
        ("chat_template.json", b"[", "chat_template.json is not valid JSON"),
    ],
)
def test_typed_json_slots_that_do_not_parse_are_refused(
    make_model_dir: MakeDir, name: str, content: bytes, match: str
) -> None:
    model = make_model_dir(chat_template=False)
    (model / name).write_bytes(content)
    with pytest.raises(CardError, match=match):
        from_dir(model)


def test_a_typed_slot_above_the_frontend_ceiling_is_refused_before_hashing(
    make_model_dir: MakeDir,
) -> None:
    model = make_model_dir()
    (model / "tokenizer.json").unlink()
    with (model / "tokenizer.json").open("wb") as fh:
        fh.truncate(MAX_FILE_SIZE + 1)
    with pytest.raises(CardError, match=f"tokenizer.json is {MAX_FILE_SIZE + 1} bytes, above"):
        from_dir(model)


def test_symlinked_extras_out_of_the_model_are_skipped_and_inside_ones_kept(
    make_model_dir: MakeDir, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_model_dir()
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    os.symlink("/etc/passwd", model / "passwd")
    os.symlink(secret, model / "secret.txt")
    (model / "sub").mkdir()
    (model / "sub" / "notes.txt").write_text("inside")
    os.symlink("sub/notes.txt", model / "notes.txt")
    card = from_dir(model, include_extra_files=True)
    assert "notes.txt" in _extras(card)
    assert not {"passwd", "secret.txt"} & _extras(card)
    for name in ("passwd", "secret.txt"):
        assert f"not publishing extra file {model / name}: it resolves to" in caplog.text


def test_a_symlinked_model_dir_is_its_own_root(make_model_dir: MakeDir, tmp_path: Path) -> None:
    model = make_model_dir()
    (model / "notes.txt").write_text("inside")
    link = tmp_path / "current"
    os.symlink(model, link)
    card = from_dir(link, include_extra_files=True)
    assert "notes.txt" in _extras(card)
    assert card.model_info is not None and card.model_info.file.path == str(link / "config.json")


def test_a_typed_slot_linking_out_of_the_model_is_refused(
    make_model_dir: MakeDir, tmp_path: Path
) -> None:
    model = make_model_dir()
    shared = tmp_path / "shared-tokenizer.json"
    (model / "tokenizer.json").rename(shared)
    os.symlink(shared, model / "tokenizer.json")
    with pytest.raises(ModelDirError, match=r"tokenizer\.json cannot be published: it resolves to"):
        from_dir(model)


def test_an_hf_snapshot_given_as_a_path_may_link_into_its_repo_blobs_only(
    make_model_dir: MakeDir, tmp_path: Path
) -> None:
    src = make_model_dir()
    repo = tmp_path / "models--org--m"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = blobs / _blake(f)
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    other = tmp_path / "models--org--other" / "blobs" / "abc"
    other.parent.mkdir(parents=True)
    other.write_text("another repo's blob")
    os.symlink(os.path.relpath(other, snap), snap / "other-repo-file.txt")
    assert model_root(snap) == repo.resolve()
    card = from_dir(snap, include_extra_files=True)
    assert "other-repo-file.txt" not in _extras(card)
    assert card.tokenizer is not None


def test_cancelled_hashing_stops_with_hash_cancelled(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as fh:
        fh.truncate(3 * HASH_CHUNK)
    stop = threading.Event()
    stop.set()
    for use_mmap in (True, False):
        with pytest.raises(HashCancelled, match=r"big\.bin"):
            hash_file(big, use_mmap=use_mmap, cancel=stop)
    assert hash_file(big, cancel=threading.Event())[1] == 3 * HASH_CHUNK
