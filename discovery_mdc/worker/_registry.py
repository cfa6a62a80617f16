"""The metadata registry: the only files the status server will ever serve.

A key is a URL path below ``/v1/metadata/``, in one of the two route forms::

    <slug>/<filename>
    <namespace>/<component>/<endpoint>/<slug>/<suffix>/<filename>

Every segment but the file name must be a plain, URL-safe name (RFC 3986 unreserved
characters, not ``.`` or ``..``, not starting with ``.``). The file name is the real name
percent-encoded by :func:`url_segment`, as the reference (NVIDIA Dynamo) encodes it in its
self-hosted URLs: ``my template.jinja`` is served as ``my%20template.jinja``. The server
compares the *raw* request path with these keys byte for byte, so nothing that was encoded
differently, normalised or traversed can ever match.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote, unquote

from discovery_mdc.card import Checksum
from discovery_mdc.errors import RegistryError

__all__ = [
    "BASE_SUFFIX",
    "MAX_NAME_LENGTH",
    "MetadataRegistry",
    "ModelRef",
    "RegisteredFile",
    "Registration",
    "is_safe_name",
    "url_segment",
]

BASE_SUFFIX: Final = "_base"
MAX_NAME_LENGTH: Final = 255
_SAFE_NAME: Final = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*")
_KEY_SEGMENTS: Final = (2, 6)
# Kept as they are in a file name's URL segment besides the unreserved characters: RFC 3986
# sub-delims, ':' and '@', which a WHATWG URL parser (the reference's) also leaves alone.
_URL_KEEP: Final = "!$&'()*+,;=:@"


def is_safe_name(name: str) -> bool:
    """True for a name the registry accepts as one path segment.

    RFC 3986 unreserved characters only, no leading ``.`` (so never ``.``, ``..`` or a
    dotfile), at most :data:`MAX_NAME_LENGTH` characters.
    """
    return len(name) <= MAX_NAME_LENGTH and _SAFE_NAME.fullmatch(name) is not None


def url_segment(name: str) -> str | None:
    """The percent-encoded URL path segment for a real file name, or ``None`` when the name
    cannot be served: empty, ``.``/``..`` or another leading ``.``, ``/``, ``\\`` or a control
    character, not valid UTF-8, or longer than :data:`MAX_NAME_LENGTH` bytes."""
    if (
        not name
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
    ):
        return None
    try:
        raw = name.encode("utf-8")  # a non-UTF-8 name (surrogate escapes) has no URL form
    except UnicodeEncodeError:
        return None
    if len(raw) > MAX_NAME_LENGTH:
        return None
    return quote(raw, safe=_URL_KEEP)


def _is_file_segment(segment: str) -> bool:
    try:
        name = unquote(segment, errors="strict")
    except UnicodeDecodeError:
        return False
    return url_segment(name) == segment


def _check_key(key: str) -> None:
    segments = key.split("/")
    if len(segments) not in _KEY_SEGMENTS:
        raise RegistryError(
            f"invalid metadata key {key!r}: expected <slug>/<filename> or "
            "<namespace>/<component>/<endpoint>/<slug>/<suffix>/<filename>"
        )
    bad = [s for s in segments[:-1] if not is_safe_name(s)]
    if bad:
        raise RegistryError(
            f"invalid metadata key {key!r}: segment(s) {bad} are not plain URL-safe names "
            "([A-Za-z0-9._~-], no leading '.', at most 255 characters)"
        )
    if not _is_file_segment(segments[-1]):
        raise RegistryError(
            f"invalid metadata key {key!r}: the file name {segments[-1]!r} is not a "
            "percent-encoded plain file name (see url_segment)"
        )


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Which published model a registration belongs to (used to unregister it as a whole)."""

    namespace: str
    component: str
    endpoint: str
    slug: str
    suffix: str = BASE_SUFFIX

    @property
    def prefix(self) -> str:
        """``<namespace>/<component>/<endpoint>/<slug>/<suffix>``: the long-route prefix."""
        return f"{self.namespace}/{self.component}/{self.endpoint}/{self.slug}/{self.suffix}"


@dataclass(frozen=True, slots=True)
class RegisteredFile:
    """A servable file: its canonical on-disk path, checksum and expected size."""

    path: Path
    checksum: Checksum
    size: int

    @property
    def etag(self) -> str:
        """The blake3 hex (unquoted; the HTTP layer quotes it)."""
        return self.checksum.hex


@dataclass(frozen=True, slots=True)
class Registration:
    """One pending ``key -> file`` entry for :meth:`MetadataRegistry.register_many`."""

    key: str
    path: str | os.PathLike[str]
    checksum: Checksum | str
    size: int | None = None


class MetadataRegistry:
    """Exact ``key -> RegisteredFile`` map; thread-safe.

    Registering a key again for the same file (same canonical path and checksum) is a no-op;
    for a different file it raises :class:`RegistryError`. A key may be held by several
    models (the same file published on two endpoints); it disappears when the last one is
    unregistered.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, RegisteredFile] = {}
        self._owners: dict[str, set[ModelRef | None]] = {}

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def file_count(self) -> int:
        """How many distinct files are registered (each file has a key per route)."""
        with self._lock:
            return len({(f.path, f.checksum) for f in self._files.values()})

    def keys(self) -> list[str]:
        """Every registered key, sorted."""
        with self._lock:
            return sorted(self._files)

    def lookup(self, key: str) -> RegisteredFile | None:
        """The file registered under exactly ``key``, or ``None``."""
        return self._files.get(key)

    def register(
        self,
        key: str,
        path: str | os.PathLike[str],
        checksum: Checksum | str,
        size: int | None = None,
        *,
        owner: ModelRef | None = None,
    ) -> RegisteredFile:
        """Register one file; see :meth:`register_many`."""
        (registered,) = self.register_many([Registration(key, path, checksum, size)], owner=owner)
        return registered

    def register_many(
        self, entries: Iterable[Registration], *, owner: ModelRef | None = None
    ) -> list[RegisteredFile]:
        """Register every entry, or none of them.

        Paths are canonicalised (symlinks resolved) now, so an HF-cache snapshot link is
        stored as its ``blobs/<sha>`` target. ``size`` defaults to the file's current size.
        Raises :class:`RegistryError` for an invalid key, a missing file, or a key already
        registered for a different file (including within ``entries``).
        """
        prepared: list[tuple[str, RegisteredFile]] = []
        for entry in entries:
            _check_key(entry.key)
            checksum = (
                entry.checksum
                if isinstance(entry.checksum, Checksum)
                else Checksum.parse(entry.checksum)
            )
            try:
                resolved = Path(entry.path).resolve(strict=True)
                size = entry.size if entry.size is not None else resolved.stat().st_size
            except OSError as exc:
                raise RegistryError(
                    f"cannot register {entry.key!r}: {os.fspath(entry.path)!r} is not "
                    f"readable: {exc}"
                ) from exc
            if not resolved.is_file():
                raise RegistryError(
                    f"cannot register {entry.key!r}: {os.fspath(entry.path)!r} is not a "
                    "regular file"
                )
            prepared.append((entry.key, RegisteredFile(resolved, checksum, size)))

        with self._lock:
            pending: dict[str, RegisteredFile] = {}
            for key, new in prepared:
                old = pending.get(key) or self._files.get(key)
                if old is not None and (old.path, old.checksum) != (new.path, new.checksum):
                    raise RegistryError(
                        f"metadata key {key!r} is already registered for {old.path} "
                        f"({old.checksum}); refusing to register {new.path} ({new.checksum})"
                    )
                pending[key] = old or new
            for key, registered in pending.items():
                self._files[key] = registered
                self._owners.setdefault(key, set()).add(owner)
            return [pending[key] for key, _ in prepared]

    def unregister(self, key: str) -> bool:
        """Drop ``key`` whoever holds it; True if it was registered."""
        with self._lock:
            self._owners.pop(key, None)
            return self._files.pop(key, None) is not None

    def unregister_model(self, model: ModelRef) -> int:
        """Release every key ``model`` registered; returns how many keys were dropped."""
        dropped = 0
        with self._lock:
            for key in [k for k, owners in self._owners.items() if model in owners]:
                owners = self._owners[key]
                owners.discard(model)
                if not owners:
                    del self._owners[key]
                    del self._files[key]
                    dropped += 1
        return dropped
