"""The blob store: staging files, publishing, verification, per-blob locks and links.

Correctness never depends on the lock: a blob only ever appears by an atomic rename of a
fully written, verified, fsynced temp file with a name unique to this process and call. The
lock (``flock``, released by the kernel when its holder dies) only avoids duplicate fetches.

A card's ``by-slug/<slug>/<mdcsum>/`` directory appears the same way: its links are made in a
staging directory next to it (``.tmp-card.<mdcsum>.<pid>.<uuid>``) and the directory is renamed
into place once every file verified, so a card directory is never seen half made. The last use
of a card is the newest modification time of its links (``lutimes``), which only resolving or
serving the card moves; removing a link elsewhere in the directory does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import blake3
import filelock

from discovery_mdc._clock import Clock, Sleep
from discovery_mdc.cache._plan import TEMP_PREFIX, CacheLayout
from discovery_mdc.card import hash_file
from discovery_mdc.errors import CacheError, LockTimeoutError

__all__ = [
    "CARD_STAGING_PREFIX",
    "LAST_USE_RESOLUTION",
    "REMOVAL_PREFIX",
    "BlobState",
    "BlobStore",
    "CardDir",
    "CardDirEntry",
    "Staging",
    "VerifyMemo",
    "blob_lock",
    "read_card_dir",
    "refresh_last_used",
    "remove_link_dir",
    "unique_name",
    "verify_file",
]

log = logging.getLogger("discovery_mdc.cache")

#: Suffix of staging files in ``tmp/``: ``<hex>.<pid>.<uuid>.part``.
PART_SUFFIX: Final = ".part"
#: Prefix of temporary symlinks next to their final name.
LINK_TEMP_PREFIX: Final = TEMP_PREFIX + "link."
#: Prefix of a card directory being staged: ``.tmp-card.<mdcsum>.<pid>.<uuid>``.
CARD_STAGING_PREFIX: Final = TEMP_PREFIX + "card."
#: Prefix of a card directory taken out of service to be deleted: ``.tmp-rm.<pid>.<uuid>``.
REMOVAL_PREFIX: Final = TEMP_PREFIX + "rm."
#: A card's last use is recorded at most this often (seconds): a minute's precision is
#: plenty, and skipping the metadata writes keeps a busy disk's journal off the event loop.
LAST_USE_RESOLUTION: Final = 60.0
_DISK_FULL: Final = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
# Hash small blobs on the event loop; hand bigger ones to a thread.
_INLINE_HASH_MAX: Final = 1 << 20
# A file whose mtime/ctime is this recent is never memoized (see VerifyMemo).
_RACY_NS: Final = 2_000_000_000
_MEMO_MAX: Final = 1 << 16
# A staging directory is retried this often when a prune removes its (empty) model directory
# between creating that and creating the staging directory inside it.
_MKDIR_ATTEMPTS: Final = 5

_MemoKey = tuple[int, int, int, int, int]


class VerifyMemo:
    """Which files were seen to hash to which blake3, per (dev, inode, size, mtime, ctime).

    A file whose timestamps are within the last few seconds is never remembered ("racily
    clean", as git calls it): file timestamps come from a coarse clock, so a rewrite within the
    same tick could keep the same key and the memo would hide it.
    """

    def __init__(self, max_entries: int = _MEMO_MAX) -> None:
        self._max = max_entries
        self._seen: dict[_MemoKey, str] = {}

    @staticmethod
    def _key(st: os.stat_result) -> _MemoKey:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def verified(self, st: os.stat_result, hexdigest: str) -> bool:
        """True if the file ``st`` describes was seen to hash to ``hexdigest``."""
        return self._seen.get(self._key(st)) == hexdigest

    def add(self, st: os.stat_result, hexdigest: str) -> None:
        """Remember that the file ``st`` describes hashes to ``hexdigest``."""
        if max(st.st_mtime_ns, st.st_ctime_ns) >= time.time_ns() - _RACY_NS:
            return
        if len(self._seen) >= self._max:
            self._seen.clear()
        self._seen[self._key(st)] = hexdigest

    def __contains__(self, hexdigest: object) -> bool:
        """``hex in memo``: some file was remembered with this blake3."""
        return hexdigest in self._seen.values()

    def clear(self) -> None:
        """Forget everything (after editing the cache out of band)."""
        self._seen.clear()


def unique_name(prefix: str) -> str:
    """``<prefix>.<pid>.<uuid>``: a temporary name no other process or call can pick."""
    return f"{prefix}.{os.getpid()}.{uuid.uuid4().hex}"


def _cache_error(action: str, path: Path, exc: OSError) -> CacheError:
    if exc.errno in _DISK_FULL:
        return CacheError(
            f"cannot {action} {path}: disk full or file size limit reached "
            f"({errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror})"
        )
    return CacheError(f"cannot {action} {path}: {exc.strerror or exc}")


class Staging:
    """A unique temp file that hashes and counts every byte written to it."""

    def __init__(
        self, path: Path, hexdigest: str, on_progress: Callable[[int], None] | None = None
    ) -> None:
        self.path = path
        self.hex = hexdigest
        self.received = 0
        self._hasher = blake3.blake3()
        self._on_progress = on_progress
        try:
            self._fd: int | None = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            raise _cache_error("create staging file", path, exc) from None

    def write(self, data: bytes) -> None:
        if self._fd is None:
            raise CacheError(f"staging file {self.path} is closed")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            raise _cache_error(f"write blob {self.hex} to", self.path, exc) from None
        self._hasher.update(data)
        self.received += len(data)
        if self._on_progress is not None:
            self._on_progress(self.received)

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    def finish(self) -> None:
        """Flush to disk and close."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        except OSError as exc:
            raise _cache_error(f"flush blob {self.hex} to", self.path, exc) from None
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Close and delete the temp file (a no-op once published)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass(frozen=True, slots=True)
class BlobState:
    """What :meth:`BlobStore.check` found: the verified size, or why there is none."""

    size: int | None
    corrupt: bool = False
    actual: str | None = None


async def verify_file(
    path: Path, hexdigest: str, *, memo: VerifyMemo | None = None, foreign: bool = False
) -> BlobState:
    """Hash ``path`` and compare it with ``hexdigest``; ``BlobState(None)`` if it is missing.

    With a ``memo``, a match is remembered per (dev, inode, size, mtime, ctime), so warm
    checks cost one ``stat``. ``foreign`` files (not cache blobs, which only ever change by
    rename) are read rather than memory-mapped.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return BlobState(None)
    except OSError as exc:
        raise _cache_error("stat", path, exc) from None
    if memo is not None and memo.verified(st, hexdigest):
        return BlobState(st.st_size)
    if not stat.S_ISREG(st.st_mode):
        return BlobState(None, corrupt=True)
    try:
        if st.st_size <= _INLINE_HASH_MAX:
            checksum, size, _ = hash_file(path)
        else:
            checksum, size, _ = await asyncio.to_thread(hash_file, path, use_mmap=not foreign)
    except FileNotFoundError:
        return BlobState(None)
    except OSError as exc:
        raise _cache_error("read", path, exc) from None
    if checksum.hex != hexdigest:
        log.warning("%s is corrupt: expected blake3 %s, content hashes to %s", path, hexdigest,
                    checksum.hex)  # fmt: skip
        return BlobState(None, corrupt=True, actual=checksum.hex)
    if memo is not None:
        memo.add(st, hexdigest)
    return BlobState(size)


class BlobStore:
    """The blobs, staging area, locks and links under one cache root, and the memo of the
    blobs verified so far."""

    def __init__(self, layout: CacheLayout) -> None:
        self.layout = layout
        self.memo = VerifyMemo()
        self._warned_no_flock = False

    def ensure_dirs(self) -> None:
        for d in (self.layout.blobs, self.layout.by_slug, self.layout.locks, self.layout.tmp):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _cache_error("create cache directory", d, exc) from None

    def stage(self, hexdigest: str, on_progress: Callable[[int], None] | None = None) -> Staging:
        path = self.layout.tmp / (unique_name(hexdigest) + PART_SUFFIX)
        return Staging(path, hexdigest, on_progress)

    def publish(self, staging: Staging) -> Path:
        """fsync the staging file and atomically rename it onto ``blobs/<hex>``."""
        staging.finish()
        blob = self.layout.blob(staging.hex)
        try:
            os.replace(staging.path, blob)
        except OSError as exc:
            raise _cache_error("publish blob", blob, exc) from None
        _fsync_dir(self.layout.blobs)
        return blob

    async def check(self, hexdigest: str) -> BlobState:
        """Verify ``blobs/<hex>`` by hashing it (memoized per inode, size and timestamps)."""
        return await verify_file(self.layout.blob(hexdigest), hexdigest, memo=self.memo)

    def lock(self, hexdigest: str, max_wait: float) -> contextlib.AbstractAsyncContextManager[None]:
        """The blob's cross-process lock (:func:`blob_lock`)."""
        return blob_lock(self.layout.lock(hexdigest), max_wait, no_flock=self._no_flock)

    def _no_flock(self, path: Path) -> None:
        if not self._warned_no_flock:
            self._warned_no_flock = True
            log.warning("no flock on %s; fetching without a cross-process lock", path)

    def remove(self, hexdigest: str) -> None:
        path = self.layout.blob(hexdigest)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise _cache_error("remove corrupt blob", path, exc) from None

    def link_target(self, hexdigest: str, link_path: Path) -> str:
        """The relative symlink target from ``link_path`` to the blob."""
        return os.path.relpath(self.layout.blob(hexdigest), link_path.parent)

    def links_to(self, hexdigest: str, link_path: Path) -> bool:
        try:
            return os.readlink(link_path) == self.link_target(hexdigest, link_path)
        except OSError:
            return False

    def link(self, hexdigest: str, link_path: Path, *, create_dir: bool = True) -> bool:
        """Point ``link_path`` at the blob with a relative symlink, atomically.

        With ``create_dir=False`` (repairing a published card directory in place) a missing
        directory is not re-created, so a card directory removed meanwhile never comes back
        half made: returns False instead.
        """
        if self.links_to(hexdigest, link_path):
            return True
        target = self.link_target(hexdigest, link_path)
        tmp = link_path.parent / unique_name(LINK_TEMP_PREFIX.rstrip("."))
        try:
            if create_dir:
                link_path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, tmp)
            os.replace(tmp, link_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not create_dir and not link_path.parent.is_dir():
                return False
            raise _cache_error("create link", link_path, exc) from None
        return True

    def stage_dir(self, link_dir: Path) -> Path:
        """A new, empty staging directory next to the card directory ``link_dir``."""
        path = link_dir.parent / unique_name(CARD_STAGING_PREFIX + link_dir.name)
        tries = 0
        while True:
            try:
                # FileExistsError: it was there, and a prune removed it (empty) just now.
                with contextlib.suppress(FileExistsError):
                    link_dir.parent.mkdir(parents=True, exist_ok=True)
                path.mkdir()
                return path
            except OSError as exc:
                tries += 1
                # FileNotFoundError: a prune removed the (empty) model directory in between.
                if not isinstance(exc, FileNotFoundError) or tries == _MKDIR_ATTEMPTS:
                    raise _cache_error("create card directory", path, exc) from None

    def publish_dir(self, staging: Path, link_dir: Path) -> bool:
        """Rename a complete staging directory onto ``link_dir``; False when another process
        published that card first (its directory is complete too)."""
        try:
            os.rename(staging, link_dir)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise _cache_error("publish card directory", link_dir, exc) from None
        _fsync_dir(link_dir.parent)
        return True


def remove_link_dir(path: Path) -> None:
    """Delete a card directory: its links (never what they point at), then the directory."""
    try:
        with os.scandir(path) as it:
            names = [e.name for e in it]
    except FileNotFoundError:
        return
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / name)
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()


@dataclass(frozen=True, slots=True)
class CardDirEntry:
    """One entry of a card directory. ``target`` is its symlink target (None: not a symlink);
    read with stats, ``lstat`` is its own and ``size`` that of what it reaches (None: broken)."""

    name: str
    target: str | None
    lstat: os.stat_result | None = None
    size: int | None = None


@dataclass(frozen=True, slots=True)
class CardDir:
    """What :func:`read_card_dir` found in a card directory (published, staging or being
    removed)."""

    inode: int
    mtime: float
    entries: tuple[CardDirEntry, ...]

    @property
    def last_used(self) -> float:
        """The card's last use: its newest link's own mtime (temp links aside), the
        directory's mtime when it has no links (needs the stats)."""
        return max(
            (
                e.lstat.st_mtime
                for e in self.entries
                if e.target is not None and e.lstat and not e.name.startswith(TEMP_PREFIX)
            ),
            default=self.mtime,
        )


def read_card_dir(path: Path, *, stats: bool = False) -> CardDir | None:
    """The entries of a card directory and their link targets, read through one open
    descriptor: renaming the directory meanwhile (staging to published, or out of the way to
    be deleted) hides none of them. None when no directory is at ``path`` (any more)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    try:
        st = os.fstat(fd)
        with os.scandir(fd) as it:
            listed = sorted((e.name, e.is_symlink()) for e in it)
        entries = tuple(
            entry for name, link in listed if (entry := _read_entry(fd, name, link, stats))
        )
        return CardDir(st.st_ino, st.st_mtime, entries)
    finally:
        os.close(fd)


def _read_entry(fd: int, name: str, link: bool, stats: bool) -> CardDirEntry | None:
    """One entry of the directory open at ``fd``; None when it is gone already."""
    try:
        target = os.readlink(name, dir_fd=fd) if link else None
        lstat = os.stat(name, dir_fd=fd, follow_symlinks=False) if stats else None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINVAL):  # gone, or no longer a link
            return None
        raise
    size = None
    if stats:
        with contextlib.suppress(OSError):
            size = os.stat(name, dir_fd=fd).st_size
    return CardDirEntry(name, target, lstat, size)


def refresh_last_used(
    links: Iterable[Path], *, now: float | None = None, resolution: float = LAST_USE_RESOLUTION
) -> bool:
    """Record a use of the card whose links are ``links``: each link's own mtime moves to now
    unless it moved within ``resolution`` seconds. False (nothing touched after the first
    problem) when a link is missing or no longer reaches its blob."""
    now = time.time() if now is None else now
    for link in links:
        try:
            if not stat.S_ISLNK(os.lstat(link).st_mode) or not os.path.exists(link):
                return False
            if now - os.lstat(link).st_mtime > resolution:
                os.utime(link, (now, now), follow_symlinks=False)
        except FileNotFoundError:
            return False
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _warn_no_flock(path: Path) -> None:
    log.warning("no flock on %s; fetching without a cross-process lock", path)


@contextlib.asynccontextmanager
async def blob_lock(
    path: Path,
    max_wait: float,
    *,
    log_every: float = 10.0,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    no_flock: Callable[[Path], None] = _warn_no_flock,
) -> AsyncIterator[None]:
    """Hold the ``flock`` at ``path``; poll without blocking the event loop.

    Logs every ``log_every`` seconds while waiting and raises :class:`LockTimeoutError`
    naming the lock after ``max_wait`` seconds. Where the file system has no ``flock``, the
    lock is skipped (``no_flock(path)`` says so): the atomic rename keeps the cache correct
    anyway.
    """
    lock = filelock.FileLock(path, fallback_to_soft=False)
    start = clock()
    next_log = start + log_every
    delay = 0.005
    first = True
    while True:
        try:
            lock.acquire(blocking=False)
            break
        except filelock.Timeout:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise _cache_error("take lock", path, exc) from None
            no_flock(path)
            yield
            return
        now = clock()
        if first:
            first = False
            log.debug("lock %s is held by another process; waiting", path)
        if now - start >= max_wait:
            raise LockTimeoutError(f"timed out after {max_wait:g}s waiting for lock {path}")
        if now >= next_log:
            next_log = now + log_every
            log.info("still waiting for lock %s after %.0fs", path, now - start)
        await sleep(min(delay, max(start + max_wait - now, 0.0)))
        delay = min(delay * 2, 0.1)
    try:
        yield
    finally:
        lock.release()
