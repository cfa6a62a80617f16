"""Which fields of two cards differ, among those that make their mdcsums differ.

When a replica is rejected for an mdcsum mismatch, two 64-hex sums tell an operator nothing
they can act on; :func:`card_diff` names the slot whose file differs (both checksums and
sizes), the context length, the KV block size, the worker type, and so on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from discovery_mdc.card._model import CheckedFile, ModelDeploymentCard

__all__ = ["CardFieldDiff", "card_diff", "explain_card_diff"]


@dataclass(frozen=True, slots=True)
class CardFieldDiff:
    """One differing field: its name, its value in the first card and in the second."""

    field: str
    first: str
    second: str

    def __str__(self) -> str:
        return f"{self.field} {self.first} vs {self.second}"


def _file(f: CheckedFile | None) -> str:
    if f is None:
        return "absent"
    size = f" ({f.size} bytes)" if f.size is not None else ""
    return f"{f.checksum}{size}"


def _raw(card: ModelDeploymentCard, name: str) -> str:
    raw = card.opaque.get(name)
    return "absent" if raw is None or bytes(raw) == b"null" else bytes(raw).decode(errors="replace")


# (field, how to show it) for the scalar fields that feed the mdcsum, in its order.
_SCALARS: tuple[tuple[str, Callable[[ModelDeploymentCard], Any]], ...] = (
    ("display_name", lambda c: repr(c.display_name)),
    ("source_path", lambda c: repr(c.source_path)),
    ("prompt_context", lambda c: list(c.prompt_context) if c.prompt_context else None),
    ("context_length", lambda c: c.effective_context_length()),
    ("kv_cache_block_size", lambda c: c.kv_cache_block_size),
    ("worker_type", lambda c: c.worker_type.value if c.worker_type else None),
    ("needs", lambda c: [[w.value for w in alt] for alt in c.needs]),
    ("router_config", lambda c: _raw(c, "router_config")),
    ("indexer_identity", lambda c: _raw(c, "indexer_identity")),
    ("aliases", lambda c: list(c.aliases)),
)


def _diffs(a: ModelDeploymentCard, b: ModelDeploymentCard) -> Iterator[CardFieldDiff]:
    for name, show in _SCALARS[:2]:
        if show(a) != show(b):
            yield CardFieldDiff(name, str(show(a)), str(show(b)))
    slots_a = {name: slot.file for name, slot in a.slots()}
    slots_b = {name: slot.file for name, slot in b.slots()}
    for name in [*slots_a, *(n for n in slots_b if n not in slots_a)]:
        fa, fb = slots_a.get(name), slots_b.get(name)
        if fa is None or fb is None or fa.checksum != fb.checksum or fa.size != fb.size:
            yield CardFieldDiff(name, _file(fa), _file(fb))
    extras_a = {f.basename: f for f in a.extra_files}
    extras_b = {f.basename: f for f in b.extra_files}
    for name in sorted(extras_a.keys() | extras_b.keys()):
        fa, fb = extras_a.get(name), extras_b.get(name)
        if fa is None or fb is None or fa.checksum != fb.checksum:
            yield CardFieldDiff(f"extra file {name}", _file(fa), _file(fb))
    for name, show in _SCALARS[2:]:
        if show(a) != show(b):
            yield CardFieldDiff(name, str(show(a)), str(show(b)))


def card_diff(first: ModelDeploymentCard, second: ModelDeploymentCard) -> tuple[CardFieldDiff, ...]:
    """The fields that make ``first`` and ``second`` have different mdcsums: display name,
    source path, each metadata slot (checksum and size), each extra file, prompt context,
    effective context length, KV block size, worker type, needs, router config, indexer
    identity and aliases. Paths and URLs are not compared (replicas differ there by design).
    """
    return tuple(_diffs(first, second))


def explain_card_diff(diffs: tuple[CardFieldDiff, ...]) -> str:
    """One line: ``tokenizer blake3:... (9 bytes) vs blake3:... (11 bytes); context_length
    4096 vs 8192``."""
    if not diffs:
        return "no field the mdcsum covers differs"
    return "; ".join(str(d) for d in diffs)
