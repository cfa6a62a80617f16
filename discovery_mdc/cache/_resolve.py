"""The verify-and-cache pipeline: point every slot of a card at a verified local file."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from discovery_mdc._metrics import Durations
from discovery_mdc.cache._fetch import FetchConfig, fetch_uri
from discovery_mdc.cache._plan import (
    CacheLayout,
    CardPlan,
    FilePlan,
    SourceHealth,
    http_source,
    local_path_of,
    plan_card,
    resolve_cache_root,
    source_label,
)
from discovery_mdc.cache._store import (
    BlobStore,
    Staging,
    blob_lock,
    refresh_last_used,
    remove_link_dir,
    verify_file,
)
from discovery_mdc.card import ModelDeploymentCard, is_new_format, mdcsum
from discovery_mdc.errors import (
    AllSourcesFailedError,
    CacheError,
    ChecksumMismatchError,
    FetchError,
    SizeLimitError,
    SourceUnreachableError,
)

__all__ = [
    "AllSourcesFailedError",
    "CacheStats",
    "ProgressCallback",
    "ResolvedCard",
    "cache_stats",
    "resolve_metadata_files",
]

log = logging.getLogger("discovery_mdc.cache")

#: ``progress(filename, bytes_received, declared_size_or_None)``
ProgressCallback = Callable[[str, int, int | None], None]
# A published card directory that keeps vanishing under us is given up on after this many
# rounds (each round either repairs it in place or stages and publishes it again).
_PUBLISH_ATTEMPTS = 5
# Errors that say "this source is bad": try the next alternate. Anything else (a full disk,
# a lock timeout, cancellation) stops at once.
_SOURCE_ERRORS = (FetchError, ChecksumMismatchError, SizeLimitError)


@dataclass(slots=True)
class CacheStats:
    """Counters for metrics; read the attributes (or :meth:`snapshot`) at any time.
    ``fetch_seconds`` holds the duration of every successful blob fetch (all its attempts)."""

    bytes_fetched: int = 0
    fetches: int = 0
    hits: int = 0
    failures: int = 0
    repairs: int = 0
    by_source: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(source, "ok" | "failed") -> fetch attempts; the source is ``host:port`` for http(s)."""
    fetch_seconds: Durations = field(default_factory=Durations)

    def snapshot(self) -> dict[str, int]:
        """The scalar counters."""
        return {
            "bytes_fetched": self.bytes_fetched,
            "fetches": self.fetches,
            "hits": self.hits,
            "failures": self.failures,
            "repairs": self.repairs,
        }


_STATS = CacheStats()


def cache_stats() -> CacheStats:
    """The process-wide counters that :func:`resolve_metadata_files` updates by default."""
    return _STATS


@dataclass(frozen=True, slots=True)
class ResolvedCard:
    """A card whose slots point at local files.

    ``local_dir`` is ``by-slug/<slug>/<mdcsum>`` for cached cards; for a legacy card used in
    place it is the files' common directory (``None`` when they do not share one).
    """

    card: ModelDeploymentCard
    local_dir: Path | None
    mdcsum: str
    in_place: bool = False
    files: tuple[Path, ...] = field(default=())


# --------------------------------------------------------------------------- single-flight

_Key = tuple[str, str, int | None, str]


class _Flight:
    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task
        self.waiters = 0


_flights: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_Key, _Flight]] = (
    weakref.WeakKeyDictionary()
)


def _retrieve(task: asyncio.Task[None]) -> None:
    # Mark the exception as retrieved: if every waiter was cancelled nobody else will.
    if not task.cancelled():
        task.exception()


async def _single_flight(key: _Key, make: Callable[[], Awaitable[None]]) -> None:
    """Run ``make()`` once per key at a time in this event loop; concurrent callers join it."""
    loop = asyncio.get_running_loop()
    table = _flights.setdefault(loop, {})
    flight = table.get(key)
    if flight is None:

        async def run() -> None:
            await make()

        flight = _Flight(loop.create_task(run()))
        table[key] = flight

        def done(task: asyncio.Task[None], flight: _Flight = flight) -> None:
            if table.get(key) is flight:
                del table[key]
            _retrieve(task)

        flight.task.add_done_callback(done)
    flight.waiters += 1
    try:
        await asyncio.shield(flight.task)
    except asyncio.CancelledError:
        if flight.waiters == 1 and not flight.task.done():
            # The last waiter is gone: stop the work, and let it clean up (temp file, lock)
            # before reporting the cancellation. Unlisted first, so a caller arriving during
            # the clean-up starts a fresh flight instead of joining a cancelled one.
            if table.get(key) is flight:
                del table[key]
            flight.task.cancel()
            await asyncio.wait({flight.task})
        raise
    finally:
        flight.waiters -= 1


# --------------------------------------------------------------------------- pipeline


class _Sessions:
    """Creates the HTTP session on first use, so cache hits never build one."""

    def __init__(self, session: aiohttp.ClientSession | None) -> None:
        self._given = session
        self._own: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        if self._given is not None:
            return self._given
        if self._own is None:
            self._own = aiohttp.ClientSession(read_bufsize=1 << 20)
        return self._own

    async def close(self) -> None:
        if self._own is not None:
            await self._own.close()


@dataclass(slots=True)
class _Run:
    store: BlobStore
    config: FetchConfig
    lock_timeout: float
    sessions: _Sessions
    stats: CacheStats
    progress: ProgressCallback | None
    health: SourceHealth | None = None

    async def ensure_file(self, fp: FilePlan, *, in_place: bool = False) -> None:
        """Make ``fp.link_path`` point at a verified blob; concurrent callers share one run.

        ``in_place`` repairs a published card directory: it is never re-created, and
        :class:`_DirGone` says it vanished (a prune or ``cache rm`` took it).
        """
        root = os.fspath(self.store.layout.root)
        with _wanting(root, fp.hex, fp.uris):
            key = (root, fp.hex, fp.size, os.fspath(fp.link_path))
            await _single_flight(key, lambda: self._ensure_file(fp, in_place))

    async def _ensure_file(self, fp: FilePlan, in_place: bool) -> None:
        # Warm path, no lock: the link is already right and the blob verifies.
        if self.store.links_to(fp.hex, fp.link_path):
            state = await self.store.check(fp.hex)
            if state.size is not None:
                self._check_size(fp, state.size)
                self.stats.hits += 1
                return
        # Links are only created under the blob lock, so prune (which deletes an unreferenced
        # blob only while holding its lock) can never leave a link without its blob.
        async with blob_lock(self.store.layout.lock(fp.hex), self.lock_timeout):
            state = await self.store.check(fp.hex)
            if state.size is not None:
                self.stats.hits += 1
                size = state.size
            else:
                if state.corrupt:
                    log.warning("replacing corrupt blob %s", fp.blob_path)
                    self.store.remove(fp.hex)
                    self.stats.repairs += 1
                size = await self.fetch(fp)
            self._check_size(fp, size)
            if not self.store.link(fp.hex, fp.link_path, create_dir=not in_place):
                raise _DirGone(fp.link_path.parent)

    @staticmethod
    def _check_size(fp: FilePlan, size: int) -> None:
        if fp.size is not None and size != fp.size:
            # The blob is right for its hash; this card's declared size is not.
            raise ChecksumMismatchError(
                fp.uris[0], _describe(fp.hex, fp.size), _describe(fp.hex, size)
            )

    async def fetch(self, fp: FilePlan) -> int:
        errors: list[tuple[str, Exception]] = []
        began = time.monotonic()
        progress = self.progress
        on_progress = (
            (lambda n: progress(fp.filename, n, fp.size)) if progress is not None else None
        )
        uris = list(fp.uris)
        health = self.health
        if health:
            # Sources backing off after failing go last (each keeps its place otherwise).
            uris.sort(key=lambda u: health.backing_off(http_source(u) or "") is not None)
        if len(uris) > 1:
            log.debug("%s (%s): sources in order %s", fp.filename, fp.hex[:12], uris)
        for uri in uris:
            staging = await self._attempt(fp, uri, on_progress, errors)
            if staging is not None:
                log.debug("%s (%s): served by %s, source %d of %d", fp.filename, fp.hex[:12],
                          uri, len(errors) + 1, len(uris), extra={"uri": uri})  # fmt: skip
                return self._publish(fp, uri, staging, began)
        # A blob is its checksum, whoever names it: other cards waiting here for the same
        # bytes (a fine-tune's generation_config.json...) may know a host that answers, so a
        # card on a frozen host cannot hold them up. Tried together; the first to verify wins.
        others = _one_per_host(
            u
            for u in _known_elsewhere(os.fspath(self.store.layout.root), fp.hex, uris)
            if health is None or health.backing_off(http_source(u) or "") is None
        )[:_MAX_RACE]
        if others:
            log.info("%s (%s): its own sources failed; trying %d other host(s) that serve it",
                     fp.filename, fp.hex[:12], len(others))  # fmt: skip
            won = await self._race(fp, others, on_progress, errors)
            if won is not None:
                log.debug("%s (%s): served by %s, another card's source", fp.filename,
                          fp.hex[:12], won[0], extra={"uri": won[0]})  # fmt: skip
                return self._publish(fp, *won, began)
        if len(errors) == 1:
            raise errors[0][1]
        raise AllSourcesFailedError(fp.hex, errors)

    async def _attempt(
        self,
        fp: FilePlan,
        uri: str,
        on_progress: Callable[[int], None] | None,
        errors: list[tuple[str, Exception]],
    ) -> Staging | None:
        """Fetch ``uri`` into a staging file and verify it; None (and the error in
        ``errors``) if this source is bad. The caller publishes or discards what it gets."""
        health = self.health
        source = http_source(uri) if health is not None else None
        if health is not None and source is not None and not health.claim(source):
            why = health.backing_off(source) or f"{source} is backing off"
            log.debug("not trying %s for %s: %s", uri, fp.filename, why)
            self.stats.by_source[source, "skipped"] += 1
            errors.append((uri, SourceUnreachableError(f"GET {uri}: {why}")))
            return None
        answered: bool | None = None
        staging = self.store.stage(fp.hex, on_progress)
        verified = False
        try:
            await fetch_uri(
                uri,
                staging,
                fp.cap,
                session=self.sessions.get() if _needs_session(uri) else None,
                config=self.config,
            )
            answered = True
            actual = staging.hexdigest()
            if actual != fp.hex or (fp.size is not None and staging.received != fp.size):
                raise ChecksumMismatchError(
                    uri,
                    _describe(fp.hex, fp.size),
                    _describe(actual, staging.received),
                )
            verified = True
            return staging
        except _SOURCE_ERRORS as exc:
            # Anything but a transport failure means the host answered.
            answered = not isinstance(exc, SourceUnreachableError)
            log.error("rejected %s for %s (%s): %s", uri, fp.filename, fp.slot, exc,
                      extra={"uri": uri, "reason": str(exc)})  # fmt: skip
            self.stats.by_source[source_label(uri), "failed"] += 1
            errors.append((uri, exc))
            return None
        finally:
            if not verified:
                staging.discard()
            if health is not None and source is not None:
                health.record(source, answered)

    async def _race(
        self,
        fp: FilePlan,
        uris: list[str],
        on_progress: Callable[[int], None] | None,
        errors: list[tuple[str, Exception]],
    ) -> tuple[str, Staging] | None:
        """Try ``uris`` at once; the first verified staging, the others discarded."""
        tasks = {asyncio.ensure_future(self._attempt(fp, u, on_progress, errors)): u for u in uris}
        pending = set(tasks)
        won: tuple[str, Staging] | None = None
        try:
            while pending and won is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    staging = task.result()
                    if staging is None:
                        continue
                    if won is None:
                        won = (tasks[task], staging)
                    else:
                        staging.discard()
            return won
        finally:
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    staging = await task
                    if staging is not None:
                        staging.discard()

    def _publish(self, fp: FilePlan, uri: str, staging: Staging, began: float) -> int:
        try:
            self.store.publish(staging)
        finally:
            staging.discard()
        self.stats.fetches += 1
        self.stats.bytes_fetched += staging.received
        self.stats.by_source[source_label(uri), "ok"] += 1
        self.stats.fetch_seconds.observe(time.monotonic() - began)
        log.info("cached %s (%d bytes) from %s", fp.blob_path, staging.received, uri,
                 extra={"uri": uri})  # fmt: skip
        return staging.received


# Per event loop, per (cache root, blob): the http(s) URIs that callers waiting for that blob
# know, with how many of them know each; most recently added last.
_wanted: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, str], dict[str, int]]
] = weakref.WeakKeyDictionary()
#: How many other hosts one fetch tries at once when its own sources failed.
_MAX_RACE = 32


@contextlib.contextmanager
def _wanting(root: str, hexdigest: str, uris: Sequence[str]) -> Iterator[None]:
    """While inside, ``uris`` (the http(s) ones) count as sources of the blob for others."""
    mine = [u for u in uris if http_source(u) is not None]
    entry = _wanted.setdefault(asyncio.get_running_loop(), {}).setdefault((root, hexdigest), {})
    for uri in mine:
        entry[uri] = entry.pop(uri, 0) + 1  # (re)inserted last: the most recent
    try:
        yield
    finally:
        for uri in mine:
            left = entry.get(uri, 0) - 1
            if left > 0:
                entry[uri] = left
            else:
                entry.pop(uri, None)
        if not entry:
            _wanted.get(asyncio.get_running_loop(), {}).pop((root, hexdigest), None)


def _one_per_host(uris: Iterable[str]) -> list[str]:
    """The first of ``uris`` on each ``host:port`` (a host that does not answer for one path
    does not for another)."""
    seen: set[str | None] = set()
    out = []
    for uri in uris:
        host = http_source(uri)
        if host not in seen:
            seen.add(host)
            out.append(uri)
    return out


def _known_elsewhere(root: str, hexdigest: str, exclude: Sequence[str]) -> list[str]:
    """URIs of the blob other waiting callers know, most recent first."""
    entry = _wanted.get(asyncio.get_running_loop(), {}).get((root, hexdigest), {})
    return [u for u in reversed(entry) if u not in exclude]


def _needs_session(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https", "hf")


def _describe(hexdigest: str, size: int | None) -> str:
    return f"blake3:{hexdigest}" + (f" ({size} bytes)" if size is not None else "")


class _DirGone(Exception):
    """A published card directory vanished while it was being repaired in place."""


async def _ensure_all(files: Sequence[FilePlan], run: _Run, *, in_place: bool) -> None:
    results = await asyncio.gather(
        *(run.ensure_file(fp, in_place=in_place) for fp in files), return_exceptions=True
    )
    gone = [r for r in results if isinstance(r, _DirGone)]
    if gone:
        raise gone[0]
    for fp, result in zip(files, results, strict=True):
        if isinstance(result, BaseException):
            run.stats.failures += 1
            if not isinstance(result, Exception):
                raise result
            log.error("cannot cache %s of card slot %s: %s", fp.filename, fp.slot, result)
            raise result


async def _stage_and_publish(plan: CardPlan, run: _Run) -> bool:
    """Link every file in a staging directory, then rename it onto the card directory.
    False when another process published the card first."""
    staging = run.store.stage_dir(plan.link_dir)
    try:
        files = [dataclasses.replace(fp, link_path=staging / fp.filename) for fp in plan.files]
        await _ensure_all(files, run, in_place=False)
        return run.store.publish_dir(staging, plan.link_dir)
    finally:
        remove_link_dir(staging)  # gone already once published; never half a card left


async def _run_plan(plan: CardPlan, run: _Run) -> None:
    """Make ``plan.link_dir`` a complete, verified card directory.

    A published directory is checked (and repaired) in place. Otherwise the card is staged
    and renamed into place, so ``by-slug/`` only ever holds complete cards: a card whose files
    never verify leaves nothing there. Concurrent callers in one process share one staging.
    """
    root = os.fspath(run.store.layout.root)
    for _ in range(_PUBLISH_ATTEMPTS):
        if plan.link_dir.is_dir():
            try:
                await _ensure_all(plan.files, run, in_place=True)
            except _DirGone:
                log.info("%s was removed while in use; staging it again", plan.link_dir)
                continue
            refresh_last_used(fp.link_path for fp in plan.files)
            return
        published: list[bool] = []

        async def attempt(published: list[bool] = published) -> None:
            published.append(await _stage_and_publish(plan, run))

        # Concurrent callers in this process join one staging; a joiner (or the loser of a
        # race with another process) goes round again and finds the published directory.
        await _single_flight((root, plan.mdcsum, None, os.fspath(plan.link_dir)), attempt)
        if published == [True]:
            return
    raise CacheError(
        f"{plan.link_dir} kept vanishing while it was being published (is something deleting "
        "the cache in a loop?)"
    )


def _existing_local_files(card: ModelDeploymentCard) -> dict[str, str] | None:
    """Each slot's absolute local path, or ``None`` unless every slot is an existing file."""
    paths = {name: local_path_of(f.path) for name, f in card.files()}
    local = {name: os.path.abspath(p) for name, p in paths.items() if p is not None}
    if len(local) != len(paths) or not all(os.path.isfile(p) for p in local.values()):
        return None
    return local


async def _in_place(card: ModelDeploymentCard, stats: CacheStats) -> ResolvedCard | None:
    """A legacy card whose files all exist locally, verified against its checksums."""
    local = _existing_local_files(card)
    if local is None:
        return None
    for name, f in card.files():
        state = await verify_file(Path(local[name]), f.checksum.hex, foreign=True)
        if state.size is None or (f.size is not None and state.size != f.size):
            stats.failures += 1
            raise ChecksumMismatchError(
                f.path,
                _describe(f.checksum.hex, f.size),
                _describe(state.actual or "?", state.size),
            )
    files = tuple(Path(p) for p in local.values())
    parents = {f.parent for f in files}
    stats.hits += len(files)
    return ResolvedCard(
        card=card.with_paths(lambda name, _: local[name]),
        local_dir=parents.pop() if len(parents) == 1 else None,
        mdcsum=mdcsum(card),
        in_place=True,
        files=files,
    )


async def resolve_metadata_files(
    card: ModelDeploymentCard,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    alternates: Mapping[str, Sequence[str]] | None = None,
    lock_timeout: float = 600.0,
    connect_timeout: float = 10.0,
    first_byte_timeout: float = 10.0,
    total_timeout: float = 300.0,
    read_timeout: float | None = 60.0,
    session: aiohttp.ClientSession | None = None,
    stats: CacheStats | None = None,
    progress: ProgressCallback | None = None,
    spread: str | None = None,
    health: SourceHealth | None = None,
) -> ResolvedCard:
    """Return ``card`` with every slot pointing at a verified local file.

    New-format cards go through the cache: each file is fetched from its URI (then each of
    ``alternates[hex]``; with ``spread``, a frontend's id, the http(s) sources are tried in
    the order :func:`~discovery_mdc.cache._plan.spread_sources` picks, so one frontend's GETs
    and a fleet's spread evenly over the replicas and each frontend still makes one GET per
    blob), verified against blake3 and size, published to
    ``blobs/<hex>`` and linked at ``by-slug/<slug>/<mdcsum>/<filename>``. A legacy card whose
    files all exist locally is used in place; otherwise each file is fetched from
    ``hf://<source_path>/<file>`` and verified against its checksum.

    Raises :class:`CardError` (unsafe names), :class:`SizeLimitError`,
    :class:`ChecksumMismatchError`, :class:`FetchError` (:class:`AllSourcesFailedError` when
    several URIs were tried; :class:`SourceUnreachableError` for a source that did not
    connect or answer within ``connect_timeout`` / ``first_byte_timeout``, or stalled for
    ``read_timeout``) or :class:`CacheError` (:class:`LockTimeoutError`, disk full).

    With ``health``, transport failures are remembered per ``host:port``: a source backing
    off is tried after the others, and not at all until its time is up (see
    :class:`SourceHealth`), so a card on an unresponsive host fails at once instead of waiting
    out the timeouts again.
    """
    stats = _STATS if stats is None else stats
    hf_fallback = False
    if not is_new_format(card):
        in_place = await _in_place(card, stats)
        if in_place is not None:
            return in_place
        hf_fallback = True
        log.info(
            "legacy card %r: metadata files are not all local; fetching from hf://%s",
            card.display_name,
            card.source_path,
        )
    layout = CacheLayout(resolve_cache_root(cache_dir))
    plan = plan_card(card, layout, alternates=alternates, hf_fallback=hf_fallback, spread=spread)
    store = BlobStore(layout)
    store.ensure_dirs()
    config = FetchConfig(
        connect_timeout=connect_timeout,
        total_timeout=total_timeout,
        read_timeout=read_timeout,
        first_byte_timeout=first_byte_timeout,
    )
    sessions = _Sessions(session)
    try:
        await _run_plan(plan, _Run(store, config, lock_timeout, sessions, stats, progress, health))
    finally:
        await sessions.close()
    links = {fp.slot: fp.link_path for fp in plan.files}
    return ResolvedCard(
        card=card.with_paths(lambda name, _: os.fspath(links[name])),
        local_dir=plan.link_dir,
        mdcsum=plan.mdcsum,
        files=tuple(links.values()),
    )
