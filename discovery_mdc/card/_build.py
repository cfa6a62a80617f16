"""Build a card from an HF-style model directory. The only I/O in the card package: hashing.

What a worker publishes, every frontend must accept, so a model dir that would give a card
no frontend takes is refused here, with one line naming the file (the CLI exits 2), and
optional extra files a frontend could not take are left out with a warning:

* A typed slot (config, tokenizer, tokenizer_config, chat template, generation_config) that
  cannot be read, is above :data:`MAX_FILE_SIZE`, is a ``*.json`` that does not parse (an
  empty file included), or is a symlink out of the model: refused.
* An extra file that cannot be read, is above :data:`MAX_FILE_SIZE`, is not a regular file,
  or is a symlink whose target is outside the model: skipped with a warning. Extras are
  opaque: their content is never parsed, on either side.

"Inside the model" means inside the real path of the model dir, or for an HF cache snapshot
(``<repo>/snapshots/<rev>`` next to ``<repo>/blobs/``, which its files link into) inside the
repo's cache dir ``<repo>``. A custom chat template is named by the operator and may live
anywhere.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import stat
import threading
from collections.abc import Iterable, Iterator
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
    is_u32,
)
from discovery_mdc.card._slug import slugify
from discovery_mdc.errors import CardError, ModelDirError

__all__ = [
    "MAX_FILE_SIZE",
    "MAX_PARSED_JSON",
    "WEIGHT_PATTERNS",
    "from_dir",
    "json_slot_files",
    "list_extra_files",
    "load_json",
    "model_root",
]

log = logging.getLogger("discovery_mdc.card")

WEIGHT_PATTERNS: Final = (
    "*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth", "*.onnx", "*.h5", "*.msgpack",
    "*.tflite",
)  # fmt: skip

#: The largest metadata file a frontend accepts (its cache's ceiling), so the largest a
#: worker publishes.
MAX_FILE_SIZE: Final = 1 << 30
#: ``*.json`` slots above this are not parsed by the default checks (worker and frontend):
#: parsing builds objects several times the file's size; the host's loader decides.
MAX_PARSED_JSON: Final = 64 << 20


def load_json(data: bytes, where: str) -> Any:
    """Parse metadata JSON as every check here does (stdlib: NaN/Infinity, as some HF configs
    contain, are accepted). Raises :class:`CardError` naming ``where``."""
    if not data.strip():
        raise CardError(f"{where} is empty ({len(data)} bytes); it must hold JSON")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CardError(f"{where} is not valid JSON: {exc}") from None


def json_slot_files(card: ModelDeploymentCard) -> Iterator[tuple[str, CheckedFile]]:
    """The files a frontend parses: typed slots named ``*.json`` (never ``extra_files``)."""
    for name, slot in card.slots():
        if slot.file.basename.endswith(".json"):
            yield name, slot.file


def model_root(model_dir: str | os.PathLike[str]) -> Path:
    """The real directory a model's files must stay in: the model dir's real path, or for an
    HF cache snapshot the repo's cache dir (the snapshot's files link into its ``blobs/``)."""
    real = Path(os.path.realpath(model_dir))
    repo = real.parent.parent
    if real.parent.name == "snapshots" and (repo / "blobs").is_dir():
        return repo
    return real


def _outside(path: Path, root: Path) -> str | None:
    """Why ``path`` may not be published from a model rooted at ``root``, or None."""
    real = os.path.realpath(path)
    if os.path.commonpath([real, root]) != os.fspath(root):
        return f"it resolves to {real}, outside the model ({root})"
    try:
        st = os.stat(real)
    except OSError as exc:
        return f"cannot stat it: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    return None


class _Hashed:
    """A file hashed once; ``data`` is kept for small files so JSON parsing needs no re-read."""

    def __init__(self, path: Path, cancel: threading.Event | None = None) -> None:
        self.path = path
        self.checksum, self.size, self.data = hash_file(path, cancel=cancel)

    def checked(self) -> CheckedFile:
        return CheckedFile(str(self.path), self.checksum, self.size)

    def json(self) -> Any:
        try:
            raw = self.data if self.data is not None else self.path.read_bytes()
        except OSError as exc:
            raise ModelDirError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        return load_json(raw, str(self.path))


def _context_field(obj: Any, dotted: str, source: Path) -> int | None:
    node = obj
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if not (is_u32(node) and node > 0):
        raise CardError(f"{source}: {dotted} must be a positive u32 integer, got {node!r}")
    return node


def context_length(config: Any, tokenizer_config: Any, config_path: Path) -> int | None:
    """The architectural context length of a model, as the reference reads it.

    ``max_position_embeddings`` of ``config.json`` (else of its ``text_config``), which must
    be a positive u32 when present (:class:`CardError` otherwise); else ``tokenizer_config``'s
    ``model_max_length`` when it is one (the reference treats an unusable value, often
    ``1e30``, as absent); else None.
    """
    for dotted in ("max_position_embeddings", "text_config.max_position_embeddings"):
        value = _context_field(config, dotted, config_path)
        if value is not None:
            return value
    if isinstance(tokenizer_config, dict):
        mml = tokenizer_config.get("model_max_length")
        if is_u32(mml) and mml > 0:
            return mml
    return None


# Where each typed slot is found in a model dir: the first candidate that is a file wins. A
# candidate with a '*' is a pattern that must match exactly one file.
_SLOT_CANDIDATES: Final[tuple[tuple[str, tuple[tuple[str, SlotVariant], ...]], ...]] = (
    ("model_info", (("config.json", SlotVariant.HF_CONFIG_JSON),)),
    (
        "tokenizer",
        (
            ("tokenizer.json", SlotVariant.HF_TOKENIZER_JSON),
            ("tiktoken.model", SlotVariant.TIK_TOKEN_MODEL),
            ("*.tiktoken", SlotVariant.TIK_TOKEN_MODEL),
        ),
    ),
    ("prompt_formatter", (("tokenizer_config.json", SlotVariant.HF_TOKENIZER_CONFIG_JSON),)),
    (
        "chat_template_file",
        (
            ("chat_template.jinja", SlotVariant.HF_CHAT_TEMPLATE),
            ("chat_template.json", SlotVariant.HF_CHAT_TEMPLATE_JSON),
        ),
    ),
    ("gen_config", (("generation_config.json", SlotVariant.HF_GENERATION_CONFIG_JSON),)),
)
# Slots whose JSON from_dir reads (for the context length), parsed as soon as they are hashed.
_READ_SLOTS: Final = ("model_info", "prompt_formatter")


class _Reader:
    """Hashes the typed-slot files of one model dir, refusing what no frontend would take."""

    def __init__(self, model_dir: Path, root: Path, cancel: threading.Event | None) -> None:
        self.model_dir = model_dir
        self.root = root
        self.cancel = cancel
        self.hashed: dict[Path, _Hashed] = {}

    def slot(self, path: Path, *, contained: bool = True) -> _Hashed:
        if contained and (why := _outside(path, self.root)) is not None:
            raise ModelDirError(f"{path} cannot be published: {why}; copy the file into the model")
        try:
            size = path.stat().st_size
            if size > MAX_FILE_SIZE:
                raise CardError(
                    f"{path} is {size} bytes, above the {MAX_FILE_SIZE}-byte ceiling a frontend "
                    "accepts for one metadata file"
                )
            hashed = self.hashed[path] = _Hashed(path, self.cancel)
            return hashed
        except OSError as exc:
            raise ModelDirError(f"cannot read {path}: {exc.strerror or exc}") from None

    def json(self, slot: Slot) -> Any:
        """The parsed JSON of a slot this reader hashed."""
        return self.hashed[Path(slot.file.path)].json()

    def check_json(self, slots: Iterable[Slot | None], parsed: set[Path]) -> None:
        """Parse every ``*.json`` typed slot a frontend parses (``parsed``: done already)."""
        for slot in slots:
            if slot is None or not slot.file.basename.endswith(".json"):
                continue
            hashed = self.hashed[Path(slot.file.path)]
            if hashed.path not in parsed and hashed.size <= MAX_PARSED_JSON:
                self.json(slot)

    def find(self, candidates: tuple[tuple[str, SlotVariant], ...]) -> Slot | None:
        """The slot of the first candidate present in the model dir, hashed; or None."""
        for name, variant in candidates:
            if "*" in name:
                matches = sorted(p for p in self.model_dir.glob(name) if p.is_file())
                if len(matches) > 1:
                    raise CardError(
                        f"{self.model_dir}: several {name} files ({[p.name for p in matches]}); "
                        "keep exactly one"
                    )
                path = matches[0] if matches else None
            else:
                path = self.model_dir / name if (self.model_dir / name).is_file() else None
            if path is not None:
                return Slot(variant, self.slot(path).checked())
        return None

    def custom_template(self, template: str | os.PathLike[str]) -> Slot:
        """The operator's chat template, from anywhere (``.json``: the JSON variant)."""
        custom = Path(template)
        if not custom.is_file():
            raise ModelDirError(f"custom chat template {os.fspath(custom)!r} does not exist")
        variant = (
            SlotVariant.HF_CHAT_TEMPLATE_JSON
            if custom.suffix == ".json"
            else SlotVariant.HF_CHAT_TEMPLATE
        )
        return Slot(variant, self.slot(custom, contained=False).checked(), is_custom=True)


# Dynamo 1.6.1 leaves exactly this name out of extra_files (case-sensitive: readme.md and
# README.MD are published). Skipping it too keeps the mdcsum of a self-hosting mixed replica
# set equal to Dynamo's; see docs/interop.md.
_NOT_EXTRA: Final = frozenset({"README.md"})


def _is_weight_or_hidden(name: str) -> bool:
    # Case-sensitive on every platform, as Dynamo matches (X.BIN is published as an extra).
    return name.startswith(".") or any(fnmatch.fnmatchcase(name, p) for p in WEIGHT_PATTERNS)


def list_extra_files(
    model_dir: Path, exclude: Iterable[str], *, root: Path | None = None
) -> list[Path]:
    """Non-weight, non-hidden regular files directly in ``model_dir``, minus ``exclude`` and
    ``README.md`` (the files Dynamo publishes as ``extra_files``), minus (with a warning) any
    a frontend could not take: above :data:`MAX_FILE_SIZE`, or resolving outside ``root``
    (default :func:`model_root` of ``model_dir``)."""
    skip = set(exclude)
    root = model_root(model_dir) if root is None else root
    out = []
    for entry in sorted(os.scandir(model_dir), key=lambda e: e.name):
        if entry.name in skip or entry.name in _NOT_EXTRA or _is_weight_or_hidden(entry.name):
            continue
        if not entry.is_file():  # follows symlinks, as HF cache snapshots need
            continue
        path = model_dir / entry.name
        why = _outside(path, root)
        if why is None:
            size = entry.stat().st_size
            if size > MAX_FILE_SIZE:
                why = f"{size} bytes is above the {MAX_FILE_SIZE}-byte ceiling a frontend accepts"
        if why is not None:
            log.warning("not publishing extra file %s: %s", path, why)
            continue
        out.append(path)
    return out


def _hash_extras(paths: list[Path], cancel: threading.Event | None) -> tuple[CheckedFile, ...]:
    out = []
    for path in paths:
        try:
            out.append(_Hashed(path, cancel).checked())
        except OSError as exc:
            log.warning("not publishing extra file %s: cannot read it: %s", path,
                        exc.strerror or exc)  # fmt: skip
    return tuple(out)


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
    cancel: threading.Event | None = None,
) -> ModelDeploymentCard:
    """Build a new-format card (every slot has ``size``) from an HF-style model directory.

    ``display_name`` defaults to the directory's base name; ``source_path`` to the path as
    given. Slot paths are the paths as given joined with the file name (not resolved), so an
    HF cache snapshot keeps its real file names. Files no frontend would accept are refused
    or skipped as the module docstring says. Setting ``cancel`` stops hashing within a chunk
    (:class:`~discovery_mdc.card.HashCancelled`).
    """
    given = os.fspath(model_dir)
    path = Path(given)
    if not path.is_dir():
        raise ModelDirError(f"model directory {given!r} does not exist or is not a directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelDirError(f"model directory {given!r} has no config.json")

    reader = _Reader(path, model_root(path), cancel)
    slots: dict[str, Any] = {}  # field -> Slot | None, for the card's constructor
    parsed: dict[str, Any] = {}  # the JSON of the _READ_SLOTS, by field
    for field, candidates in _SLOT_CANDIDATES:
        slot = (
            reader.custom_template(custom_template)
            if field == "chat_template_file" and custom_template is not None
            else reader.find(candidates)
        )
        slots[field] = slot
        if field in _READ_SLOTS and slot is not None:
            parsed[field] = reader.json(slot)
    context = context_length(parsed["model_info"], parsed.get("prompt_formatter"), config_path)
    reader.check_json(slots.values(), parsed={config_path, path / "tokenizer_config.json"})
    extra_files: tuple[CheckedFile, ...] = ()
    if include_extra_files:
        used = {s.file.basename for s in slots.values() if s is not None}
        extra_files = _hash_extras(list_extra_files(path, used, root=reader.root), cancel)

    name = display_name if display_name is not None else path.resolve().name
    return ModelDeploymentCard(
        display_name=name,
        slug=slugify(name),
        source_path=source_path if source_path is not None else given,
        architectural_max_context_length=context,
        context_length=context,
        kv_cache_block_size=kv_cache_block_size,
        migration_limit=migration_limit,
        model_type=model_type,
        model_input=model_input,
        worker_type=worker_type,
        extra_files=extra_files,
        runtime_config=msgspec.Raw(b"{}"),
        **slots,
    )
