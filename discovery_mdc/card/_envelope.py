"""The DiscoveryInstance envelope stored in etcd, and the etcd key layout."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

import msgspec

from discovery_mdc.card._model import (
    _DECODE_ERRORS,
    ModelDeploymentCard,
    card_to_wire,
    decode_card,
)
from discovery_mdc.card._slug import validate_slug
from discovery_mdc.errors import CardDecodeError, CardError

__all__ = [
    "MDC_PREFIX",
    "INSTANCES_PREFIX",
    "CardKey",
    "ModelEnvelope",
    "card_key",
    "decode_envelope",
    "encode_envelope",
    "endpoint_key",
    "parse_card_key",
]

MDC_PREFIX: Final = "v1/mdc/"
INSTANCES_PREFIX: Final = "v1/instances/"
_HEX_ID: Final = re.compile(r"[0-9a-f]{1,16}")
_SEGMENT: Final = re.compile(r"[^/\x00]+")
_U64_MAX: Final = 2**64 - 1


class CardKey(msgspec.Struct, frozen=True):
    """The parts of a ``v1/mdc/{ns}/{component}/{endpoint}/{id:x}[/{lora}]`` key."""

    namespace: str
    component: str
    endpoint: str
    instance_id: int
    lora_slug: str | None = None

    def __str__(self) -> str:
        return card_key(
            self.namespace, self.component, self.endpoint, self.instance_id, self.lora_slug
        )


def _check_segment(name: str, value: str) -> str:
    if not _SEGMENT.fullmatch(value):
        raise CardError(f"invalid {name} {value!r}: must be non-empty and contain no '/'")
    return value


def card_key(
    namespace: str,
    component: str,
    endpoint: str,
    instance_id: int,
    lora_slug: str | None = None,
) -> str:
    """``v1/mdc/{namespace}/{component}/{endpoint}/{instance_id:x}[/{lora_slug}]``."""
    parts = [
        _check_segment("namespace", namespace),
        _check_segment("component", component),
        _check_segment("endpoint", endpoint),
        f"{instance_id:x}",
    ]
    if lora_slug:
        parts.append(validate_slug(lora_slug, "lora slug"))
    return MDC_PREFIX + "/".join(parts)


def endpoint_key(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    """The Dynamo endpoint-instance record key, ``v1/instances/.../{instance_id:x}``."""
    parts = [
        _check_segment("namespace", namespace),
        _check_segment("component", component),
        _check_segment("endpoint", endpoint),
        f"{instance_id:x}",
    ]
    return INSTANCES_PREFIX + "/".join(parts)


def parse_card_key(key: str) -> CardKey | None:
    """Parse a card key; ``None`` if it is not one (e.g. a non-hex instance segment)."""
    if not key.startswith(MDC_PREFIX):
        return None
    parts = key[len(MDC_PREFIX) :].split("/")
    if len(parts) not in (4, 5) or not all(_SEGMENT.fullmatch(p) for p in parts):
        return None
    namespace, component, endpoint, hex_id = parts[:4]
    if not _HEX_ID.fullmatch(hex_id):
        return None
    lora = parts[4] if len(parts) == 5 else None
    if lora is not None and not re.fullmatch(r"[a-z0-9_-]+", lora):
        return None
    return CardKey(namespace, component, endpoint, int(hex_id, 16), lora)


class ModelEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """The ``{"type": "Model", ...}`` value of a card key."""

    namespace: str
    component: str
    endpoint: str
    instance_id: int
    card: ModelDeploymentCard
    model_suffix: str | None = None

    @property
    def key(self) -> str:
        return card_key(
            self.namespace,
            self.component,
            self.endpoint,
            self.instance_id,
            self.model_suffix,
        )


_encoder: Final = msgspec.json.Encoder()
_fields_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])


def encode_envelope(env: ModelEnvelope) -> bytes:
    out: dict[str, Any] = {
        "type": "Model",
        "namespace": env.namespace,
        "component": env.component,
        "endpoint": env.endpoint,
        "instance_id": env.instance_id,
        "card_json": card_to_wire(env.card),
    }
    if env.model_suffix is not None:
        out["model_suffix"] = env.model_suffix
    return _encoder.encode(out)


def _field(fields: dict[str, msgspec.Raw], name: str, type_: Any) -> Any:
    if name not in fields:
        raise CardDecodeError(f"invalid envelope: missing field {name!r}")
    try:
        return msgspec.json.decode(fields[name], type=type_)
    except _DECODE_ERRORS as exc:
        value = bytes(fields[name])[:200].decode("utf-8", "replace")
        raise CardDecodeError(f"invalid envelope field {name!r}: {exc}; value: {value}") from None


def decode_envelope(
    data: bytes | str,
    *,
    card_decoder: Callable[[msgspec.Raw], ModelDeploymentCard] = decode_card,
) -> ModelEnvelope:
    """Decode an envelope. Raises :class:`CardDecodeError` (a ``ValueError``).

    ``card_decoder`` turns the raw ``card_json`` into a card; a caller that sees the same
    card many times (one per replica) can pass a memoizing one.
    """
    try:
        fields = _fields_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise CardDecodeError(f"envelope is not a JSON object: {exc}") from None
    kind = _field(fields, "type", str)
    if kind != "Model":
        raise CardDecodeError(f"invalid envelope field 'type': expected 'Model', got {kind!r}")
    instance_id = _field(fields, "instance_id", int)
    if not 0 <= instance_id <= _U64_MAX:
        raise CardDecodeError(f"invalid envelope field 'instance_id': {instance_id} is not a u64")
    if "card_json" not in fields:
        raise CardDecodeError("invalid envelope: missing field 'card_json'")
    card_json = fields["card_json"]
    suffix = _field(fields, "model_suffix", str | None) if "model_suffix" in fields else None
    return ModelEnvelope(
        namespace=_field(fields, "namespace", str),
        component=_field(fields, "component", str),
        endpoint=_field(fields, "endpoint", str),
        instance_id=instance_id,
        card=card_decoder(card_json),
        model_suffix=suffix,
    )
