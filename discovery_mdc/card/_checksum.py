"""Checksums (``blake3:<64 lowercase hex>``) and file hashing."""

from __future__ import annotations

import mmap
import os
import re
import threading
from typing import Final

import blake3
import msgspec

from discovery_mdc.errors import CardError

__all__ = ["Checksum", "HashCancelled", "hash_bytes", "hash_file"]

ALGORITHM: Final = "blake3"
_HEX_RE: Final = re.compile(r"[0-9a-f]{64}")
# Below this, one read() is cheaper than setting up a mapping; above it, mmap lets
# blake3 hash with several threads and without the GIL.
MMAP_THRESHOLD: Final = 1 << 20
READ_CHUNK: Final = 16 << 20
# Large enough that blake3 still spreads each chunk over every core, small enough that a
# cancelled hash stops within a few milliseconds. A power of two keeps blake3's tree intact.
HASH_CHUNK: Final = 32 << 20


class HashCancelled(Exception):
    """Hashing stopped because its ``cancel`` event was set (the caller is shutting down)."""


class Checksum(msgspec.Struct, frozen=True):
    """A content hash. Only blake3 over the whole file exists; the hex is validated
    because it becomes a file name in the cache."""

    hex: str
    algorithm: str = ALGORITHM

    @classmethod
    def parse(cls, text: str) -> Checksum:
        """Parse ``blake3:<hex>``, rejecting anything that is not exactly that."""
        if not isinstance(text, str):
            raise CardError(f"checksum must be a string, got {text!r}")
        algorithm, sep, hexdigest = text.partition(":")
        if not sep:
            raise CardError(f"checksum {text!r} has no '<algorithm>:' prefix")
        if algorithm != ALGORITHM:
            raise CardError(f"checksum {text!r}: unknown algorithm {algorithm!r} (only blake3)")
        if not _HEX_RE.fullmatch(hexdigest):
            raise CardError(f"checksum {text!r}: hash must be exactly 64 lowercase hex characters")
        return cls(hexdigest)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def hash_bytes(data: bytes | memoryview) -> Checksum:
    """blake3 of an in-memory buffer."""
    return Checksum(blake3.blake3(data).hexdigest())


def _check_cancel(cancel: threading.Event | None, path: str | os.PathLike[str]) -> None:
    if cancel is not None and cancel.is_set():
        raise HashCancelled(f"hashing {os.fspath(path)} was cancelled")


def hash_file(
    path: str | os.PathLike[str],
    *,
    use_mmap: bool = True,
    cancel: threading.Event | None = None,
) -> tuple[Checksum, int, bytes | None]:
    """Hash a file in one pass: returns ``(checksum, size, data)``.

    ``data`` is the content for files under the mmap threshold (so callers that also parse
    the file need no second read) and ``None`` for large files, which are memory-mapped and
    hashed by several threads with the GIL released. ``use_mmap=False`` reads large files in
    chunks instead: for files someone else may truncate meanwhile (a shared mount), where a
    mapping would end the process with SIGBUS. Large files are hashed in chunks of
    :data:`HASH_CHUNK`; once ``cancel`` is set, the next chunk raises :class:`HashCancelled`.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        if size < MMAP_THRESHOLD:
            chunks = []
            while chunk := os.read(fd, max(size, 1 << 16) + 1):
                chunks.append(chunk)
            data = b"".join(chunks)
            return hash_bytes(data), len(data), data
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        if use_mmap:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
                for start in range(0, len(view), HASH_CHUNK):
                    _check_cancel(cancel, path)
                    hasher.update(view[start : start + HASH_CHUNK])
                return Checksum(hasher.hexdigest()), len(view), None
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        total = 0
        while n := os.readv(fd, [buf]):
            _check_cancel(cancel, path)
            hasher.update(view[:n])
            total += n
        return Checksum(hasher.hexdigest()), total, None
    finally:
        os.close(fd)
