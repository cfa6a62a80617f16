"""The verify-and-cache pipeline: point every slot of a card at a verified local file.

A :class:`MetadataCache` is one cache root and what every resolution into it shares; a
``_Run`` is one resolution (one card, one progress callback) through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from discovery_mdc._hf import HfEnv, hf_or_environment
from discovery_mdc._lifecycle import AsyncService
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
    "MetadataCache",
    "ProgressCallback",
    "ResolvedCard",
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
#: How many other hosts one fetch tries at once when its own sources failed.
_MAX_RACE = 32


@dataclass(slots=True)
class CacheStats:
    """Counters for metrics; read the attributes at any time. ``repairs`` counts corrupt
    blobs found in the cache and fetched again; ``fetch_seconds`` holds the duration of every
    successful blob fetch (all its attempts)."""

    bytes_fetched: int = 0
    fetches: int = 0
    hits: int = 0
    failures: int = 0
    repairs: int = 0
    by_source: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(source, "ok" | "failed" | "skipped") -> fetch attempts; the source is ``host:port``
    for http(s)."""
    fetch_seconds: Durations = field(default_factory=Durations)


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


# --------------------------------------------------------------------------- shared work


class _Flight:
    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task
        self.waiters = 0


def _retrieve(task: asyncio.Task[None]) -> None:
    # Mark the exception as retrieved: if every waiter was cancelled nobody else will.
    if not task.cancelled():
        task.exception()


class _Flights:
    """Single-flight: one run of the work per key at a time; concurrent callers join it."""

    def __init__(self) -> None:
        self._table: dict[Hashable, _Flight] = {}

    async def run(self, key: Hashable, make: Callable[[], Awaitable[None]]) -> None:
        """Run ``make()``, or join the run of ``key`` already going."""
        loop = asyncio.get_running_loop()
        flight = self._table.get(key)
        if flight is None or flight.task.get_loop() is not loop:
            flight = self._start(key, loop, make)
        flight.waiters += 1
        try:
            await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            if flight.waiters == 1 and not flight.task.done():
                # The last waiter is gone: stop the work, and let it clean up (temp file,
                # lock) before reporting the cancellation. Unlisted first, so a caller arriving
                # during the clean-up starts a fresh flight instead of joining a cancelled one.
                self._forget(key, flight)
                flight.task.cancel()
                await asyncio.wait({flight.task})
            raise
        finally:
            flight.waiters -= 1

    def _start(
        self, key: Hashable, loop: asyncio.AbstractEventLoop, make: Callable[[], Awaitable[None]]
    ) -> _Flight:
        async def run() -> None:
            await make()

        flight = self._table[key] = _Flight(loop.create_task(run()))

        def done(task: asyncio.Task[None]) -> None:
            self._forget(key, flight)
            _retrieve(task)

        flight.task.add_done_callback(done)
        return flight

    def _forget(self, key: Hashable, flight: _Flight) -> None:
        if self._table.get(key) is flight:
            del self._table[key]


class _Wanted:
    """Per blob, the http(s) URIs that callers waiting for it know, with how many of them
    know each; most recently added last."""

    def __init__(self) -> None:
        self._table: dict[str, dict[str, int]] = {}

    @contextlib.contextmanager
    def wanting(self, hexdigest: str, uris: Sequence[str]) -> Iterator[None]:
        """While inside, ``uris`` (the http(s) ones) count as sources of the blob for others."""
        mine = [u for u in uris if http_source(u) is not None]
        entry = self._table.setdefault(hexdigest, {})
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
            if not entry and self._table.get(hexdigest) is entry:
                del self._table[hexdigest]

    def known_elsewhere(self, hexdigest: str, exclude: Sequence[str]) -> list[str]:
        """URIs of the blob other waiting callers know, most recent first."""
        entry = self._table.get(hexdigest, {})
        return [u for u in reversed(entry) if u not in exclude]


# --------------------------------------------------------------------------- the cache


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
        own, self._own = self._own, None
        if own is not None:
            await own.close()


class MetadataCache(AsyncService):
    """A metadata cache under one root, and what every resolution into it shares.

    That is one HTTP session (made on first use; closed by :meth:`close` unless ``session``
    was given), the fetch limits (``fetch``, ``lock_timeout``), the counters (:attr:`stats`),
    the memo of blobs already verified, one fetch of a blob at a time, and the sources other
    waiting callers know (a card whose own hosts fail takes a shared file from theirs). Use it
    as ``async with MetadataCache(cache_dir) as cache:``, from one event loop;
    :class:`~discovery_mdc.frontend.ModelWatcher` keeps one for its lifetime.

    ``cache_dir`` defaults to ``$HOME/.cache/dynamo/mdc``. With ``spread`` (a frontend's id),
    each card's http(s) sources are tried in the order
    :func:`~discovery_mdc.cache.spread_sources` picks, so one frontend's GETs and a fleet's
    spread evenly over the replicas and each frontend still makes one GET per blob. With
    ``health``, transport failures are remembered per ``host:port``: a source backing off is
    tried after the others, and not at all until its time is up (see :class:`SourceHealth`),
    so a card on an unresponsive host fails at once instead of waiting out the timeouts again.
    ``hf``: the Hugging Face settings for ``hf://`` sources; None reads huggingface_hub's
    variables once, here (:func:`~discovery_mdc._hf.hf_or_environment`).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        fetch: FetchConfig | None = None,
        lock_timeout: float = 600.0,
        session: aiohttp.ClientSession | None = None,
        stats: CacheStats | None = None,
        spread: str | None = None,
        health: SourceHealth | None = None,
        hf: HfEnv | None = None,
    ) -> None:
        self.layout = CacheLayout(resolve_cache_root(cache_dir))
        self.fetch = FetchConfig() if fetch is None else fetch
        self.lock_timeout = lock_timeout
        self.stats = CacheStats() if stats is None else stats
        self.spread = spread
        self.health = health
        self._store = BlobStore(self.layout)
        self._sessions = _Sessions(session)
        self._hf = hf_or_environment(hf)
        self._flights = _Flights()
        self._wanted = _Wanted()

    async def close(self) -> None:
        """Close the HTTP session this cache made (a given one stays open)."""
        await self._sessions.close()

    def forget_verified(self) -> None:
        """Forget which blobs were verified (after editing the cache out of band): the next
        resolve of each hashes it again."""
        self._store.memo.clear()

    async def resolve(
        self,
        card: ModelDeploymentCard,
        *,
        alternates: Mapping[str, Sequence[str]] | None = None,
        progress: ProgressCallback | None = None,
    ) -> ResolvedCard:
        """Return ``card`` with every slot pointing at a verified local file.

        New-format cards go through the cache: each file is fetched from its URI (then each of
        ``alternates[hex]``), verified against blake3 and size, published to ``blobs/<hex>``
        and linked at ``by-slug/<slug>/<mdcsum>/<filename>``. A legacy card whose files all
        exist locally is used in place; otherwise each file is fetched from
        ``hf://<source_path>/<file>`` and verified against its checksum.

        Raises :class:`CardError` (unsafe names), :class:`SizeLimitError`,
        :class:`ChecksumMismatchError`, :class:`FetchError` (:class:`AllSourcesFailedError`
        when several URIs were tried; :class:`SourceUnreachableError` for a source that did
        not connect or answer within the connect / first-byte timeouts, or stalled) or
        :class:`CacheError` (:class:`LockTimeoutError`, disk full).
        """
        hf_fallback = False
        if not is_new_format(card):
            in_place = await self._in_place(card)
            if in_place is not None:
                return in_place
            hf_fallback = True
            log.info(
                "legacy card %r: metadata files are not all local; fetching from hf://%s",
                card.display_name,
                card.source_path,
            )
        plan = plan_card(
            card, self.layout, alternates=alternates, hf_fallback=hf_fallback, spread=self.spread
        )
        self._store.ensure_dirs()
        await _Run(self, progress).card(plan)
        links = {fp.slot: fp.link_path for fp in plan.files}
        return ResolvedCard(
            card=card.with_paths(lambda name, _: os.fspath(links[name])),
            local_dir=plan.link_dir,
            mdcsum=plan.mdcsum,
            files=tuple(links.values()),
        )

    async def _in_place(self, card: ModelDeploymentCard) -> ResolvedCard | None:
        """A legacy card whose files all exist locally, verified against its checksums."""
        local = _existing_local_files(card)
        if local is None:
            return None
        for name, f in card.files():
            state = await verify_file(
                Path(local[name]), f.checksum.hex, memo=self._store.memo, foreign=True
            )
            if state.size is None or (f.size is not None and state.size != f.size):
                self.stats.failures += 1
                raise ChecksumMismatchError(
                    f.path,
                    _describe(f.checksum.hex, f.size),
                    _describe(state.actual or "?", state.size),
                )
        files = tuple(Path(p) for p in local.values())
        parents = {f.parent for f in files}
        self.stats.hits += len(files)
        return ResolvedCard(
            card=card.with_paths(lambda name, _: local[name]),
            local_dir=parents.pop() if len(parents) == 1 else None,
            mdcsum=mdcsum(card),
            in_place=True,
            files=files,
        )


def _existing_local_files(card: ModelDeploymentCard) -> dict[str, str] | None:
    """Each slot's absolute local path, or ``None`` unless every slot is an existing file."""
    paths = {name: local_path_of(f.path) for name, f in card.files()}
    local = {name: os.path.abspath(p) for name, p in paths.items() if p is not None}
    if len(local) != len(paths) or not all(os.path.isfile(p) for p in local.values()):
        return None
    return local


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
    hf: HfEnv | None = None,
) -> ResolvedCard:
    """Resolve one card (:meth:`MetadataCache.resolve`) with a :class:`MetadataCache` of its
    own, closed on return: for one-off use. Callers that resolve many cards, or several at
    once, share a session, the verification memo and the fetches through one
    :class:`MetadataCache` instead."""
    fetch = FetchConfig(
        connect_timeout=connect_timeout,
        total_timeout=total_timeout,
        read_timeout=read_timeout,
        first_byte_timeout=first_byte_timeout,
    )
    async with MetadataCache(
        cache_dir,
        fetch=fetch,
        lock_timeout=lock_timeout,
        session=session,
        stats=stats,
        spread=spread,
        health=health,
        hf=hf,
    ) as cache:
        return await cache.resolve(card, alternates=alternates, progress=progress)


# --------------------------------------------------------------------------- one resolution


class _DirGone(Exception):
    """A published card directory vanished while it was being repaired in place."""


class _Run:
    """One resolution through ``cache``: make a card's directory complete and verified."""

    def __init__(self, cache: MetadataCache, progress: ProgressCallback | None) -> None:
        self.cache = cache
        self.store = cache._store
        self.stats = cache.stats
        self.health = cache.health
        self.progress = progress

    async def card(self, plan: CardPlan) -> None:
        """Make ``plan.link_dir`` a complete, verified card directory.

        A published directory is checked (and repaired) in place. Otherwise the card is staged
        and renamed into place, so ``by-slug/`` only ever holds complete cards: a card whose
        files never verify leaves nothing there. Concurrent callers share one staging.
        """
        for _ in range(_PUBLISH_ATTEMPTS):
            if plan.link_dir.is_dir():
                try:
                    await self._ensure_all(plan.files, in_place=True)
                except _DirGone:
                    log.info("%s was removed while in use; staging it again", plan.link_dir)
                    continue
                refresh_last_used(fp.link_path for fp in plan.files)
                return
            published: list[bool] = []

            async def attempt(published: list[bool] = published) -> None:
                published.append(await self._stage_and_publish(plan))

            # Concurrent callers join one staging; a joiner (or the loser of a race with
            # another process) goes round again and finds the published directory.
            await self.cache._flights.run(("card", os.fspath(plan.link_dir)), attempt)
            if published == [True]:
                return
        raise CacheError(
            f"{plan.link_dir} kept vanishing while it was being published (is something "
            "deleting the cache in a loop?)"
        )

    async def _stage_and_publish(self, plan: CardPlan) -> bool:
        """Link every file in a staging directory, then rename it onto the card directory.
        False when another process published the card first."""
        staging = self.store.stage_dir(plan.link_dir)
        try:
            files = [dataclasses.replace(fp, link_path=staging / fp.filename) for fp in plan.files]
            await self._ensure_all(files, in_place=False)
            return self.store.publish_dir(staging, plan.link_dir)
        finally:
            remove_link_dir(staging)  # gone already once published; never half a card left

    async def _ensure_all(self, files: Sequence[FilePlan], *, in_place: bool) -> None:
        results = await asyncio.gather(
            *(self._ensure_file(fp, in_place=in_place) for fp in files), return_exceptions=True
        )
        gone = [r for r in results if isinstance(r, _DirGone)]
        if gone:
            raise gone[0]
        for fp, result in zip(files, results, strict=True):
            if isinstance(result, BaseException):
                self.stats.failures += 1
                if isinstance(result, Exception):
                    log.error("cannot cache %s of card slot %s: %s", fp.filename, fp.slot, result)
                raise result

    async def _ensure_file(self, fp: FilePlan, *, in_place: bool) -> None:
        """Make ``fp.link_path`` point at a verified blob; concurrent callers share one run.

        ``in_place`` repairs a published card directory: it is never re-created, and
        :class:`_DirGone` says it vanished (a prune or ``cache rm`` took it).
        """
        with self.cache._wanted.wanting(fp.hex, fp.uris):
            key = ("file", fp.hex, fp.size, os.fspath(fp.link_path))
            await self.cache._flights.run(key, lambda: self._link(fp, in_place))

    async def _link(self, fp: FilePlan, in_place: bool) -> None:
        # Warm path, no lock: the link is already right and the blob verifies.
        if self.store.links_to(fp.hex, fp.link_path):
            state = await self.store.check(fp.hex)
            if state.size is not None:
                self._check_size(fp, state.size)
                self.stats.hits += 1
                return
        # Links are only created under the blob lock, so prune (which deletes an unreferenced
        # blob only while holding its lock) can never leave a link without its blob.
        async with self.store.lock(fp.hex, self.cache.lock_timeout):
            state = await self.store.check(fp.hex)
            if state.size is not None:
                self.stats.hits += 1
                size = state.size
            else:
                if state.corrupt:
                    log.warning("replacing corrupt blob %s", fp.blob_path)
                    self.store.remove(fp.hex)
                    self.stats.repairs += 1
                size = await self._fetch(fp)
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

    async def _fetch(self, fp: FilePlan) -> int:
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
            for u in self.cache._wanted.known_elsewhere(fp.hex, uris)
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
            session = self.cache._sessions.get() if _needs_session(uri) else None
            await fetch_uri(
                uri, staging, fp.cap, session=session, config=self.cache.fetch, hf=self.cache._hf
            )
            answered = True
            actual = staging.hexdigest()
            if actual != fp.hex or (fp.size is not None and staging.received != fp.size):
                raise ChecksumMismatchError(
                    uri, _describe(fp.hex, fp.size), _describe(actual, staging.received)
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


def _needs_session(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https", "hf")


def _describe(hexdigest: str, size: int | None) -> str:
    return f"blake3:{hexdigest}" + (f" ({size} bytes)" if size is not None else "")
