"""Cache management: scan (ls), verify and prune.

A scan describes the cache as frozen dataclasses and collects oddities as warnings instead of
failing. Prune is planned from a scan by a pure function; the plan can be printed, then
executed. Execution removes links first, then temp files, then blobs, then empty directories,
so an interrupted prune never leaves a link without its blob. A blob is removed only while its
lock is held and after re-checking, under that lock, that no link refers to it (resolves create
links under the same lock).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import filelock

from discovery_mdc.cache._plan import TEMP_PREFIX, CacheLayout
from discovery_mdc.cache._store import PART_SUFFIX
from discovery_mdc.card import hash_file

__all__ = [
    "CacheScan",
    "CachedBlob",
    "CachedCard",
    "CachedFile",
    "CorruptBlob",
    "PruneItem",
    "PrunePlan",
    "PruneResult",
    "TempFile",
    "VerifyReport",
    "execute_prune",
    "plan_prune",
    "scan_cache",
    "verify_cache",
]

_HEX: Final = re.compile(r"[0-9a-f]{64}")
#: A temp file whose owner looks alive is still removed once it is this old (seconds).
STALE_TEMP_AGE: Final = 24 * 3600.0
_PART: Final = re.compile(
    r"(?P<hex>[0-9a-f]{64})\.(?P<pid>\d+)\.[0-9a-f]+" + re.escape(PART_SUFFIX)
)
_TEMP_LINK: Final = re.compile(re.escape(TEMP_PREFIX) + r"link\.(?P<pid>\d+)\.[0-9a-f]+")
_LOCK_BATCH: Final = 256


@dataclass(frozen=True, slots=True)
class CachedFile:
    """One link in ``by-slug/<slug>/<mdcsum>/``; ``size`` is ``None`` when it is broken."""

    filename: str
    path: Path
    hex: str | None
    size: int | None

    @property
    def broken(self) -> bool:
        return self.size is None


@dataclass(frozen=True, slots=True)
class CachedCard:
    """One ``by-slug/<slug>/<mdcsum>`` directory. ``last_used`` is its mtime, which every
    resolve of the card touches."""

    slug: str
    mdcsum: str
    path: Path
    files: tuple[CachedFile, ...]
    last_used: float

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)


@dataclass(frozen=True, slots=True)
class CachedBlob:
    hex: str
    path: Path
    size: int
    last_access: float
    referenced: bool


@dataclass(frozen=True, slots=True)
class TempFile:
    """A staging file or temp link; ``owner_alive`` is whether its writer's pid still runs."""

    path: Path
    size: int
    mtime: float
    owner_pid: int | None
    owner_alive: bool
    lock_hex: str | None = None


@dataclass(frozen=True, slots=True)
class CacheScan:
    """What is on disk under one cache root."""

    layout: CacheLayout
    cards: tuple[CachedCard, ...]
    blobs: tuple[CachedBlob, ...]
    temp_files: tuple[TempFile, ...]
    empty_dirs: tuple[Path, ...]
    warnings: tuple[str, ...]

    @property
    def size_on_disk(self) -> int:
        return sum(b.size for b in self.blobs) + sum(t.size for t in self.temp_files)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        return []


def _link_hex(layout: CacheLayout, link: Path) -> str | None:
    """The blob hex a link points at, or ``None`` if it points anywhere else."""
    try:
        target = os.readlink(link)
    except OSError:
        return None
    resolved = Path(os.path.normpath(link.parent / target))
    if resolved.parent != layout.blobs or not _HEX.fullmatch(resolved.name):
        return None
    return resolved.name


def _iter_link_dirs(layout: CacheLayout) -> Iterator[tuple[str, os.DirEntry[str]]]:
    for slug in _scandir(layout.by_slug):
        if slug.is_dir(follow_symlinks=False):
            for sums in _scandir(Path(slug.path)):
                yield slug.name, sums


def referenced_hexes(layout: CacheLayout) -> set[str]:
    """Every blob hex some link in ``by-slug/`` points at."""
    out = set()
    for _, sums in _iter_link_dirs(layout):
        if sums.is_dir(follow_symlinks=False):
            for entry in _scandir(Path(sums.path)):
                if entry.is_symlink() and (h := _link_hex(layout, Path(entry.path))):
                    out.add(h)
    return out


def _temp_file(entry: os.DirEntry[str], pattern: re.Pattern[str]) -> TempFile:
    st = entry.stat(follow_symlinks=False)
    match = pattern.fullmatch(entry.name)
    pid = int(match["pid"]) if match else None
    lock_hex = match["hex"] if match and "hex" in pattern.groupindex else None
    return TempFile(
        path=Path(entry.path),
        size=st.st_size if stat.S_ISREG(st.st_mode) else 0,
        mtime=st.st_mtime,
        owner_pid=pid,
        owner_alive=pid is not None and _pid_alive(pid),
        lock_hex=lock_hex,
    )


def scan_cache(layout: CacheLayout) -> CacheScan:
    """Describe the cache. Never raises for odd entries; they become ``warnings``."""
    warnings: list[str] = []
    cards: list[CachedCard] = []
    temps: list[TempFile] = []
    empty: list[Path] = []
    referenced: set[str] = set()
    for slug, sums in _iter_link_dirs(layout):
        if not sums.is_dir(follow_symlinks=False) or not _HEX.fullmatch(sums.name):
            warnings.append(f"unexpected entry {sums.path}")
            continue
        files = []
        entries = _scandir(Path(sums.path))
        for entry in entries:
            path = Path(entry.path)
            if _TEMP_LINK.fullmatch(entry.name):
                temps.append(_temp_file(entry, _TEMP_LINK))
                continue
            if not entry.is_symlink():
                warnings.append(f"unexpected entry {path} (not a symlink)")
                continue
            hexdigest = _link_hex(layout, path)
            if hexdigest is None:
                warnings.append(f"link {path} does not point into {layout.blobs}")
                continue
            try:
                size: int | None = os.stat(path).st_size
            except OSError:
                size = None
            else:
                referenced.add(hexdigest)
            files.append(CachedFile(entry.name, path, hexdigest, size))
        if not entries:
            empty.append(Path(sums.path))
        cards.append(
            CachedCard(
                slug=slug,
                mdcsum=sums.name,
                path=Path(sums.path),
                files=tuple(files),
                last_used=sums.stat(follow_symlinks=False).st_mtime,
            )
        )
    for slug_entry in _scandir(layout.by_slug):
        if slug_entry.is_dir(follow_symlinks=False) and not _scandir(Path(slug_entry.path)):
            empty.append(Path(slug_entry.path))
    blobs = []
    for entry in _scandir(layout.blobs):
        if not _HEX.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
            warnings.append(f"unexpected entry {entry.path}")
            continue
        st = entry.stat(follow_symlinks=False)
        blobs.append(
            CachedBlob(
                hex=entry.name,
                path=Path(entry.path),
                size=st.st_size,
                last_access=st.st_atime,
                referenced=entry.name in referenced,
            )
        )
    for entry in _scandir(layout.tmp):
        temps.append(_temp_file(entry, _PART))
    return CacheScan(
        layout=layout,
        cards=tuple(cards),
        blobs=tuple(blobs),
        temp_files=tuple(temps),
        empty_dirs=tuple(empty),
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True, slots=True)
class CorruptBlob:
    hex: str
    path: Path
    actual: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    checked: int
    corrupt: tuple[CorruptBlob, ...]
    broken_links: tuple[Path, ...]

    @property
    def ok(self) -> bool:
        return not self.corrupt


def verify_cache(layout: CacheLayout) -> VerifyReport:
    """Re-hash every blob; report blobs whose content no longer matches their name."""
    scan = scan_cache(layout)
    corrupt = []
    for blob in scan.blobs:
        try:
            checksum, _, _ = hash_file(blob.path)
            actual = checksum.hex
        except OSError as exc:
            actual = f"unreadable ({exc.strerror})"
        if actual != blob.hex:
            corrupt.append(CorruptBlob(blob.hex, blob.path, actual))
    broken = tuple(f.path for c in scan.cards for f in c.files if f.broken)
    return VerifyReport(checked=len(scan.blobs), corrupt=tuple(corrupt), broken_links=broken)


# --------------------------------------------------------------------------- prune

PruneKind = Literal["link", "temp", "blob", "dir"]


@dataclass(frozen=True, slots=True)
class PruneItem:
    kind: PruneKind
    path: Path
    size: int
    reason: str
    hex: str | None = None


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """What prune will delete, in order: links, temp files, blobs, then empty directories."""

    layout: CacheLayout
    links: tuple[PruneItem, ...]
    temp_files: tuple[PruneItem, ...]
    blobs: tuple[PruneItem, ...]
    dirs: tuple[PruneItem, ...]

    @property
    def items(self) -> tuple[PruneItem, ...]:
        return self.links + self.temp_files + self.blobs + self.dirs

    @property
    def expected_freed_bytes(self) -> int:
        return sum(i.size for i in self.items)

    @property
    def empty(self) -> bool:
        return not self.items


def plan_prune(
    scan: CacheScan, *, now: float | None = None, stale_after: float = STALE_TEMP_AGE
) -> PrunePlan:
    """Plan a prune from a scan (pure): broken links, unreferenced blobs, temp files whose
    writer is gone (or older than ``stale_after``), and directories left empty."""
    now = time.time() if now is None else now
    links = tuple(
        PruneItem("link", f.path, 0, "broken link", f.hex)
        for c in scan.cards
        for f in c.files
        if f.broken
    )
    temps = tuple(
        PruneItem("temp", t.path, t.size, "leftover temp file", t.lock_hex)
        for t in scan.temp_files
        if not t.owner_alive or now - t.mtime > stale_after
    )
    blobs = tuple(
        PruneItem("blob", b.path, b.size, "no link refers to it", b.hex)
        for b in scan.blobs
        if not b.referenced
    )
    removed = {i.path for i in links + temps}
    emptied = set(scan.empty_dirs)
    for c in scan.cards:
        remaining = [f for f in c.files if f.path not in removed]
        others = [t for t in scan.temp_files if t.path.parent == c.path and t.path not in removed]
        if not remaining and not others:
            emptied.add(c.path)
    by_slug: dict[Path, list[Path]] = {}
    for c in scan.cards:
        by_slug.setdefault(c.path.parent, []).append(c.path)
    for slug_dir, sums in by_slug.items():
        if all(s in emptied for s in sums):
            emptied.add(slug_dir)
    # Children before parents, so each rmdir finds its directory empty.
    dirs = tuple(
        PruneItem("dir", d, 0, "empty directory")
        for d in sorted(emptied, key=lambda p: (-len(p.parts), p))
    )
    return PrunePlan(scan.layout, links, temps, blobs, dirs)


@dataclass(frozen=True, slots=True)
class PruneResult:
    removed: tuple[PruneItem, ...]
    skipped: tuple[tuple[PruneItem, str], ...] = field(default=())

    @property
    def freed_bytes(self) -> int:
        return sum(i.size for i in self.removed)


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    lock = filelock.FileLock(path, fallback_to_soft=False)
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:
        yield False
        return
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        yield True
        return
    try:
        yield True
    finally:
        lock.release()


def execute_prune(plan: PrunePlan) -> PruneResult:
    """Delete what ``plan`` lists, re-checking each item first; items that changed since the
    scan (a link repaired, a blob linked again, a lock held) are skipped, never deleted."""
    layout = plan.layout
    removed: list[PruneItem] = []
    skipped: list[tuple[PruneItem, str]] = []

    def unlink(item: PruneItem) -> None:
        try:
            item.path.unlink()
        except FileNotFoundError:
            skipped.append((item, "already gone"))
        except OSError as exc:
            skipped.append((item, exc.strerror or str(exc)))
        else:
            removed.append(item)

    for item in plan.links:
        lock = layout.lock(item.hex) if item.hex else None
        with contextlib.ExitStack() as stack:
            if (
                lock is not None
                and lock.parent.is_dir()
                and not stack.enter_context(_try_lock(lock))
            ):
                skipped.append((item, "blob is locked"))
                continue
            if not item.path.is_symlink() or item.path.exists():
                skipped.append((item, "no longer broken"))
                continue
            unlink(item)
    for item in plan.temp_files:
        unlink(item)
    for start in range(0, len(plan.blobs), _LOCK_BATCH):
        batch = plan.blobs[start : start + _LOCK_BATCH]
        with contextlib.ExitStack() as stack:
            held = []
            for item in batch:
                assert item.hex is not None
                if stack.enter_context(_try_lock(layout.lock(item.hex))):
                    held.append(item)
                else:
                    skipped.append((item, "blob is locked"))
            # Rescan only once every lock in the batch is held: links appear only under them.
            referenced = referenced_hexes(layout)
            for item in held:
                if item.hex in referenced:
                    skipped.append((item, "linked again"))
                else:
                    unlink(item)
    for item in plan.dirs:
        try:
            item.path.rmdir()
        except FileNotFoundError:
            skipped.append((item, "already gone"))
        except OSError as exc:
            skipped.append((item, exc.strerror or str(exc)))
        else:
            removed.append(item)
    return PruneResult(tuple(removed), tuple(skipped))
