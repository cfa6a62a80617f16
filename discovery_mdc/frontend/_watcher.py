"""ModelWatcher: the asyncio driver around the pure registry.

A :class:`~discovery_mdc.etcd.PrefixInformer` lists and watches the prefix (resume,
compaction relist, cheap reconcile, silent-watch restart) and yields batches of changes;
this driver applies each batch to the registry and runs what it asks for. Each admitted
(model, mdcsum) gets one verify-and-cache pipeline, bounded in concurrency and retried with
backoff, so a slow model never holds up events for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from pathlib import Path
from typing import Protocol, TypeVar

from discovery_mdc._backoff import Backoff
from discovery_mdc._clock import Clock, Sleep, every
from discovery_mdc._hf import HfEnv
from discovery_mdc._lifecycle import AsyncService, cancel_and_wait
from discovery_mdc.cache import (
    FetchConfig,
    MetadataCache,
    SourceHealth,
    http_source,
    refresh_last_used,
    resolve_cache_root,
)
from discovery_mdc.card import ModelDeploymentCard
from discovery_mdc.etcd import (
    DEFAULT_RECONCILE_INTERVAL,
    Change,
    ChangeBatch,
    PrefixInformer,
    Store,
    retry_until_reachable,
)
from discovery_mdc.frontend._metrics import FrontendMetrics
from discovery_mdc.frontend._prepare import check_json_files
from discovery_mdc.frontend._state import (
    EventKind,
    ModelEvent,
    ModelInfo,
    ModelStats,
    NamespaceFilter,
    Outcome,
    PipelineRequest,
    Registry,
)

__all__ = ["ModelWatcher", "PrepareHook", "Resolver", "default_frontend_id"]

log = logging.getLogger("discovery_mdc.frontend")

_T = TypeVar("_T")

#: ``prepare(resolved_card, local_dir)``; ``local_dir`` is None only for a legacy card used in
#: place whose files do not share a directory.
PrepareHook = Callable[[ModelDeploymentCard, Path | None], Awaitable[None]]

#: A dead replica should cost a failover little: connect attempts give up after this long,
#: a server that accepts and never answers (a tarpit, a frozen process) after the second, and
#: a body that stops flowing after the third.
FETCH_CONNECT_TIMEOUT = 3.0
FETCH_FIRST_BYTE_TIMEOUT = 3.0
FETCH_STALL_TIMEOUT = 10.0


class Resolved(Protocol):
    @property
    def card(self) -> ModelDeploymentCard: ...
    @property
    def local_dir(self) -> Path | None: ...


class Resolver(Protocol):
    def __call__(
        self, card: ModelDeploymentCard, *, alternates: dict[str, list[str]]
    ) -> Awaitable[Resolved]: ...


def default_frontend_id(cache_dir: str | Path | None) -> str:
    """This host's name and the cache root: stable across restarts, different for every
    frontend that does not share a cache (frontends sharing one fetch each blob once anyway)."""
    return f"{socket.gethostname()}:{os.fspath(resolve_cache_root(cache_dir))}"


class ModelWatcher(AsyncService):
    """Watches ``v1/mdc/`` and keeps a registry of ready models.

    Use as ``async with ModelWatcher(store, ...) as w:``; then ``w.models()``,
    ``async for event in w.events()`` and ``await w.wait_for_model(name, timeout)``.

    Every change to the watch state and the registry happens synchronously, with no ``await``
    in between, so a watch batch, a relist diff and a finished pipeline are each applied
    atomically and in the order they arrive.

    ``backoff_initial`` and ``backoff_max`` pace the retries of a failing pipeline; the
    etcd watch reconnects on the informer's own, shorter cap.

    With the default resolver, the watcher resolves cards into one
    :class:`~discovery_mdc.cache.MetadataCache` (:attr:`cache`) that it closes with itself, and
    every ``cache_upkeep_interval`` seconds (default: the reconcile interval, at most 60)
    :meth:`cache_upkeep` marks the cache directories of the served models as used and fetches
    again any that were removed from the cache. ``hf``: its Hugging Face settings for
    ``hf://`` slots (None: huggingface_hub's variables, read once when it is made).
    """

    def __init__(
        self,
        store: Store,
        *,
        namespace: str | None = None,
        namespace_prefix: str | None = None,
        cache_dir: str | Path | None = None,
        prepare: PrepareHook | None = check_json_files,
        resolver: Resolver | None = None,
        reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL,
        max_concurrent_pipelines: int = 8,
        max_concurrent_fetches: int = 64,
        max_fetches_per_source: int = 2,
        slow_pipeline_after: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        metrics: FrontendMetrics | None = None,
        frontend_id: str | None = None,
        cache_upkeep_interval: float | None = None,
        startup_timeout: float = 0.0,
        hf: HfEnv | None = None,
    ) -> None:
        self._filter = NamespaceFilter.create(namespace, namespace_prefix)
        self._registry = Registry(self._filter)
        self._informer = PrefixInformer(
            store,
            self._filter.etcd_prefix(),
            reconcile_interval=reconcile_interval,
            backoff_initial=backoff_initial,
            clock=clock,
            sleep=sleep,
        )
        self._prepare = prepare
        #: Spreads this frontend's metadata fetches over a model's replicas (see
        #: ``MetadataCache(spread=...)``).
        self.frontend_id = frontend_id or default_frontend_id(cache_dir)
        #: Metadata sources (``host:port``) backing off after failing (the default resolver).
        self.source_health = SourceHealth()
        self._cache, self._resolver = self._cache_and_resolver(cache_dir, resolver, hf)
        # Only cards this watcher cached itself (the default resolver) are kept up.
        self._by_slug = None if self._cache is None else self._cache.layout.by_slug
        self._upkeep_interval = _upkeep_interval(cache_upkeep_interval, reconcile_interval)
        self._startup_timeout = startup_timeout
        self._endpoints: tuple[str, ...] = tuple(getattr(store, "endpoints", ()))
        self._sem = asyncio.Semaphore(max_concurrent_pipelines)
        self._fetch_sem = asyncio.Semaphore(max_concurrent_fetches)
        self._per_source = _PerKey(max_fetches_per_source)
        self._slow_after = slow_pipeline_after
        self._backoff = (backoff_initial, backoff_max)
        self._sleep = sleep
        self.metrics = self._attach_metrics(metrics or FrontendMetrics())
        self._pipelines: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._subscribers: list[asyncio.Queue[ModelEvent | None]] = []
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def _cache_and_resolver(
        self, cache_dir: str | Path | None, resolver: Resolver | None, hf: HfEnv | None
    ) -> tuple[MetadataCache | None, Resolver]:
        """A custom resolver, or the default: this watcher's own cache, with short timeouts
        (a dead replica should cost a failover little), its spread and its source health."""
        if resolver is not None:
            return None, resolver
        fetch = FetchConfig(
            connect_timeout=FETCH_CONNECT_TIMEOUT,
            first_byte_timeout=FETCH_FIRST_BYTE_TIMEOUT,
            read_timeout=FETCH_STALL_TIMEOUT,
        )
        cache = MetadataCache(
            cache_dir, fetch=fetch, spread=self.frontend_id, health=self.source_health, hf=hf
        )
        return cache, cache.resolve

    def _attach_metrics(self, metrics: FrontendMetrics) -> FrontendMetrics:
        metrics.attach(self._informer)
        metrics.track_models(self._registry.model_stats)
        if self._cache is not None:
            metrics.attach_cache(self._cache.stats)
        return metrics

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """List the prefix once, apply it, then watch in the background. While etcd is
        unreachable the first listing is retried for up to ``startup_timeout`` seconds; then it
        raises."""
        await retry_until_reachable(
            self._informer.start,
            timeout=self._startup_timeout,
            what=f"the first listing of {self._filter.etcd_prefix()}",
            endpoints=self._endpoints,
            sleep=self._sleep,
        )
        self._apply_queued()
        self._tasks.append(asyncio.create_task(self._consume(), name="mdc-apply"))
        if self._by_slug is not None and self._upkeep_interval > 0:
            self._tasks.append(asyncio.create_task(self._upkeep_loop(), name="mdc-cache-upkeep"))

    async def close(self) -> None:
        """Stop watching, cancel the pipelines and end every ``events()`` stream."""
        self._closed = True
        await self._informer.close()
        await cancel_and_wait(*self._tasks, *self._pipelines.values())
        self._tasks.clear()
        self._pipelines.clear()
        if self._cache is not None:
            await self._cache.close()
        for queue in self._subscribers:
            queue.put_nowait(None)

    @property
    def connected(self) -> bool:
        """True while the etcd watch stream is open."""
        return self._informer.connected

    @property
    def cache(self) -> MetadataCache | None:
        """The metadata cache the default resolver fetches into, kept for the watcher's
        lifetime and closed with it (None with a custom ``resolver``)."""
        return self._cache

    @property
    def informer(self) -> PrefixInformer:
        """The prefix informer feeding this watcher (revision, stats, on-demand checks)."""
        return self._informer

    # ------------------------------------------------------------------ queries

    def models(self) -> list[ModelInfo]:
        """A snapshot of the ready models."""
        return self._registry.ready_models()

    def model(self, name: str) -> ModelInfo | None:
        """One ready model, or None."""
        return self._registry.model(name)

    def model_stats(self) -> list[ModelStats]:
        """Counts for every known model, ready or not (readiness and per-model metrics)."""
        return self._registry.model_stats()

    def instance_keys(self) -> set[str]:
        """Keys of every admitted instance (ready or still being prepared)."""
        return self._registry.instance_keys()

    def rejected_keys(self) -> set[str]:
        """Keys of instances rejected by mdcsum, or because ``/v1/models/{id}`` could not
        serve their model id (and not admitted since)."""
        return self._registry.rejected_keys()

    @property
    def revision(self) -> int:
        """The highest etcd revision seen; a resumed watch starts after it."""
        return self._informer.revision

    def events(self) -> AsyncIterator[ModelEvent]:
        """Added / Updated / Removed / Rejected events from the moment of this call on.

        The stream ends when the watcher closes. Subscribing happens here, not at the first
        ``__anext__``, so nothing between the call and the loop is missed.
        """
        queue: asyncio.Queue[ModelEvent | None] = asyncio.Queue()
        self._subscribers.append(queue)
        if self._closed:
            queue.put_nowait(None)
        stream = self._drain(queue)
        # A stream dropped without being closed must not keep collecting events.
        weakref.finalize(stream, self._unsubscribe, queue)
        return stream

    async def _drain(self, queue: asyncio.Queue[ModelEvent | None]) -> AsyncIterator[ModelEvent]:
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._unsubscribe(queue)

    def _unsubscribe(self, queue: asyncio.Queue[ModelEvent | None]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(queue)

    async def wait_for_model(self, name: str, timeout: float | None = None) -> ModelInfo:  # noqa: ASYNC109
        """Wait until ``name`` is ready; raises ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while (info := self._registry.model(name)) is None:
                await self._changed.wait()
            return info

    # ------------------------------------------------------------------ changes

    async def _consume(self) -> None:
        async for batch in self._informer.batches():
            self._apply_batch(batch)

    def _apply_queued(self) -> None:
        for batch in self._informer.drain():
            self._apply_batch(batch)

    def _apply_batch(self, batch: ChangeBatch) -> None:
        now = int(time.time())
        for change in batch.changes:
            self._apply(change, now)
        self._settled()

    def _apply(self, change: Change, now: int) -> None:
        # One change failing must not stop the ones after it: the informer already counts
        # them as applied, so an abort here would lose them for good.
        try:
            self._handle(self._registry.apply(change, now), settle=False)
        except Exception:
            log.exception("could not apply %s of %s", change.kind.value, change.key)
            self.metrics.malformed.inc()

    async def reconcile(self) -> str:
        """Check the registry against etcd now and repair drift (the periodic reconcile, on
        demand); the outcome is the informer's."""
        outcome = await self._informer.reconcile()
        self._apply_queued()
        return outcome

    async def relist(self) -> int:
        """Relist the prefix now and apply the diff; returns the number of changes."""
        changes = await self._informer.relist("reconcile")
        self._apply_queued()
        return changes

    # ------------------------------------------------------------------ cache upkeep

    async def _upkeep_loop(self) -> None:
        def failed(exc: Exception) -> None:
            log.warning("cache upkeep failed: %s", exc)

        await every(self._upkeep_interval, self._sleep, self.cache_upkeep, failed)

    async def cache_upkeep(self) -> None:
        """Mark the cache directory of every model this watcher serves as used (so ``cache
        prune --older-than`` keeps it), and fetch again the files of any that someone removed
        (``cache rm``, ``cache verify --fix``) while it is still served."""
        by_slug = self._by_slug
        if by_slug is None:
            return
        served = [
            (m.name, ws.mdcsum, [Path(f) for f in ws.files])
            for m in self._registry.ready_models()
            for ws in m.worker_sets
            if ws.ready and ws.local_dir is not None and ws.local_dir.parent.parent == by_slug
        ]
        intact = await asyncio.to_thread(
            lambda: [refresh_last_used(files) for _, _, files in served]
        )
        for (name, sum_, _), ok in zip(served, intact, strict=True):
            sources = None if ok else self._registry.sources(name, sum_, waiting_only=False)
            if sources is None:
                continue
            log.warning(
                "cached files of model %r (mdcsum %s) were removed while it is served; "
                "fetching them again",
                name,
                sum_[:12],
            )
            card, alternates = sources
            try:
                await self._resolver(card, alternates=alternates)
            except Exception as exc:
                log.error("could not fetch model %r (mdcsum %s) again: %s", name, sum_[:12], exc)

    # ------------------------------------------------------------------ apply

    def _handle(self, out: Outcome, *, settle: bool = True) -> None:
        if out.malformed:
            self.metrics.malformed.inc()
        for ident in out.cancelled:
            task = self._pipelines.pop(ident, None)
            if task is not None:
                task.cancel()
        for req in out.pipelines:
            self._start_pipeline(req)
        for event in out.events:
            if event.kind is EventKind.REJECTED:
                self.metrics.rejected.labels(event.model).inc()
            for queue in self._subscribers:
                queue.put_nowait(event)
        if settle:
            self._settled()

    def _settled(self) -> None:
        """After a batch: refresh the gauges and wake ``wait_for_model``."""
        ready, admitted = self._registry.counts()
        self.metrics.models.set(ready)
        self.metrics.instances.set(admitted)
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ pipelines

    def _start_pipeline(self, req: PipelineRequest) -> None:
        ident = (req.model, req.mdcsum)
        task = self._pipelines.get(ident)
        if task is None or task.done():
            self._pipelines[ident] = asyncio.create_task(
                self._run_pipeline(req, time.monotonic()),
                name=f"mdc-pipeline-{req.model}-{req.mdcsum[:12]}",
            )

    async def _attempt(self, req: PipelineRequest) -> Resolved | None:
        """Fetch, verify and prepare once; None if no instance waits for this pipeline any
        more.

        Fetching waits on the network, so it has its own, wider limit, and at most
        ``max_fetches_per_source`` pipelines fetch from the same sources at once: cards on a
        host that accepts connections and never answers queue behind each other, not in
        front of other models (and fail at once while that host is backing off, see
        ``SourceHealth``). The prepare hook is CPU work, bounded by
        ``max_concurrent_pipelines``.
        """
        # Replicas that joined (or left) since the last attempt count now.
        sources = self._registry.sources(req.model, req.mdcsum)
        if sources is None:
            return None
        card, alternates = sources
        label = f"pipeline of {req.model!r} ({req.mdcsum[:12]})"
        async with self._per_source.hold(_source_key(alternates)):
            resolved = await self._bounded(
                self._fetch_sem, lambda: self._resolver(card, alternates=alternates), label
            )
        prepare = self._prepare
        if prepare is not None:
            await self._bounded(
                self._sem, lambda: prepare(resolved.card, resolved.local_dir), label
            )
        return resolved

    async def _bounded(
        self,
        sem: asyncio.Semaphore,
        attempt: Callable[[], Awaitable[_T]],
        label: str,
    ) -> _T:
        """Run ``attempt()`` holding a permit of ``sem``. An attempt still running after
        ``slow_pipeline_after`` seconds gives its permit back, so a few stuck models (an
        unreachable worker, a huge tokenizer) cannot keep every other model from loading."""
        await sem.acquire()
        held = True
        task = asyncio.ensure_future(attempt())
        try:
            done, _ = await asyncio.wait({task}, timeout=self._slow_after)
            if not done:
                log.warning(
                    "%s still running after %.1fs; letting other pipelines start",
                    label,
                    self._slow_after,
                )
                sem.release()
                held = False
            return await task
        finally:
            if held:
                sem.release()
            if not task.done():
                await cancel_and_wait(task)

    async def _run_pipeline(self, req: PipelineRequest, seen: float) -> None:
        ident = (req.model, req.mdcsum)
        backoff = Backoff(*self._backoff)
        try:
            while True:
                try:
                    resolved = await self._attempt(req)
                    if resolved is None:
                        return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.metrics.pipelines.labels("failed").inc()
                    delay = backoff.next_delay()
                    log.error(
                        "model %r (mdcsum %s) not ready: %s: %s; retrying in %.1fs",
                        req.model,
                        req.mdcsum,
                        type(exc).__name__,
                        exc,
                        delay,
                        extra={"model": req.model, "mdcsum": req.mdcsum, "reason": str(exc)},
                    )
                    await self._sleep(delay)
                    continue
                self.metrics.pipelines.labels("ok").inc()
                self.metrics.pipeline_seconds.observe(time.monotonic() - seen)
                self._handle(
                    self._registry.pipeline_done(
                        req.model, req.mdcsum, resolved.card, resolved.local_dir, int(time.time())
                    )
                )
                return
        finally:
            if self._pipelines.get(ident) is asyncio.current_task():
                del self._pipelines[ident]
                # However it ended (say, a CancelledError out of something it awaited, though
                # nobody cancelled it), an instance still waiting must not be left without a
                # pipeline.
                if not self._closed and self._registry.pending(*ident):
                    self._start_pipeline(req)


def _upkeep_interval(given: float | None, reconcile_interval: float) -> float:
    """``given``, else the reconcile interval, at most 60 s (60 s without reconciles)."""
    if given is not None:
        return given
    return min(reconcile_interval, 60.0) if reconcile_interval > 0 else 60.0


def _source_key(alternates: dict[str, list[str]]) -> frozenset[str] | None:
    """The ``host:port`` sources a pipeline fetches from (None: none over http)."""
    hosts = frozenset(
        host for uris in alternates.values() for uri in uris if (host := http_source(uri))
    )
    return hosts or None


class _PerKey:
    """At most ``limit`` holders per key at once (a key is forgotten when nobody holds it or
    waits for it)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._sems: dict[Hashable, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable | None) -> AsyncIterator[None]:
        if key is None:
            yield
            return
        sem, users = self._sems.get(key, (None, 0))
        if sem is None:
            sem = asyncio.Semaphore(self._limit)
        self._sems[key] = (sem, users + 1)
        try:
            async with sem:
                yield
        finally:
            users = self._sems[key][1] - 1
            if users:
                self._sems[key] = (sem, users)
            else:
                del self._sems[key]
