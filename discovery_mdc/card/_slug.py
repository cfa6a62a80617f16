"""Slugs: the filesystem- and URL-safe form of a model name."""

from __future__ import annotations

import re
from typing import Final

from discovery_mdc.errors import CardError

__all__ = ["slugify", "validate_slug"]

_NOT_SLUG: Final = re.compile(r"[^a-z0-9_-]")
_SLUG: Final = re.compile(r"[a-z0-9_-]*")


def slugify(name: str) -> str:
    """Lowercase, replace every character outside ``[a-z0-9_-]`` with ``_``, strip leading ``_``.

    >>> slugify("Qwen/Qwen3-0.6B")
    'qwen_qwen3-0_6b'
    """
    return _NOT_SLUG.sub("_", name.lower()).lstrip("_")


def validate_slug(value: str, field: str = "slug") -> str:
    """Return ``value`` if it only holds ``[a-z0-9_-]``, else raise :class:`CardError`."""
    if not isinstance(value, str) or not _SLUG.fullmatch(value):
        raise CardError(f"invalid {field} {value!r}: only [a-z0-9_-] is allowed")
    return value
