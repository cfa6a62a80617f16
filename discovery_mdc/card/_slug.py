"""Model names: slugs (their filesystem- and URL-safe form), and which names a frontend can
serve as a model id (the one rule the frontend admits by and the worker CLI checks)."""

from __future__ import annotations

import re
import unicodedata
from typing import Final

from discovery_mdc.errors import CardError

__all__ = ["MAX_MODEL_ID", "slugify", "unservable_model_id", "validate_slug"]

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


#: The longest model id served. Percent-encoded (up to 12 characters for one), its
#: ``GET /v1/models/{id}`` request line stays under aiohttp's 8 KiB limit.
MAX_MODEL_ID: Final = 512
_UNSERVABLE_CATEGORIES: Final = {
    "Cc": "a control character",
    "Cs": "a lone surrogate",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}


def unservable_model_id(name: str) -> str | None:
    """Why ``GET /v1/models/{id}`` could not answer for the model id ``name``, or None.

    A listed id must come back from its own URL, percent-encoded or with ``/`` left as is
    (the OpenAI clients' way): so it is not empty, holds no control character (a newline
    cannot be matched in a path), line or paragraph separator or lone surrogate, has no
    ``.`` or ``..`` path segment (clients and servers resolve those away), does not end in
    ``/ready`` (``/v1/models/{id}/ready`` is a model's readiness) and is at most
    :data:`MAX_MODEL_ID` characters long.
    """
    if not name:
        return "the model id is empty"
    if len(name) > MAX_MODEL_ID:
        return f"the model id is {len(name)} characters long, above {MAX_MODEL_ID}"
    for ch in name:
        what = _UNSERVABLE_CATEGORIES.get(unicodedata.category(ch))
        if what is not None:
            return f"the model id contains U+{ord(ch):04X}, {what}"
    segments = name.split("/")
    if any(segment in (".", "..") for segment in segments):
        return "the model id has a '.' or '..' path segment"
    if len(segments) > 1 and segments[-1] == "ready":
        return "the model id ends in '/ready', the path of the readiness of another model id"
    return None
