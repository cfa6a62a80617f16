"""The pure core: the model deployment card, its wire format, slug, mdcsum and keys."""

from discovery_mdc.card._build import WEIGHT_PATTERNS, from_dir, list_extra_files
from discovery_mdc.card._checksum import Checksum, hash_bytes, hash_file
from discovery_mdc.card._diff import CardFieldDiff, card_diff, explain_card_diff
from discovery_mdc.card._envelope import (
    INSTANCES_PREFIX,
    MDC_PREFIX,
    CardKey,
    ModelEnvelope,
    card_key,
    decode_envelope,
    encode_envelope,
    endpoint_key,
    parse_card_key,
)
from discovery_mdc.card._mdcsum import is_new_format, mdcsum
from discovery_mdc.card._model import (
    MODEL_TYPE_FLAGS,
    CheckedFile,
    LoraInfo,
    ModelDeploymentCard,
    ModelInput,
    Slot,
    SlotVariant,
    WorkerType,
    decode_card,
    encode_card,
    format_model_type,
    is_url,
    parse_model_type,
    uri_basename,
)
from discovery_mdc.card._slug import slugify, validate_slug

__all__ = [
    "INSTANCES_PREFIX",
    "MDC_PREFIX",
    "MODEL_TYPE_FLAGS",
    "WEIGHT_PATTERNS",
    "CardFieldDiff",
    "CardKey",
    "CheckedFile",
    "Checksum",
    "LoraInfo",
    "ModelDeploymentCard",
    "ModelEnvelope",
    "ModelInput",
    "Slot",
    "SlotVariant",
    "WorkerType",
    "card_diff",
    "card_key",
    "decode_card",
    "decode_envelope",
    "encode_card",
    "encode_envelope",
    "endpoint_key",
    "explain_card_diff",
    "format_model_type",
    "from_dir",
    "hash_bytes",
    "hash_file",
    "is_new_format",
    "is_url",
    "list_extra_files",
    "mdcsum",
    "parse_card_key",
    "parse_model_type",
    "slugify",
    "uri_basename",
    "validate_slug",
]
