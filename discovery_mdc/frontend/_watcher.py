"""ModelWatcher: the asyncio driver around the pure registry.

List, then watch from the listed revision + 1; resume from the highest revision seen after a
disconnect; relist and diff after compaction and on a periodic reconcile. Each admitted
(model, mdcsum) gets one verify-and-cache pipeline, bounded in concurrency and retried with
backoff, so a slow model never holds up events for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

from discovery_mdc._backoff import Backoff
from discovery_mdc._lifecycle import AsyncService
from discovery_mdc.cache import refresh_last_used
from discovery_mdc.card import ModelDeploymentCard
from discovery_mdc.errors import EtcdCompactedError, EtcdError
from discovery_mdc.etcd import Store, WatchResponse, retry_until_reachable
from discovery_mdc.frontend._metrics import FrontendMetrics
from discovery_mdc.frontend._prepare import check_json_files
from discovery_mdc.frontend._state import (
    Change,
    EventKind,
    ModelEvent,
    ModelInfo,
    ModelStats,
    NamespaceFilter,
    Outcome,
    PipelineRequest,
    Registry,
    WatchState,
)

__all__ = ["ModelWatcher", "PrepareHook", "Resolver"]

log = logging.getLogger("discovery_mdc.frontend")

_T = TypeVar("_T")

#: ``prepare(resolved_card, local_dir)``; ``local_dir`` is None only for a legacy card used in
#: place whose files do not share a directory.
PrepareHook = Callable[[ModelDeploymentCard, Path | None], Awaitable[None]]


class Resolved(Protocol):
    @property
    def card(self) -> ModelDeploymentCard: ...
    @property
    def local_dir(self) -> Path | None: ...


class Resolver(Protocol):
    def __call__(
        self, card: ModelDeploymentCard, *, alternates: dict[str, list[str]]
    ) -> Awaitable[Resolved]: ...


class ModelWatcher(AsyncService):
    """Watches ``v1/mdc/`` and keeps a registry of ready models.

    Use as ``async with ModelWatcher(store, ...) as w:``; then ``w.models()``,
    ``async for event in w.events()`` and ``await w.wait_for_model(name, timeout)``.

    Every change to the watch state and the registry happens synchronously, with no ``await``
    in between, so a watch batch, a relist diff and a finished pipeline are each applied
    atomically and in the order they arrive.

    With the default resolver, every ``cache_upkeep_interval`` seconds (default: the reconcile
    interval, at most 60) :meth:`cache_upkeep` marks the cache directories of the served models
    as used and fetches again any that were removed from the cache.
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
        reconcile_interval: float = 30.0,
        max_concurrent_pipelines: int = 8,
        slow_pipeline_after: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: FrontendMetrics | None = None,
        cache_upkeep_interval: float | None = None,
        startup_timeout: float = 0.0,
    ) -> None:
        self._store = store
        self._filter = NamespaceFilter.create(namespace, namespace_prefix)
        self._prefix = self._filter.etcd_prefix()
        self._registry = Registry(self._filter)
        self._state = WatchState()
        self._prepare = prepare
        self._resolver = resolver or _cache_resolver(cache_dir)
        # Only cards this watcher cached itself (the default resolver) are kept up.
        self._by_slug = None if resolver is not None else _cache_by_slug(cache_dir)
        if cache_upkeep_interval is None:
            cache_upkeep_interval = (
                min(reconcile_interval, 60.0) if reconcile_interval > 0 else 60.0
            )
        self._upkeep_interval = cache_upkeep_interval
        self._reconcile_interval = reconcile_interval
        self._startup_timeout = startup_timeout
        self._sem = asyncio.Semaphore(max_concurrent_pipelines)
        self._slow_after = slow_pipeline_after
        self._backoff = (backoff_initial, backoff_max)
        self._sleep = sleep
        self.metrics = metrics or FrontendMetrics()
        self.metrics.track_models(self._registry.model_stats)
        self._pipelines: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._subscribers: list[asyncio.Queue[ModelEvent | None]] = []
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._watch_task: asyncio.Task[None] | None = None
        self._responses = 0  # watch responses received, to tell a silent watch from a live one
        self.connected = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """List the prefix once, then watch in the background. While etcd is unreachable the
        first listing is retried for up to ``startup_timeout`` seconds; then it raises."""
        await retry_until_reachable(
            lambda: self._relist("start"),
            timeout=self._startup_timeout,
            what=f"the first listing of {self._prefix}",
            endpoints=getattr(self._store, "endpoints", ()),
            sleep=self._sleep,
        )
        self._start_watch()
        if self._reconcile_interval > 0:
            self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="mdc-reconcile"))
        if self._by_slug is not None and self._upkeep_interval > 0:
            self._tasks.append(asyncio.create_task(self._upkeep_loop(), name="mdc-cache-upkeep"))

    async def close(self) -> None:
        """Stop watching, cancel the pipelines and end every ``events()`` stream."""
        self._closed = True
        tasks = [*self._tasks, *self._pipelines.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._pipelines.clear()
        self.connected = False
        for queue in self._subscribers:
            queue.put_nowait(None)

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
        """Keys of instances rejected by mdcsum (and not admitted since)."""
        return self._registry.rejected_keys()

    @property
    def revision(self) -> int:
        """The highest etcd revision seen; a resumed watch starts after it."""
        return self._state.revision

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

    # ------------------------------------------------------------------ watch

    def _start_watch(self) -> None:
        self._watch_task = asyncio.create_task(self._watch_loop(), name="mdc-watch")
        self._tasks.append(self._watch_task)

    def _restart_watch(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._tasks.remove(self._watch_task)
        self.connected = False
        self.metrics.reconnects.inc()
        self._start_watch()

    async def _watch_loop(self) -> None:
        backoff = Backoff(*self._backoff)
        while True:
            try:
                start = self._state.revision + 1
                stream = self._store.watch(
                    self._prefix,
                    prefix=True,
                    start_revision=start,
                    prev_kv=True,
                    progress_notify=True,
                )
                async for resp in stream:
                    if not self.connected:
                        log.info("watching %s from revision %d", self._prefix, start)
                        self.connected = True
                    backoff.reset()
                    self._responses += 1
                    self._on_watch_response(resp)
                raise EtcdError(f"watch on {self._prefix} ended")
            except asyncio.CancelledError:
                raise
            except EtcdCompactedError as exc:
                log.warning(
                    "watch on %s from revision %d hit compaction at revision %d; relisting",
                    self._prefix,
                    self._state.revision + 1,
                    exc.compact_revision,
                )
                await self._relist_with_retry("compaction", backoff)
            except Exception as exc:
                self.connected = False
                self.metrics.reconnects.inc()
                delay = backoff.next_delay()
                log.warning(
                    "watch on %s lost (%s); resuming from revision %d in %.1fs",
                    self._prefix,
                    exc,
                    self._state.revision + 1,
                    delay,
                )
                await self._sleep(delay)

    def _on_watch_response(self, resp: WatchResponse) -> None:
        now = int(time.time())
        for ev in resp.events:
            self.metrics.events.labels(ev.type.lower()).inc()
            if ev.type == "PUT":
                change = self._state.on_put(ev.kv.key, ev.kv.value, ev.kv.mod_revision)
            else:
                change = self._state.on_delete(ev.kv.key, ev.kv.mod_revision)
            if change is not None:
                self._apply(change, now)
        self._state.observe_revision(resp.header_revision)

    async def _relist_with_retry(self, reason: str, backoff: Backoff) -> None:
        while True:
            try:
                await self._relist(reason)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected = False
                delay = backoff.next_delay()
                log.warning("relist of %s failed (%s); retrying in %.1fs", self._prefix, exc, delay)
                await self._sleep(delay)

    async def _relist(self, reason: str) -> int:
        result = await self._store.range_prefix_all(self._prefix)
        snapshot = {kv.key: (kv.value, kv.mod_revision) for kv in result.kvs}
        self.metrics.relists.labels(reason).inc()
        changes = self._state.diff(snapshot, result.revision)
        if changes:
            log.info(
                "relist (%s) of %s at revision %d: %d change(s)",
                reason,
                self._prefix,
                result.revision,
                len(changes),
            )
        now = int(time.time())
        for change in changes:
            self._apply(change, now)
        return len(changes)

    def _apply(self, change: Change, now: int) -> None:
        # One change failing must not stop the ones after it: the watch state already
        # counts them as applied, so an abort here would lose them for good.
        try:
            self._handle(self._registry.apply(change, now))
        except Exception:
            log.exception("could not apply %s of %s", change.kind.value, change.key)
            self.metrics.malformed.inc()

    async def _reconcile_loop(self) -> None:
        while True:
            responses = self._responses
            await self._sleep(self._reconcile_interval)
            try:
                drift = await self._relist("reconcile")
                if drift and self._responses == responses and self.connected:
                    # etcd changed but the watch said nothing for a whole interval: it is
                    # likely a half-open connection (the gateway watch has no read timeout).
                    log.warning(
                        "reconcile of %s found %d change(s) the watch never delivered; "
                        "restarting the watch",
                        self._prefix,
                        drift,
                    )
                    self._restart_watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("periodic reconcile of %s failed: %s", self._prefix, exc)

    async def reconcile(self) -> None:
        """Relist now and apply the diff (the periodic reconcile, on demand)."""
        await self._relist("reconcile")

    # ------------------------------------------------------------------ cache upkeep

    async def _upkeep_loop(self) -> None:
        while True:
            await self._sleep(self._upkeep_interval)
            try:
                await self.cache_upkeep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cache upkeep failed: %s", exc)

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
            sources = None if ok else self._sources(name, sum_, waiting_only=False)
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

    def _handle(self, out: Outcome) -> None:
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

    def _sources(
        self, model: str, sum_: str, *, waiting_only: bool = True
    ) -> tuple[ModelDeploymentCard, dict[str, list[str]]] | None:
        """The card of one waiting instance (any instance unless ``waiting_only``) and every
        such replica's URI for each blob, or None when there is none."""
        waiting = [
            i for i in self._registry.instances_for(model, sum_) if not (i.ready and waiting_only)
        ]
        if not waiting:
            return None
        alternates: dict[str, list[str]] = {}
        for inst in waiting:
            for _, f in inst.envelope.card.files():
                uris = alternates.setdefault(f.checksum.hex, [])
                if f.path not in uris:
                    uris.append(f.path)
        return waiting[0].envelope.card, alternates

    async def _attempt(self, req: PipelineRequest) -> Resolved | None:
        """Resolve and prepare once; None if no instance waits for this pipeline any more."""
        # Replicas that joined (or left) since the last attempt count now.
        sources = self._sources(req.model, req.mdcsum)
        if sources is None:
            return None
        card, alternates = sources
        resolved = await self._resolver(card, alternates=alternates)
        if self._prepare is not None:
            await self._prepare(resolved.card, resolved.local_dir)
        return resolved

    async def _bounded(self, attempt: Callable[[], Coroutine[Any, Any, _T]], label: str) -> _T:
        """Run ``attempt()`` under the concurrency limit. An attempt still running after
        ``slow_pipeline_after`` seconds gives its permit back, so a few stuck models (an
        unreachable worker, a huge tokenizer) cannot keep every other model from loading."""
        await self._sem.acquire()
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
                self._sem.release()
                held = False
            return await task
        finally:
            if held:
                self._sem.release()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _run_pipeline(self, req: PipelineRequest, seen: float) -> None:
        ident = (req.model, req.mdcsum)
        backoff = Backoff(*self._backoff)
        try:
            while True:
                try:
                    resolved = await self._bounded(
                        lambda: self._attempt(req),
                        f"pipeline of {req.model!r} ({req.mdcsum[:12]})",
                    )
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
                # An instance admitted after the last check found no one waiting would
                # otherwise join a pipeline that is already on its way out.
                if not self._closed and self._registry.pending(*ident):
                    self._start_pipeline(req)


def _cache_by_slug(cache_dir: str | Path | None) -> Path:
    from discovery_mdc.cache import CacheLayout, resolve_cache_root

    return CacheLayout(resolve_cache_root(cache_dir)).by_slug


def _cache_resolver(cache_dir: str | Path | None) -> Resolver:
    from discovery_mdc.cache import resolve_metadata_files

    async def resolve(card: ModelDeploymentCard, *, alternates: dict[str, list[str]]) -> Any:
        return await resolve_metadata_files(card, cache_dir=cache_dir, alternates=alternates)

    return resolve
