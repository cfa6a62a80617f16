"""Cache management: scan (ls), verify, and plan-then-execute removal (prune, rm, verify --fix).

A scan describes the cache as frozen dataclasses and collects oddities as warnings instead of
failing. Every removal is planned from a scan by a pure function (:func:`plan_prune`,
:func:`plan_removal`, :func:`plan_fix`); the plan can be printed, then executed by
:func:`execute_plan`, which re-checks every item first and skips what changed since the scan.

Execution removes card directories first, then temp files, then blobs, then empty
directories, so an interrupted run never leaves a link without its blob. A card directory is
first renamed out of ``by-slug/`` (to ``.tmp-rm.<pid>.<uuid>``), so a frontend sees it whole
or not at all. A blob is removed only while its lock is held and after re-checking, under that
lock, that no link refers to it (resolves create links under the same lock; the re-check
reads card directories through open descriptors, so one published meanwhile cannot hide its
links, see :func:`referenced_hexes`). All of this is
safe while frontends use the same cache: what a running frontend still serves, it touches
(its last use) and re-creates if it is removed anyway.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import filelock

from discovery_mdc.cache._plan import TEMP_PREFIX, CacheLayout, slug_dir_name
from discovery_mdc.cache._store import (
    CARD_STAGING_PREFIX,
    PART_SUFFIX,
    REMOVAL_PREFIX,
    CardDir,
    CardDirEntry,
    read_card_dir,
    remove_link_dir,
    unique_name,
)
from discovery_mdc.card import hash_file, slugify
from discovery_mdc.errors import CacheError, ConfigError

__all__ = [
    "STALE_TEMP_AGE",
    "CacheScan",
    "CachedBlob",
    "CachedCard",
    "CachedFile",
    "CorruptBlob",
    "IncompleteCard",
    "PruneItem",
    "PrunePlan",
    "PruneResult",
    "TempFile",
    "VerifyReport",
    "execute_plan",
    "plan_fix",
    "plan_prune",
    "plan_removal",
    "referenced_hexes",
    "scan_cache",
    "select_cards",
    "verify_cache",
]

_HEX: Final = re.compile(r"[0-9a-f]{64}")
#: A temp file or staging directory whose owner looks alive is still removed once it is this
#: old (seconds): a pid can be reused, and no fetch takes a day.
STALE_TEMP_AGE: Final = 24 * 3600.0
_PART: Final = re.compile(
    r"(?P<hex>[0-9a-f]{64})\.(?P<pid>\d+)\.[0-9a-f]+" + re.escape(PART_SUFFIX)
)
_TEMP_LINK: Final = re.compile(re.escape(TEMP_PREFIX) + r"link\.(?P<pid>\d+)\.[0-9a-f]+")
_INCOMPLETE: Final = re.compile(
    rf"(?:{re.escape(CARD_STAGING_PREFIX)}(?P<sum>[0-9a-f]{{64}})\.|{re.escape(REMOVAL_PREFIX)})"
    r"(?P<pid>\d+)\.[0-9a-f]+"
)
_LOCK_BATCH: Final = 256
# The fewest hex digits of an mdcsum ``cache rm MODEL/MDCSUM`` takes.
_MIN_PREFIX: Final = 4
# How often a reference scan lists a model directory again while card directories keep
# appearing in it (each listing reads only the new ones).
_RESCANS: Final = 50


# --------------------------------------------------------------------------- scan


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
    """One published ``by-slug/<slug>/<mdcsum>`` directory. ``last_used`` is its newest
    link's mtime, which every resolve of the card, and a frontend serving it, moves."""

    slug: str
    mdcsum: str
    path: Path
    files: tuple[CachedFile, ...]
    last_used: float

    @property
    def id(self) -> str:
        """``<slug>/<mdcsum>``, as ``cache rm`` takes it."""
        return f"{self.slug}/{self.mdcsum}"

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def broken(self) -> tuple[CachedFile, ...]:
        return tuple(f for f in self.files if f.broken)


@dataclass(frozen=True, slots=True)
class IncompleteCard:
    """A card directory being staged (``.tmp-card.<mdcsum>...``) or left half deleted
    (``.tmp-rm...``); never a usable card. ``owner_alive`` is whether its writer still runs."""

    slug: str
    path: Path
    mdcsum: str | None
    hexes: tuple[str, ...]
    mtime: float
    owner_pid: int | None
    owner_alive: bool


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
    incomplete: tuple[IncompleteCard, ...] = ()

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
    except (FileNotFoundError, NotADirectoryError):
        return []


def _blob_hex(layout: CacheLayout, card_dir: Path, target: str | None) -> str | None:
    """The blob hex a link in ``card_dir`` with this target points at, or ``None`` if it
    points anywhere else (or is no link)."""
    if target is None:
        return None
    resolved = Path(os.path.normpath(card_dir / target))
    if resolved.parent != layout.blobs or not _HEX.fullmatch(resolved.name):
        return None
    return resolved.name


def _referenced_in(layout: CacheLayout, slug_dir: Path) -> set[str]:
    """The blobs the card directories of one model link to.

    Each directory is read through its own descriptor, so a rename (staging to published, or
    out of the way to be deleted) cannot hide its links once it is open. A directory renamed
    before it was opened shows up under its new name (a new name and inode) in the next
    listing, and so does one a listing missed while it was being renamed; the listings repeat
    until one shows nothing new. Only a directory renamed a second time (out of the way, to be
    deleted) can be missed, and its links are going anyway.
    """
    out: set[str] = set()
    seen: set[tuple[str, int]] = set()
    for _ in range(_RESCANS):
        new = [
            e
            for e in _scandir(slug_dir)
            if e.is_dir(follow_symlinks=False) and (e.name, e.inode()) not in seen
        ]
        if not new:
            return out
        for entry in new:
            seen.add((entry.name, entry.inode()))
            path = slug_dir / entry.name
            read = read_card_dir(path)
            if read is not None:
                seen.add((entry.name, read.inode))
                out.update(h for e in read.entries if (h := _blob_hex(layout, path, e.target)))
    raise CacheError(f"card directories under {slug_dir} kept changing during a scan")


def referenced_hexes(layout: CacheLayout) -> set[str]:
    """Every blob hex some link in ``by-slug/`` points at (staging directories included).

    Called with the locks of the blobs in question held (links are only made under them), it
    sees every link to them that existed when it started: links never move between
    directories except by renaming a whole directory within its model directory, and model
    directories are never renamed (a new one, or one removed while empty, holds no such link).
    """
    out: set[str] = set()
    for slug in _scandir(layout.by_slug):
        if slug.is_dir(follow_symlinks=False):
            out |= _referenced_in(layout, Path(slug.path))
    return out


def _temp_file(path: Path, st: os.stat_result, match: re.Match[str] | None) -> TempFile:
    pid = int(match["pid"]) if match else None
    return TempFile(
        path=path,
        size=st.st_size if stat.S_ISREG(st.st_mode) else 0,
        mtime=st.st_mtime,
        owner_pid=pid,
        owner_alive=pid is not None and _pid_alive(pid),
        lock_hex=match["hex"] if match and "hex" in match.re.groupindex else None,
    )


@dataclass(slots=True)
class _Scan:
    """What :func:`scan_cache` collects, model directory by model directory."""

    layout: CacheLayout
    cards: list[CachedCard] = field(default_factory=list)
    incomplete: list[IncompleteCard] = field(default_factory=list)
    temps: list[TempFile] = field(default_factory=list)
    empty: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    referenced: set[str] = field(default_factory=set)

    def model_dir(self, slug: os.DirEntry[str]) -> None:
        if not slug.is_dir(follow_symlinks=False):
            self.warnings.append(f"unexpected entry {slug.path}")
            return
        entries = _scandir(Path(slug.path))
        if not entries:
            self.empty.append(Path(slug.path))
        for entry in entries:
            partial = _INCOMPLETE.fullmatch(entry.name)
            read = None
            if partial or _HEX.fullmatch(entry.name):
                read = read_card_dir(Path(entry.path), stats=True)
            if read is None:
                if os.path.lexists(entry.path):  # else renamed or removed since the listing
                    self.warnings.append(f"unexpected entry {entry.path}")
                continue
            self.card_dir(slug.name, Path(entry.path), read, partial)

    def card_dir(self, slug: str, path: Path, read: CardDir, partial: re.Match[str] | None) -> None:
        files = [f for e in read.entries if (f := self.link(path, e)) is not None]
        self.referenced.update(f.hex for f in files if f.hex and not f.broken)
        if partial:
            pid = int(partial["pid"])
            hexes = tuple(f.hex for f in files if f.hex)
            self.incomplete.append(IncompleteCard(
                slug, path, partial["sum"], hexes, read.mtime, pid, _pid_alive(pid)
            ))  # fmt: skip
        elif not read.entries:
            self.empty.append(path)
        else:
            self.cards.append(CachedCard(slug, path.name, path, tuple(files), read.last_used))

    def link(self, card_dir: Path, entry: CardDirEntry) -> CachedFile | None:
        """A card directory's entry as a link (temp links and odd entries aside)."""
        path = card_dir / entry.name
        if temp := _TEMP_LINK.fullmatch(entry.name):
            assert entry.lstat is not None
            self.temps.append(_temp_file(path, entry.lstat, temp))
        elif entry.target is None:
            self.warnings.append(f"unexpected entry {path} (not a symlink)")
        elif (hexdigest := _blob_hex(self.layout, card_dir, entry.target)) is None:
            self.warnings.append(f"link {path} does not point into {self.layout.blobs}")
        else:
            return CachedFile(entry.name, path, hexdigest, entry.size)
        return None

    def blobs(self) -> tuple[CachedBlob, ...]:
        blobs = []
        for entry in _scandir(self.layout.blobs):
            if not _HEX.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                self.warnings.append(f"unexpected entry {entry.path}")
                continue
            with contextlib.suppress(FileNotFoundError):  # removed since the listing
                st = entry.stat(follow_symlinks=False)
                blobs.append(CachedBlob(entry.name, Path(entry.path), st.st_size, st.st_atime,
                                        referenced=entry.name in self.referenced))  # fmt: skip
        return tuple(blobs)

    def staging_files(self) -> None:
        for entry in _scandir(self.layout.tmp):
            with contextlib.suppress(FileNotFoundError):  # published or removed meanwhile
                st = entry.stat(follow_symlinks=False)
                self.temps.append(_temp_file(Path(entry.path), st, _PART.fullmatch(entry.name)))


def scan_cache(layout: CacheLayout) -> CacheScan:
    """Describe the cache. Never raises for odd entries, or for entries that change while it
    runs; odd ones become ``warnings``."""
    scan = _Scan(layout)
    for slug in _scandir(layout.by_slug):
        scan.model_dir(slug)
    blobs = scan.blobs()
    scan.staging_files()
    return CacheScan(
        layout=layout,
        cards=tuple(scan.cards),
        blobs=blobs,
        temp_files=tuple(scan.temps),
        empty_dirs=tuple(scan.empty),
        warnings=tuple(scan.warnings),
        incomplete=tuple(scan.incomplete),
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


def _content_hex(path: Path) -> str:
    try:
        checksum, _, _ = hash_file(path)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    return checksum.hex


def verify_cache(layout: CacheLayout, scan: CacheScan | None = None) -> VerifyReport:
    """Re-hash every blob; report blobs whose content no longer matches their name."""
    scan = scan_cache(layout) if scan is None else scan
    corrupt = []
    for blob in scan.blobs:
        actual = _content_hex(blob.path)
        if actual != blob.hex:
            corrupt.append(CorruptBlob(blob.hex, blob.path, actual))
    broken = tuple(f.path for c in scan.cards for f in c.broken)
    return VerifyReport(checked=len(scan.blobs), corrupt=tuple(corrupt), broken_links=broken)


# --------------------------------------------------------------------------- plans

PruneKind = Literal["card", "incomplete", "temp", "blob", "dir"]


@dataclass(frozen=True, slots=True)
class PruneItem:
    """One thing a plan deletes, and the condition re-checked before deleting it.

    ``kind`` is ``card`` (a published card directory: its links go, never the blobs they
    point at), ``incomplete`` (a staging or half-deleted card directory), ``temp`` (a staging
    file or temp link), ``blob`` or ``dir`` (an empty directory). A card planned because it
    was unused (``unused_since`` set) is kept if it was used after that; one planned for
    broken links (``broken``) is kept if they were repaired; a ``corrupt`` blob is re-hashed.
    """

    kind: PruneKind
    path: Path
    size: int
    reason: str
    hex: str | None = None
    slug: str | None = None
    mdcsum: str | None = None
    unused_since: float | None = None
    broken: tuple[str, ...] = ()
    corrupt: bool = False


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """What a run will delete, in order: cards, incomplete cards, temp files, blobs, then
    empty directories."""

    layout: CacheLayout
    cards: tuple[PruneItem, ...]
    temp_files: tuple[PruneItem, ...]
    blobs: tuple[PruneItem, ...]
    dirs: tuple[PruneItem, ...]

    @property
    def items(self) -> tuple[PruneItem, ...]:
        return self.cards + self.temp_files + self.blobs + self.dirs

    @property
    def expected_freed_bytes(self) -> int:
        return sum(i.size for i in self.items)

    @property
    def empty(self) -> bool:
        return not self.items


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


def _card_item(
    card: CachedCard,
    reason: str,
    *,
    unused_since: float | None = None,
    broken: tuple[str, ...] = (),
) -> PruneItem:
    return PruneItem("card", card.path, 0, reason, slug=card.slug, mdcsum=card.mdcsum,
                     unused_since=unused_since, broken=broken)  # fmt: skip


def _finish(
    scan: CacheScan,
    cards: Mapping[Path, PruneItem],
    temps: Sequence[PruneItem] = (),
    *,
    blobs: Literal["unreferenced", "orphaned"],
    corrupt: Mapping[str, str] | None = None,
) -> PrunePlan:
    """Add blobs (every unreferenced one, or those only the removed cards link; and the
    ``corrupt`` ones, with their reasons) and the directories left empty."""
    removed = set(cards)
    kept = {f.hex for c in scan.cards if c.path not in removed for f in c.files if f.hex}
    kept |= {h for i in scan.incomplete if i.path not in removed for h in i.hexes}
    orphaned = {f.hex for c in scan.cards if c.path in removed for f in c.files} - kept
    blob_items = []
    for b in scan.blobs:
        if corrupt and b.hex in corrupt:
            blob_items.append(
                PruneItem("blob", b.path, b.size, corrupt[b.hex], b.hex, corrupt=True)
            )
        elif b.hex in orphaned:
            blob_items.append(
                PruneItem("blob", b.path, b.size, "only removed cards link it", b.hex)
            )
        elif blobs == "unreferenced" and b.hex not in kept:
            blob_items.append(PruneItem("blob", b.path, b.size, "no link refers to it", b.hex))
    emptied = set(scan.empty_dirs) if blobs == "unreferenced" else set()
    by_slug: dict[Path, list[Path]] = {}
    for entry in [*(c.path for c in scan.cards), *(i.path for i in scan.incomplete)]:
        by_slug.setdefault(entry.parent, []).append(entry)
    for slug_dir, entries in by_slug.items():
        if all(e in removed for e in entries):
            emptied.add(slug_dir)
    # Children before parents, so each rmdir finds its directory empty.
    dirs = tuple(
        PruneItem("dir", d, 0, "empty directory")
        for d in sorted(emptied, key=lambda p: (-len(p.parts), p))
    )
    ordered = sorted(cards.values(), key=lambda i: (i.kind != "card", i.path))
    return PrunePlan(scan.layout, tuple(ordered), tuple(temps), tuple(blob_items), dirs)


def plan_prune(
    scan: CacheScan,
    *,
    now: float | None = None,
    stale_after: float = STALE_TEMP_AGE,
    older_than: float | None = None,
    keep: int | None = None,
) -> PrunePlan:
    """Plan a prune from a scan (pure).

    Always: cards with broken links, incomplete cards and temp files whose writer is gone (or
    older than ``stale_after``), blobs no link refers to, and directories left empty. With
    ``older_than`` (seconds), cards last used longer ago than that; with ``keep``, all but
    the ``keep`` most recently used cards of each model (slug).
    """
    now = time.time() if now is None else now
    cards: dict[Path, PruneItem] = {}
    for c in scan.cards:
        if c.broken:
            cards[c.path] = _card_item(
                c,
                f"{len(c.broken)} of {len(c.files)} links broken",
                broken=tuple(f.hex for f in c.broken if f.hex),
            )
    if older_than is not None:
        for c in scan.cards:
            if c.path not in cards and now - c.last_used > older_than:
                cards[c.path] = _card_item(
                    c, f"last used {_ago(now - c.last_used)}", unused_since=c.last_used
                )
    if keep is not None:
        per_model: dict[str, list[CachedCard]] = {}
        for c in scan.cards:
            per_model.setdefault(c.slug, []).append(c)
        for slug, group in per_model.items():
            group.sort(key=lambda c: (-c.last_used, c.mdcsum))
            for c in group[keep:]:
                if c.path not in cards:
                    cards[c.path] = _card_item(
                        c,
                        f"not among the {keep} most recently used of {slug}",
                        unused_since=c.last_used,
                    )
    for i in scan.incomplete:
        stale = now - i.mtime > stale_after
        if not i.owner_alive or stale:
            why = "stale" if i.owner_alive else f"pid {i.owner_pid} is gone"
            cards[i.path] = PruneItem(
                "incomplete", i.path, 0, f"incomplete card ({why})", slug=i.slug, mdcsum=i.mdcsum
            )
    temps = [
        PruneItem("temp", t.path, t.size, "leftover temp file", t.lock_hex)
        for t in scan.temp_files
        if not t.owner_alive or now - t.mtime > stale_after
    ]
    return _finish(scan, cards, temps, blobs="unreferenced")


def select_cards(scan: CacheScan, spec: str) -> list[CachedCard]:
    """The cards ``spec`` names: ``MODEL`` (a model name or its slug) or ``MODEL/MDCSUM``
    (the mdcsum, or a prefix of at least 4 hex digits that only one of the model's cards
    has). Empty when nothing matches.

    Raises :class:`~discovery_mdc.errors.ConfigError` when the prefix of a cached model's
    mdcsum is shorter than 4 hex digits or matches more than one card (naming them).
    """

    def of_model(model: str) -> list[CachedCard]:
        names = {model, slugify(model)}
        with contextlib.suppress(Exception):
            names.add(slug_dir_name(slugify(model)))
        return [c for c in scan.cards if c.slug in names]

    whole = of_model(spec)
    model, sep, prefix = spec.rpartition("/")
    if whole or not sep or not re.fullmatch(r"[0-9a-fA-F]{0,64}", prefix):
        return whole
    cards = of_model(model)
    if cards and len(prefix) < _MIN_PREFIX:
        raise ConfigError(
            f"{spec!r}: the mdcsum prefix {prefix!r} is too short; give at least "
            f"{_MIN_PREFIX} hex digits (see `discovery-mdc cache ls -q`)"
        )
    found = [c for c in cards if c.mdcsum.startswith(prefix.lower())]
    if len(found) > 1:
        raise ConfigError(
            f"{spec!r} is ambiguous: it matches {len(found)} cards "
            f"({', '.join(c.id for c in found)}); give more of the mdcsum"
        )
    return found


def plan_removal(scan: CacheScan, cards: Iterable[CachedCard]) -> PrunePlan:
    """Plan ``cache rm`` (pure): these cards, the blobs only they link, and the model
    directories they leave empty."""
    items = {c.path: _card_item(c, "requested") for c in cards}
    return _finish(scan, items, blobs="orphaned")


def plan_fix(scan: CacheScan, report: VerifyReport) -> PrunePlan:
    """Plan ``verify --fix`` (pure): every corrupt blob, every card linking one (a frontend
    that needs such a card again fetches and verifies it anew), and the other blobs only
    those cards link, as ``cache rm`` would remove them."""
    bad = {c.hex: c for c in report.corrupt}
    items = {
        c.path: _card_item(c, "links a corrupt blob")
        for c in scan.cards
        if any(f.hex in bad for f in c.files)
    }
    reasons = {h: f"corrupt: content hashes to {c.actual}" for h, c in bad.items()}
    return _finish(scan, items, blobs="orphaned", corrupt=reasons)


# --------------------------------------------------------------------------- execute


@dataclass(frozen=True, slots=True)
class PruneResult:
    removed: tuple[PruneItem, ...]
    skipped: tuple[tuple[PruneItem, str], ...] = field(default=())
    failed: tuple[tuple[PruneItem, str], ...] = field(default=())

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
    except FileNotFoundError:
        yield True  # no .locks/ directory: nobody can hold a lock
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


class _Run:
    def __init__(self, plan: PrunePlan) -> None:
        self.layout = plan.layout
        self.removed: list[PruneItem] = []
        self.skipped: list[tuple[PruneItem, str]] = []
        self.failed: list[tuple[PruneItem, str]] = []

    def _attempt(self, item: PruneItem, step: Callable[[], object], *, fail: bool = True) -> bool:
        """Run one step of removing ``item``; False (recorded as skipped: gone already, or a
        directory no longer empty; or as failed, unless not ``fail``) if it raised."""
        try:
            step()
        except FileNotFoundError:
            self.skipped.append((item, "already gone"))
        except OSError as exc:
            busy = exc.errno == errno.ENOTEMPTY
            reason = "no longer empty" if busy else exc.strerror or str(exc)
            (self.failed if fail and not busy else self.skipped).append((item, reason))
        else:
            return True
        return False

    def _remove(self, item: PruneItem, step: Callable[[], object], *, fail: bool = True) -> None:
        if self._attempt(item, step, fail=fail):
            self.removed.append(item)

    def unlink(self, item: PruneItem) -> None:
        self._remove(item, item.path.unlink)

    def dir(self, item: PruneItem) -> None:
        self._remove(item, item.path.rmdir, fail=False)

    def link_dir(self, item: PruneItem) -> None:
        self._remove(item, lambda: remove_link_dir(item.path))

    def card(self, item: PruneItem) -> None:
        with contextlib.ExitStack() as stack:
            for h in item.broken:
                if not stack.enter_context(_try_lock(self.layout.lock(h))):
                    self.skipped.append((item, "a frontend is repairing it"))
                    return
            kept = _kept(item)
            if kept is not None:
                self.skipped.append((item, kept))
                return
            # Out of by-slug/ in one step: a frontend finds the card whole or not at all.
            away = item.path.parent / unique_name(REMOVAL_PREFIX[:-1])
            if not self._attempt(item, lambda: os.rename(item.path, away)):
                return
        self._remove(item, lambda: remove_link_dir(away))

    def blobs(self, items: Sequence[PruneItem]) -> None:
        for start in range(0, len(items), _LOCK_BATCH):
            batch = items[start : start + _LOCK_BATCH]
            with contextlib.ExitStack() as stack:
                held = []
                for item in batch:
                    assert item.hex is not None
                    if stack.enter_context(_try_lock(self.layout.lock(item.hex))):
                        held.append(item)
                    else:
                        self.skipped.append((item, "blob is locked"))
                # Rescan only once every lock in the batch is held: links appear only under
                # them.
                referenced = referenced_hexes(self.layout) if held else set()
                for item in held:
                    if item.corrupt:
                        if _content_hex(item.path) == item.hex:
                            self.skipped.append((item, "replaced by a good copy since"))
                            continue
                    elif item.hex in referenced:
                        self.skipped.append((item, "linked again"))
                        continue
                    self.unlink(item)


def _kept(item: PruneItem) -> str | None:
    """Why a card planned for removal stays after all (re-checked under its locks), if it
    does: gone already, its broken links repaired, or used since the plan."""
    read = read_card_dir(item.path, stats=True)
    if read is None:
        return "already gone"
    if item.broken and not any(e.target is not None and e.size is None for e in read.entries):
        return "repaired since the plan"
    if item.unused_since is not None and read.last_used > item.unused_since:
        return "used since the plan"
    return None


def execute_plan(plan: PrunePlan) -> PruneResult:
    """Delete what ``plan`` lists, re-checking each item first; items that changed since the
    scan (a card used or repaired, a blob linked again, a lock held) are skipped, never
    deleted."""
    run = _Run(plan)
    for item in plan.cards:
        if item.kind == "card":
            run.card(item)
        else:
            run.link_dir(item)
    for item in plan.temp_files:
        run.unlink(item)
    run.blobs(plan.blobs)
    for item in plan.dirs:
        run.dir(item)
    return PruneResult(tuple(run.removed), tuple(run.skipped), tuple(run.failed))
