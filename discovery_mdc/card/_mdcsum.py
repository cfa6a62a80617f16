"""mdcsum: the worker-set identity of a card, and the new/legacy format check."""

from __future__ import annotations

import logging
import re
import struct
from typing import Any

import blake3
import msgspec

from discovery_mdc.card._model import WORKER_TYPE_BYTE, ModelDeploymentCard

__all__ = ["is_new_format", "mdcsum"]

log = logging.getLogger("discovery_mdc.card")

_INDEXER_IDENTITY_TAG = b"dynamo/model-card/indexer-identity/v1"


def _u32(value: int) -> bytes:
    return struct.pack(">I", value)


def _camel(item: str) -> str:
    """``oai_chat`` -> ``OaiChat`` (the reference hashes the Rust Debug name)."""
    if "_" not in item and item[:1].isupper():
        return item
    return "".join(part[:1].upper() + part[1:] for part in item.split("_"))


def _identity_dimension(value: Any) -> bytes:
    if not isinstance(value, dict):
        return b"\x00"
    out = bytearray(b"\x01")
    entries = sorted((str(k), str(v)) for k, v in value.items())
    out += struct.pack("<I", len(entries))
    for key, val in entries:
        for part in (key.encode(), val.encode()):
            out += struct.pack("<I", len(part)) + part
    return bytes(out)


def mdcsum(card: ModelDeploymentCard) -> str:
    """blake3 over the fields that define a worker set; paths, URLs and sizes excluded."""
    b = bytearray(card.display_name.encode())
    if card.source_path is not None:
        b += card.source_path.encode()
    for _, slot in card.slots():
        b += str(slot.file.checksum).encode()
    extras = sorted((f.basename.encode(), f.checksum.hex.encode()) for f in card.extra_files)
    for name, hexdigest in extras:
        b += name + b"\x00" + hexdigest
    if card.prompt_context is not None:
        b += ("[" + ", ".join(_camel(i) for i in card.prompt_context) + "]").encode()
    b += _u32(card.effective_context_length())
    b += _u32(card.kv_cache_block_size)
    b.append(WORKER_TYPE_BYTE[card.worker_type])
    b += _u32(len(card.needs))
    for alt in card.needs:
        b += _u32(len(alt))
        b += bytes(WORKER_TYPE_BYTE[w] for w in alt)
    # router_config: the reference appends blake3 of its serde JSON. A compact JSON object
    # received from a Rust worker is exactly those bytes, so hash the raw value as received.
    router = card.opaque.get("router_config")
    if router is not None and bytes(router) != b"null":
        b += blake3.blake3(_compact(router)).digest()
    identity = card.opaque.get("indexer_identity")
    if identity is not None and bytes(identity) != b"null":
        spec = msgspec.json.decode(identity)
        if isinstance(spec, dict):
            b += _INDEXER_IDENTITY_TAG
            b += _identity_dimension(spec.get("semantics"))
            b += _identity_dimension(spec.get("routing_scope"))
    if card.aliases:
        b += _u32(len(card.aliases))
        for alias in card.aliases:
            encoded = alias.encode()
            b += _u32(len(encoded)) + encoded
    return blake3.blake3(bytes(b)).hexdigest()


_WS = re.compile(rb"\s+")


def _compact(raw: msgspec.Raw) -> bytes:
    data = bytes(raw)
    if _WS.search(data) is None:
        return data
    # Re-encode pretty-printed input compactly, keeping key order.
    return msgspec.json.encode(msgspec.json.decode(data))


def is_new_format(card: ModelDeploymentCard) -> bool:
    """True when every populated file carries ``size``. A mix is legacy and logged."""
    sizes = [f.size is not None for _, f in card.files()]
    if all(sizes):
        return bool(sizes)
    if any(sizes):
        log.warning(
            "card %r has size on some metadata files but not others; treating it as legacy "
            "(likely a worker bug)",
            card.display_name,
        )
    return False
