"""The model deployment card and its wire codec (pure: no I/O).

Decoding goes field by field from a ``dict[str, msgspec.Raw]`` so that every error names the
field and shows the bad value, opaque fields (``runtime_config`` and friends) are kept as the
exact bytes received, and unknown fields are preserved and written back after the known ones.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, TypeGuard
from urllib.parse import urlsplit

import msgspec

from discovery_mdc.card._checksum import Checksum
from discovery_mdc.card._slug import slugify, validate_slug
from discovery_mdc.errors import CardDecodeError, CardError

# What msgspec raises on hostile bytes besides DecodeError: bad UTF-8 inside an object key
# (UnicodeDecodeError) and nesting deeper than the interpreter's recursion limit. Found by
# tests/test_fuzz_decoder.py; each must become a CardDecodeError, never escape the watcher.
_DECODE_ERRORS: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

__all__ = [
    "MODEL_TYPE_FLAGS",
    "CheckedFile",
    "LoraInfo",
    "ModelDeploymentCard",
    "ModelInput",
    "Slot",
    "SlotVariant",
    "WorkerType",
    "decode_card",
    "encode_card",
    "format_model_type",
    "is_url",
    "parse_model_type",
    "uri_basename",
]

MODEL_TYPE_FLAGS: Final = (
    "Chat", "Completions", "Embedding", "TensorBased", "Prefill", "Images", "Audios",
    "Videos", "Realtime", "Classify", "Pooling", "Rerank",
)  # fmt: skip


class WorkerType(enum.StrEnum):
    """Processing stage of a worker; the value is the wire string."""

    PREFILL = "prefill"
    DECODE = "decode"
    ENCODE = "encode"
    AGGREGATED = "aggregated"


WORKER_TYPE_BYTE: Final[Mapping[WorkerType | None, int]] = {
    None: 0,
    WorkerType.PREFILL: 1,
    WorkerType.DECODE: 2,
    WorkerType.ENCODE: 3,
    WorkerType.AGGREGATED: 4,
}


class ModelInput(enum.StrEnum):
    """What the engine consumes."""

    TEXT = "Text"
    TOKENS = "Tokens"
    TENSOR = "Tensor"


class SlotVariant(enum.StrEnum):
    """The external tag of a typed slot."""

    HF_CONFIG_JSON = "hf_config_json"
    HF_TOKENIZER_JSON = "hf_tokenizer_json"
    TIK_TOKEN_MODEL = "tik_token_model"
    HF_TOKENIZER_CONFIG_JSON = "hf_tokenizer_config_json"
    HF_CHAT_TEMPLATE = "hf_chat_template"
    HF_CHAT_TEMPLATE_JSON = "hf_chat_template_json"
    HF_GENERATION_CONFIG_JSON = "hf_generation_config_json"


_CHAT_TEMPLATE_VARIANTS: Final = frozenset(
    {SlotVariant.HF_CHAT_TEMPLATE, SlotVariant.HF_CHAT_TEMPLATE_JSON}
)
_READ_ALIASES: Final = {"hf_chat_template_jinja": SlotVariant.HF_CHAT_TEMPLATE}
# Which variants each slot field accepts. Rust shares one enum between prompt_formatter and
# chat_template_file, so both accept all three prompt-formatter variants.
_PROMPT_VARIANTS: Final = frozenset(
    {SlotVariant.HF_TOKENIZER_CONFIG_JSON, *_CHAT_TEMPLATE_VARIANTS}
)
SLOT_FIELDS: Final[tuple[tuple[str, frozenset[SlotVariant]], ...]] = (
    ("model_info", frozenset({SlotVariant.HF_CONFIG_JSON})),
    ("tokenizer", frozenset({SlotVariant.HF_TOKENIZER_JSON, SlotVariant.TIK_TOKEN_MODEL})),
    ("prompt_formatter", _PROMPT_VARIANTS),
    ("chat_template_file", _PROMPT_VARIANTS),
    ("gen_config", frozenset({SlotVariant.HF_GENERATION_CONFIG_JSON})),
)


def is_url(path: str) -> bool:
    """True when ``path`` parses as an absolute URL with a scheme (not a local path)."""
    scheme = urlsplit(path).scheme
    # A one-letter "scheme" is a Windows drive letter, not a URL.
    return len(scheme) > 1 and "://" in path


def uri_basename(path: str) -> str:
    """The last non-empty segment of a URL's path, or a local path's file name."""
    if is_url(path):
        segments = [s for s in urlsplit(path).path.split("/") if s]
        return segments[-1] if segments else ""
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


class CheckedFile(msgspec.Struct, frozen=True):
    """A metadata file: where it is, its blake3 checksum and (new-format cards) its size."""

    path: str
    checksum: Checksum
    size: int | None = None

    @property
    def basename(self) -> str:
        """The file name from the path or URL as given."""
        return uri_basename(self.path)

    @property
    def is_url(self) -> bool:
        return is_url(self.path)

    def with_path(self, path: str) -> CheckedFile:
        return msgspec.structs.replace(self, path=path)


class Slot(msgspec.Struct, frozen=True):
    """A typed slot: its variant tag, the file, and ``is_custom`` for chat templates."""

    variant: SlotVariant
    file: CheckedFile
    is_custom: bool = False


class LoraInfo(msgspec.Struct, frozen=True):
    name: str
    max_gpu_lora_count: int | None = None


class ModelDeploymentCard(msgspec.Struct, frozen=True, kw_only=True):
    """The model deployment card. Build one with :func:`from_dir` or :func:`decode_card`."""

    display_name: str
    slug: str
    source_path: str | None = None
    model_info: Slot | None = None
    tokenizer: Slot | None = None
    prompt_formatter: Slot | None = None
    chat_template_file: Slot | None = None
    gen_config: Slot | None = None
    prompt_context: tuple[str, ...] | None = None
    architectural_max_context_length: int | None = None
    context_length: int | None = None
    kv_cache_block_size: int = 16
    migration_limit: int = 0
    model_type: tuple[str, ...] = ("Chat", "Completions")
    model_input: ModelInput = ModelInput.TOKENS
    worker_type: WorkerType | None = None
    needs: tuple[tuple[WorkerType, ...], ...] = ()
    lora: LoraInfo | None = None
    aliases: tuple[str, ...] = ()
    runtime_config: msgspec.Raw | None = None
    extra_files: tuple[CheckedFile, ...] = ()
    # Every other field, as the exact JSON received, in the order received.
    opaque: dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)

    @classmethod
    def new(cls, display_name: str, **fields: Any) -> ModelDeploymentCard:
        """A card whose slug is derived from ``display_name``."""
        return cls(display_name=display_name, slug=slugify(display_name), **fields)

    def replace(self, **changes: Any) -> ModelDeploymentCard:
        return msgspec.structs.replace(self, **changes)

    @property
    def runtime_context_length(self) -> int | None:
        """``runtime_config.context_length`` when present and not null."""
        if self.runtime_config is None:
            return None
        try:
            rc = msgspec.json.decode(self.runtime_config, type=_RuntimeContext)
        except _DECODE_ERRORS:
            return None
        return rc.context_length

    def effective_context_length(self) -> int:
        """runtime_config.context_length, else architectural max, else context_length, else 0."""
        for value in (
            self.runtime_context_length,
            self.architectural_max_context_length,
            self.context_length,
        ):
            if value is not None:
                return value
        return 0

    def slots(self) -> Iterator[tuple[str, Slot]]:
        """Populated typed slots in spec order as ``(field, slot)``."""
        for name, _ in SLOT_FIELDS:
            slot = getattr(self, name)
            if slot is not None:
                yield name, slot

    def files(self) -> Iterator[tuple[str, CheckedFile]]:
        """Every populated metadata file in spec order: typed slots, then ``extra_files``.

        The first item names the slot (``extra_files[i]`` for extras).
        """
        for name, slot in self.slots():
            yield name, slot.file
        for i, extra in enumerate(self.extra_files):
            yield f"extra_files[{i}]", extra

    def map_files(self, fn: Callable[[str, CheckedFile], CheckedFile]) -> ModelDeploymentCard:
        """A copy with every populated file replaced by ``fn(slot_name, file)``.

        This is the one mechanism behind self-hosting, ``hf://`` rewriting and pointing a card
        at the local cache.
        """
        changes: dict[str, Any] = {}
        for name, slot in self.slots():
            changes[name] = msgspec.structs.replace(slot, file=fn(name, slot.file))
        changes["extra_files"] = tuple(
            fn(f"extra_files[{i}]", extra) for i, extra in enumerate(self.extra_files)
        )
        return msgspec.structs.replace(self, **changes)

    def with_paths(self, fn: Callable[[str, CheckedFile], str]) -> ModelDeploymentCard:
        """A copy with each file's path replaced by ``fn(slot_name, file)``."""
        return self.map_files(lambda name, f: f.with_path(fn(name, f)))

    @property
    def lora_slug(self) -> str | None:
        return slugify(self.lora.name) if self.lora is not None else None


class _RuntimeContext(msgspec.Struct):
    context_length: int | None = None


# --------------------------------------------------------------------------- model_type


def parse_model_type(text: str) -> tuple[str, ...]:
    """Parse ``"Chat | Completions"`` (spaces optional) into flags in canonical order."""
    if not isinstance(text, str):
        raise CardError(f"invalid model_type {text!r}: expected a string")
    if text.strip() == "":
        return ()
    names = [part.strip() for part in text.split("|")]
    unknown = [n for n in names if n not in MODEL_TYPE_FLAGS]
    if unknown:
        raise CardError(
            f"invalid model_type {text!r}: unknown flag(s) {unknown}; "
            f"expected names from {list(MODEL_TYPE_FLAGS)}"
        )
    return tuple(f for f in MODEL_TYPE_FLAGS if f in names)


def format_model_type(flags: tuple[str, ...]) -> str:
    return " | ".join(f for f in MODEL_TYPE_FLAGS if f in flags)


# --------------------------------------------------------------------------- decoding

_raw_dict_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
U32_MAX: Final = 2**32 - 1


def is_u32(value: object) -> TypeGuard[int]:
    """True for an ``int`` (not a ``bool``) in ``0..2**32-1``: the one u32 rule.

    The decoder checks the card fields the mdcsum packs as u32 with it, and ``from_dir`` the
    context lengths it reads from a model's JSON (which must also be positive there).
    """
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U32_MAX


class _WireCheckedFile(msgspec.Struct, forbid_unknown_fields=False):
    path: str
    checksum: str
    size: int | None = None


class _WireChatTemplate(msgspec.Struct, forbid_unknown_fields=False):
    file: _WireCheckedFile
    is_custom: bool = False


def _snippet(raw: bytes) -> str:
    text = bytes(raw).decode("utf-8", "replace")
    return text if len(text) <= 200 else text[:200] + "..."


def _typed(field: str, raw: msgspec.Raw, type_: Any) -> Any:
    try:
        return msgspec.json.decode(raw, type=type_)
    except _DECODE_ERRORS as exc:
        raise CardDecodeError(
            f"invalid card field {field!r}: {exc}; value: {_snippet(raw)}"
        ) from None


def _u32(field: str, value: int) -> int:
    if not is_u32(value):
        raise CardDecodeError(f"invalid card field {field!r}: {value} is not a u32")
    return value


def _checked_file(field: str, wire: _WireCheckedFile) -> CheckedFile:
    try:
        checksum = Checksum.parse(wire.checksum)
    except CardError as exc:
        raise CardDecodeError(f"invalid card field {field!r}: {exc}") from None
    if wire.size is not None and wire.size < 0:
        raise CardDecodeError(f"invalid card field {field!r}: negative size {wire.size}")
    if wire.path == "" or "\x00" in wire.path:
        raise CardDecodeError(f"invalid card field {field!r}: bad path {wire.path!r}")
    return CheckedFile(wire.path, checksum, wire.size)


def _decode_slot(field: str, raw: msgspec.Raw, allowed: frozenset[SlotVariant]) -> Slot | None:
    value = _typed(field, raw, dict[str, msgspec.Raw] | None)
    if value is None:
        return None
    if len(value) != 1:
        raise CardDecodeError(
            f"invalid card field {field!r}: expected one variant tag, got {list(value)}"
        )
    ((tag, payload),) = value.items()
    variant_name = _READ_ALIASES.get(tag, tag)
    try:
        variant = SlotVariant(variant_name)
    except ValueError:
        variant = None
    if variant is None or variant not in allowed:
        raise CardDecodeError(
            f"invalid card field {field!r}: unknown variant {tag!r}; "
            f"expected one of {sorted(allowed)}"
        )
    if variant in _CHAT_TEMPLATE_VARIANTS:
        tmpl = _typed(f"{field}.{tag}", payload, _WireChatTemplate)
        return Slot(variant, _checked_file(f"{field}.{tag}.file", tmpl.file), tmpl.is_custom)
    return Slot(variant, _checked_file(f"{field}.{tag}", _typed(field, payload, _WireCheckedFile)))


def _worker_type(field: str, value: str) -> WorkerType:
    try:
        return WorkerType(value)
    except ValueError:
        raise CardDecodeError(
            f"invalid card field {field!r}: {value!r} is not one of {[w.value for w in WorkerType]}"
        ) from None


# A field decoder turns one top-level field's raw JSON into the value for the card's
# constructor, or _DEFAULT to leave the field at its default (a null u32 field).
_FieldDecoder = Callable[[str, msgspec.Raw], Any]
_DEFAULT: Final = object()


def _plain(type_: Any) -> _FieldDecoder:
    return lambda field, raw: _typed(field, raw, type_)


def _slot_field(allowed: frozenset[SlotVariant]) -> _FieldDecoder:
    return lambda field, raw: _decode_slot(field, raw, allowed)


def _slug_field(field: str, raw: msgspec.Raw) -> str:
    try:
        return validate_slug(_typed(field, raw, str))
    except CardError as exc:
        raise CardDecodeError(f"invalid card field {field!r}: {exc}") from None


def _u32_field(field: str, raw: msgspec.Raw) -> Any:
    value = _typed(field, raw, int | None)
    return _DEFAULT if value is None else _u32(field, value)


def _prompt_context_field(field: str, raw: msgspec.Raw) -> tuple[str, ...] | None:
    pc = _typed(field, raw, list[str] | None)
    return tuple(pc) if pc is not None else None


def _model_type_field(field: str, raw: msgspec.Raw) -> tuple[str, ...]:
    try:
        return parse_model_type(_typed(field, raw, str))
    except CardError as exc:
        raise CardDecodeError(str(exc)) from None


def _model_input_field(field: str, raw: msgspec.Raw) -> ModelInput:
    text = _typed(field, raw, str)
    try:
        return ModelInput(text)
    except ValueError:
        raise CardDecodeError(
            f"invalid card field {field!r}: {text!r} is not one of {[m.value for m in ModelInput]}"
        ) from None


def _worker_type_field(field: str, raw: msgspec.Raw) -> WorkerType | None:
    wt = _typed(field, raw, str | None)
    return _worker_type(field, wt) if wt is not None else None


def _needs_field(field: str, raw: msgspec.Raw) -> tuple[tuple[WorkerType, ...], ...]:
    needs = _typed(field, raw, list[list[str]] | None) or []
    return tuple(tuple(_worker_type(field, w) for w in alt) for alt in needs)


def _lora_field(field: str, raw: msgspec.Raw) -> LoraInfo | None:
    lora: LoraInfo | None = _typed(field, raw, LoraInfo | None)
    if lora is not None and lora.max_gpu_lora_count is not None:
        _u32(f"{field}.max_gpu_lora_count", lora.max_gpu_lora_count)
    return lora


def _aliases_field(field: str, raw: msgspec.Raw) -> tuple[str, ...]:
    return tuple(_typed(field, raw, list[str] | None) or ())


def _runtime_config_field(field: str, raw: msgspec.Raw) -> msgspec.Raw | None:
    runtime = _typed(field, raw, _RuntimeContext | None)
    if runtime is None:
        return None
    if runtime.context_length is not None:
        # It feeds the mdcsum as a u32, so it must be one.
        _u32(f"{field}.context_length", runtime.context_length)
    return raw  # kept byte for byte


def _extra_files_field(field: str, raw: msgspec.Raw) -> tuple[CheckedFile, ...]:
    extras = _typed(field, raw, list[_WireCheckedFile] | None) or []
    return tuple(_checked_file(f"{field}[{i}]", w) for i, w in enumerate(extras))


#: The known card fields and their decoders; every other field is kept as opaque raw JSON.
_FIELD_DECODERS: Final[Mapping[str, _FieldDecoder]] = {
    "display_name": _plain(str),
    "slug": _slug_field,
    "source_path": _plain(str | None),
    **{name: _slot_field(allowed) for name, allowed in SLOT_FIELDS},
    "prompt_context": _prompt_context_field,
    "architectural_max_context_length": _u32_field,
    "context_length": _u32_field,
    "kv_cache_block_size": _u32_field,
    "migration_limit": _u32_field,
    "model_type": _model_type_field,
    "model_input": _model_input_field,
    "worker_type": _worker_type_field,
    "needs": _needs_field,
    "lora": _lora_field,
    "aliases": _aliases_field,
    "runtime_config": _runtime_config_field,
    "extra_files": _extra_files_field,
}


def decode_card(data: bytes | str | msgspec.Raw) -> ModelDeploymentCard:
    """Decode card JSON. Raises :class:`CardDecodeError` (a ``ValueError``) naming the field."""
    try:
        fields = _raw_dict_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise CardDecodeError(f"card is not a JSON object: {exc}") from None
    return card_from_fields(fields)


def card_from_fields(fields: dict[str, msgspec.Raw]) -> ModelDeploymentCard:
    """Build a card from its top-level fields, each still raw JSON."""
    kw: dict[str, Any] = {}
    opaque: dict[str, msgspec.Raw] = {}
    for key, raw in fields.items():
        decode = _FIELD_DECODERS.get(key)
        if decode is None:
            opaque[key] = raw
            continue
        value = decode(key, raw)
        if value is not _DEFAULT:
            kw[key] = value
    for required in ("display_name", "slug"):
        if required not in kw:
            raise CardDecodeError(f"invalid card: missing required field {required!r}")
    return ModelDeploymentCard(**kw, opaque=opaque)


# --------------------------------------------------------------------------- encoding

# The reference's field order; opaque fields we know by name keep their position.
_FIELD_ORDER: Final = (
    "display_name", "slug", "source_path", "model_info", "tokenizer", "prompt_formatter",
    "chat_template_file", "gen_config", "prompt_context", "architectural_max_context_length",
    "context_length", "kv_cache_block_size", "migration_limit", "model_type", "model_input",
    "worker_type", "needs", "lora", "aliases", "user_data", "runtime_config",
    "tensor_model_config", "media_decoder", "media_fetcher", "router_config",
    "indexer_identity", "extra_files",
)  # fmt: skip

_encoder: Final = msgspec.json.Encoder()


def _wire_file(f: CheckedFile) -> dict[str, Any]:
    out: dict[str, Any] = {"path": f.path, "checksum": str(f.checksum)}
    if f.size is not None:
        out["size"] = f.size
    return out


def _wire_slot(slot: Slot) -> dict[str, Any]:
    if slot.variant in _CHAT_TEMPLATE_VARIANTS:
        return {slot.variant.value: {"is_custom": slot.is_custom, "file": _wire_file(slot.file)}}
    return {slot.variant.value: _wire_file(slot.file)}


def card_to_wire(card: ModelDeploymentCard) -> dict[str, Any]:
    """The card as an ordered dict of JSON-ready values (opaque fields stay raw)."""
    known: dict[str, Any] = {
        "display_name": card.display_name,
        "slug": card.slug,
        "model_info": _wire_slot(card.model_info) if card.model_info else None,
        "tokenizer": _wire_slot(card.tokenizer) if card.tokenizer else None,
        "context_length": card.effective_context_length(),
        "kv_cache_block_size": card.kv_cache_block_size,
        "migration_limit": card.migration_limit,
        "model_type": format_model_type(card.model_type),
        "model_input": card.model_input.value,
        "worker_type": card.worker_type.value if card.worker_type else None,
        "needs": [[w.value for w in alt] for alt in card.needs],
        "runtime_config": card.runtime_config
        if card.runtime_config is not None
        else msgspec.Raw(b"{}"),
    }
    if card.source_path is not None:
        known["source_path"] = card.source_path
    for name in ("prompt_formatter", "chat_template_file", "gen_config"):
        slot = getattr(card, name)
        if slot is not None:
            known[name] = _wire_slot(slot)
    if card.prompt_context:
        known["prompt_context"] = list(card.prompt_context)
    if card.architectural_max_context_length is not None:
        known["architectural_max_context_length"] = card.architectural_max_context_length
    if card.lora is not None:
        lora: dict[str, Any] = {"name": card.lora.name}
        if card.lora.max_gpu_lora_count is not None:
            lora["max_gpu_lora_count"] = card.lora.max_gpu_lora_count
        known["lora"] = lora
    if card.aliases:
        known["aliases"] = list(card.aliases)
    if card.extra_files:
        known["extra_files"] = [_wire_file(f) for f in card.extra_files]
    known.update(card.opaque)
    out: dict[str, Any] = {k: known.pop(k) for k in _FIELD_ORDER if k in known}
    out.update(known)  # unknown fields, in the order received
    return out


def encode_card(card: ModelDeploymentCard) -> bytes:
    """Encode a card as compact wire JSON."""
    return _encoder.encode(card_to_wire(card))
