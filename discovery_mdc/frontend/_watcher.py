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
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from discovery_mdc._backoff import Backoff
from discovery_mdc.card import ModelDeploymentCard
from discovery_mdc.errors import DiscoveryError, EtcdCompactedError, EtcdError
from discovery_mdc.etcd import Store
from discovery_mdc.frontend._metrics import FrontendMetrics
from discovery_mdc.frontend._prepare import check_json_files
from discovery_mdc.frontend._state import (
    Change,
    EventKind,
    ModelEvent,
    ModelInfo,
    NamespaceFilter,
    Outcome,
    PipelineRequest,
    Registry,
    WatchState,
)

__all__ = ["ModelWatcher", "PrepareHook", "Resolver"]

log = logging.getLogger("discovery_mdc.frontend")

PrepareHook = Callable[[ModelDeploymentCard, Path], Awaitable[None]]


class Resolved(Protocol):
    @property
    def card(self) -> ModelDeploymentCard: ...
    @property
    def local_dir(self) -> Path: ...


class Resolver(Protocol):
    def __call__(
        self, card: ModelDeploymentCard, *, alternates: dict[str, list[str]]
    ) -> Awaitable[Resolved]: ...


class ModelWatcher:
    """Watches ``v1/mdc/`` and keeps a registry of ready models.

    Use as ``async with ModelWatcher(store, ...) as w:``; then ``w.models()``,
    ``async for event in w.events()`` and ``await w.wait_for_model(name, timeout)``.
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
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: FrontendMetrics | None = None,
    ) -> None:
        self._store = store
        self._filter = NamespaceFilter.create(namespace, namespace_prefix)
        self._prefix = self._filter.etcd_prefix()
        self._registry = Registry(self._filter)
        self._state = WatchState()
        self._prepare = prepare
        self._resolver = resolver or _cache_resolver(cache_dir)
        self._reconcile_interval = reconcile_interval
        self._sem = asyncio.Semaphore(max_concurrent_pipelines)
        self._backoff = (backoff_initial, backoff_max)
        self._sleep = sleep
        self.metrics = metrics or FrontendMetrics()
        self._pipelines: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._alternates: dict[tuple[str, str], dict[str, list[str]]] = {}
        self._subscribers: list[asyncio.Queue[ModelEvent]] = []
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._apply_lock = asyncio.Lock()
        self.connected = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> ModelWatcher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """List the prefix once (raises if etcd is unreachable), then watch in the background."""
        await self._relist("start")
        self._tasks.append(asyncio.create_task(self._watch_loop(), name="mdc-watch"))
        if self._reconcile_interval > 0:
            self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="mdc-reconcile"))

    async def close(self) -> None:
        tasks = [*self._tasks, *self._pipelines.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._pipelines.clear()

    # ------------------------------------------------------------------ queries

    def models(self) -> list[ModelInfo]:
        """A snapshot of the ready models."""
        return self._registry.ready_models()

    def model(self, name: str) -> ModelInfo | None:
        return self._registry.model(name)

    def instance_keys(self) -> set[str]:
        """Keys of every admitted instance (ready or still being prepared)."""
        return self._registry.instance_keys()

    @property
    def revision(self) -> int:
        return self._state.revision

    async def events(self) -> AsyncIterator[ModelEvent]:
        """Added / Updated / Removed / Rejected events from now on."""
        queue: asyncio.Queue[ModelEvent] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    async def wait_for_model(self, name: str, timeout: float | None = None) -> ModelInfo:  # noqa: ASYNC109
        """Wait until ``name`` is ready; raises ``TimeoutError`` after ``timeout`` seconds."""

        async def ready() -> ModelInfo:
            async with self._changed:
                while (info := self._registry.model(name)) is None:
                    await self._changed.wait()
                return info

        return await asyncio.wait_for(ready(), timeout)

    # ------------------------------------------------------------------ watch

    async def _watch_loop(self) -> None:
        backoff = Backoff(*self._backoff)
        while True:
            try:
                stream = self._store.watch(
                    self._prefix,
                    prefix=True,
                    start_revision=self._state.revision + 1,
                    prev_kv=True,
                    progress_notify=True,
                )
                async for resp in stream:
                    if not self.connected:
                        log.info(
                            "watching %s from revision %d", self._prefix, self._state.revision + 1
                        )
                    self.connected = True
                    backoff.reset()
                    changes: list[Change] = []
                    for ev in resp.events:
                        self.metrics.events.labels(ev.type.lower()).inc()
                        if ev.type == "PUT":
                            change = self._state.on_put(ev.kv.key, ev.kv.value, ev.kv.mod_revision)
                        else:
                            change = self._state.on_delete(ev.kv.key, ev.kv.mod_revision)
                        if change is not None:
                            changes.append(change)
                    await self._apply_all(changes)
                    self._state.observe_revision(resp.header_revision)
                raise EtcdError(f"watch on {self._prefix} ended")
            except asyncio.CancelledError:
                raise
            except EtcdCompactedError as exc:
                log.warning(
                    "watch on %s hit compaction at revision %d; relisting",
                    self._prefix,
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

    async def _relist(self, reason: str) -> None:
        result = await self._store.range_prefix_all(self._prefix)
        snapshot = {kv.key: (kv.value, kv.mod_revision) for kv in result.kvs}
        self.metrics.relists.labels(reason).inc()
        async with self._apply_lock:
            changes = self._state.diff(snapshot, result.revision)
        if changes:
            log.info(
                "relist (%s) of %s at revision %d: %d change(s)",
                reason,
                self._prefix,
                result.revision,
                len(changes),
            )
        await self._apply_all(changes)

    async def _reconcile_loop(self) -> None:
        while True:
            await self._sleep(self._reconcile_interval)
            try:
                await self._relist("reconcile")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("periodic reconcile of %s failed: %s", self._prefix, exc)

    async def reconcile(self) -> None:
        """Relist now and apply the diff (the periodic reconcile, on demand)."""
        await self._relist("reconcile")

    # ------------------------------------------------------------------ apply

    async def _apply_all(self, changes: list[Change]) -> None:
        if not changes:
            return
        async with self._apply_lock:
            now = int(time.time())
            for change in changes:
                await self._handle(self._registry.apply(change, now))

    async def _handle(self, out: Outcome) -> None:
        if out.malformed:
            self.metrics.malformed.inc()
        for model, sum_ in out.cancelled:
            task = self._pipelines.pop((model, sum_), None)
            self._alternates.pop((model, sum_), None)
            if task is not None:
                task.cancel()
        for req in out.pipelines:
            self._start_pipeline(req)
        await self._publish(out.events)

    async def _publish(self, events: list[ModelEvent]) -> None:
        for event in events:
            if event.kind is EventKind.REJECTED:
                self.metrics.rejected.inc()
            for queue in self._subscribers:
                queue.put_nowait(event)
        self.metrics.models.set(len(self._registry.ready_models()))
        self.metrics.instances.set(len(self._registry.instance_keys()))
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ pipelines

    def _start_pipeline(self, req: PipelineRequest) -> None:
        ident = (req.model, req.mdcsum)
        alternates = self._alternates.setdefault(ident, {})
        for _, f in req.envelope.card.files():
            uris = alternates.setdefault(f.checksum.hex, [])
            if f.path not in uris:
                uris.append(f.path)
        task = self._pipelines.get(ident)
        if task is None or task.done():
            self._pipelines[ident] = asyncio.create_task(
                self._run_pipeline(req), name=f"mdc-pipeline-{req.model}-{req.mdcsum[:12]}"
            )

    async def _run_pipeline(self, req: PipelineRequest) -> None:
        ident = (req.model, req.mdcsum)
        backoff = Backoff(*self._backoff)
        try:
            while self._registry.pending(*ident):
                try:
                    async with self._sem:
                        resolved = await self._resolver(
                            req.envelope.card, alternates=self._alternates.get(ident, {})
                        )
                        if self._prepare is not None:
                            await self._prepare(resolved.card, resolved.local_dir)
                except asyncio.CancelledError:
                    raise
                except (DiscoveryError, OSError, ValueError) as exc:
                    self.metrics.pipelines.labels("failed").inc()
                    delay = backoff.next_delay()
                    log.error(
                        "model %r (mdcsum %s) not ready: %s; retrying in %.1fs",
                        req.model,
                        req.mdcsum,
                        exc,
                        delay,
                    )
                    await self._sleep(delay)
                    continue
                self.metrics.pipelines.labels("ok").inc()
                async with self._apply_lock:
                    out = self._registry.pipeline_done(
                        req.model, req.mdcsum, resolved.card, resolved.local_dir, int(time.time())
                    )
                    await self._handle(out)
                return
        finally:
            if self._pipelines.get(ident) is asyncio.current_task():
                del self._pipelines[ident]
                self._alternates.pop(ident, None)


def _cache_resolver(cache_dir: str | Path | None) -> Resolver:
    from discovery_mdc.cache import resolve_metadata_files

    async def resolve(card: ModelDeploymentCard, *, alternates: dict[str, list[str]]) -> Any:
        return await resolve_metadata_files(card, cache_dir=cache_dir, alternates=alternates)

    return resolve
