"""Build a card from an HF-style model directory. The only I/O in the card package: hashing."""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import msgspec

from discovery_mdc.card._checksum import hash_file
from discovery_mdc.card._model import (
    CheckedFile,
    ModelDeploymentCard,
    ModelInput,
    Slot,
    SlotVariant,
    WorkerType,
)
from discovery_mdc.card._slug import slugify
from discovery_mdc.errors import CardError, ModelDirError

__all__ = ["WEIGHT_PATTERNS", "from_dir", "list_extra_files"]

WEIGHT_PATTERNS: Final = (
    "*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth", "*.onnx", "*.h5", "*.msgpack",
    "*.tflite",
)  # fmt: skip


class _Hashed:
    """A file hashed once; ``data`` is kept for small files so JSON parsing needs no re-read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checksum, self.size, self.data = hash_file(path)

    def checked(self) -> CheckedFile:
        return CheckedFile(str(self.path), self.checksum, self.size)

    def json(self) -> Any:
        raw = self.data if self.data is not None else self.path.read_bytes()
        try:
            # The stdlib parser accepts NaN/Infinity, which some HF configs contain.
            return json.loads(raw)
        except ValueError as exc:
            raise CardError(f"{self.path} is not valid JSON: {exc}") from None


def _context_field(obj: Any, dotted: str, source: Path) -> int | None:
    node = obj
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int) or not 0 < node < 2**32:
        raise CardError(f"{source}: {dotted} must be a positive u32 integer, got {node!r}")
    return node


def _tokenizer(model_dir: Path) -> Slot | None:
    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        return Slot(SlotVariant.HF_TOKENIZER_JSON, _Hashed(tokenizer_json).checked())
    tiktoken_model = model_dir / "tiktoken.model"
    if tiktoken_model.is_file():
        return Slot(SlotVariant.TIK_TOKEN_MODEL, _Hashed(tiktoken_model).checked())
    candidates = sorted(p for p in model_dir.glob("*.tiktoken") if p.is_file())
    if len(candidates) > 1:
        raise CardError(
            f"{model_dir}: several *.tiktoken files ({[p.name for p in candidates]}); "
            "keep exactly one"
        )
    if candidates:
        return Slot(SlotVariant.TIK_TOKEN_MODEL, _Hashed(candidates[0]).checked())
    return None


# Dynamo 1.6.1 leaves exactly this name out of extra_files (case-sensitive: readme.md and
# README.MD are published). Skipping it too keeps the mdcsum of a self-hosting mixed replica
# set equal to Dynamo's; see docs/interop.md.
_NOT_EXTRA: Final = frozenset({"README.md"})


def _is_weight_or_hidden(name: str) -> bool:
    # Case-sensitive on every platform, as Dynamo matches (X.BIN is published as an extra).
    return name.startswith(".") or any(fnmatch.fnmatchcase(name, p) for p in WEIGHT_PATTERNS)


def list_extra_files(model_dir: Path, exclude: Iterable[str]) -> list[Path]:
    """Non-weight, non-hidden regular files directly in ``model_dir``, minus ``exclude`` and
    ``README.md`` (the files Dynamo publishes as ``extra_files``)."""
    skip = set(exclude)
    out = []
    for entry in sorted(os.scandir(model_dir), key=lambda e: e.name):
        if entry.name in skip or entry.name in _NOT_EXTRA or _is_weight_or_hidden(entry.name):
            continue
        if entry.is_file():  # follows symlinks, as HF cache snapshots need
            out.append(model_dir / entry.name)
    return out


def from_dir(
    model_dir: str | os.PathLike[str],
    *,
    display_name: str | None = None,
    source_path: str | None = None,
    custom_template: str | os.PathLike[str] | None = None,
    model_type: tuple[str, ...] = ("Chat", "Completions"),
    model_input: ModelInput = ModelInput.TOKENS,
    worker_type: WorkerType | None = WorkerType.AGGREGATED,
    kv_cache_block_size: int = 16,
    migration_limit: int = 0,
    include_extra_files: bool = False,
) -> ModelDeploymentCard:
    """Build a new-format card (every slot has ``size``) from an HF-style model directory.

    ``display_name`` defaults to the directory's base name; ``source_path`` to the path as
    given. Slot paths are the paths as given joined with the file name (not resolved), so an
    HF cache snapshot keeps its real file names.
    """
    given = os.fspath(model_dir)
    path = Path(given)
    if not path.is_dir():
        raise ModelDirError(f"model directory {given!r} does not exist or is not a directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelDirError(f"model directory {given!r} has no config.json")

    config = _Hashed(config_path)
    config_json = config.json()
    tokenizer = _tokenizer(path)

    prompt_formatter = None
    tokenizer_config_json: Any = None
    tc_path = path / "tokenizer_config.json"
    if tc_path.is_file():
        tc = _Hashed(tc_path)
        prompt_formatter = Slot(SlotVariant.HF_TOKENIZER_CONFIG_JSON, tc.checked())
        try:
            tokenizer_config_json = tc.json()
        except CardError:
            tokenizer_config_json = None

    chat_template = None
    if custom_template is not None:
        custom = Path(custom_template)
        if not custom.is_file():
            raise ModelDirError(f"custom chat template {os.fspath(custom)!r} does not exist")
        variant = (
            SlotVariant.HF_CHAT_TEMPLATE_JSON
            if custom.suffix == ".json"
            else SlotVariant.HF_CHAT_TEMPLATE
        )
        chat_template = Slot(variant, _Hashed(custom).checked(), is_custom=True)
    elif (path / "chat_template.jinja").is_file():
        chat_template = Slot(
            SlotVariant.HF_CHAT_TEMPLATE, _Hashed(path / "chat_template.jinja").checked()
        )
    elif (path / "chat_template.json").is_file():
        chat_template = Slot(
            SlotVariant.HF_CHAT_TEMPLATE_JSON, _Hashed(path / "chat_template.json").checked()
        )

    gen_config = None
    if (path / "generation_config.json").is_file():
        gen_config = Slot(
            SlotVariant.HF_GENERATION_CONFIG_JSON,
            _Hashed(path / "generation_config.json").checked(),
        )

    context_length = _context_field(
        config_json, "max_position_embeddings", config_path
    ) or _context_field(config_json, "text_config.max_position_embeddings", config_path)
    if context_length is None and isinstance(tokenizer_config_json, dict):
        # The reference treats an unusable model_max_length (often 1e30) as absent.
        mml = tokenizer_config_json.get("model_max_length")
        if isinstance(mml, int) and not isinstance(mml, bool) and 0 < mml < 2**32:
            context_length = mml

    slots: dict[str, Any] = {
        "model_info": Slot(SlotVariant.HF_CONFIG_JSON, config.checked()),
        "tokenizer": tokenizer,
        "prompt_formatter": prompt_formatter,
        "chat_template_file": chat_template,
        "gen_config": gen_config,
    }
    extra_files: tuple[CheckedFile, ...] = ()
    if include_extra_files:
        used = {s.file.basename for s in slots.values() if s is not None}
        extra_files = tuple(_Hashed(p).checked() for p in list_extra_files(path, used))

    name = display_name if display_name is not None else path.resolve().name
    return ModelDeploymentCard(
        display_name=name,
        slug=slugify(name),
        source_path=source_path if source_path is not None else given,
        architectural_max_context_length=context_length,
        context_length=context_length,
        kv_cache_block_size=kv_cache_block_size,
        migration_limit=migration_limit,
        model_type=model_type,
        model_input=model_input,
        worker_type=worker_type,
        extra_files=extra_files,
        runtime_config=msgspec.Raw(b"{}"),
        **slots,
    )
