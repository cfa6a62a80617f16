"""PrefixInformer: a consistent, continuously checked view of one etcd key prefix.

It lists the prefix, then watches from the listed revision + 1 and yields each change, in
revision order per key, as batches (:meth:`PrefixInformer.batches`). After a disconnect it
resumes from the highest revision seen + 1; when that revision is compacted it relists and
yields the diff. Every ``reconcile_interval`` seconds it checks its state against etcd at a
cost that grows with the changes since the last check, not with the number of keys
(``_watchstate.py`` has the reasoning): a constant few hundred bytes when nothing was missed.
What the watch missed is repaired (values fetched only for the keys that differ), and a watch
that stays silent while etcd changes is restarted. A full relist happens only at start, on a
compaction, or when etcd lost history.

etcd can come back with less history than it had (data dir wiped, restored from an older
snapshot): its revision goes backwards and a watch resumed from the old revision hears
nothing. Every range answer is checked for that (a header revision below what the state
already reached, or another cluster id; see ``WatchState.history_lost``): the informer then
forgets every revision, relists everything (reason ``history_lost``) and watches from the new
revision. After a watch fails, a cheap count read probes etcd between short backoff sleeps
(capped at ``backoff_max``, 2 s), so the watch is back within about that long once etcd
answers, and the probe is where a lost history is noticed first.

Time is injected (``clock`` and ``sleep``, the protocol ``LeaseSession`` also takes), so unit
tests run every interval, grace and backoff instantly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from discovery_mdc._backoff import RECONNECT_BACKOFF_MAX, Backoff
from discovery_mdc._clock import Clock, Sleep, every
from discovery_mdc._lifecycle import AsyncService, cancel_and_wait
from discovery_mdc.errors import EtcdCompactedError, EtcdError
from discovery_mdc.etcd._codec import KeyValue, RangeResult, WatchResponse
from discovery_mdc.etcd._store import Store
from discovery_mdc.etcd._watchstate import Change, WatchState

__all__ = [
    "DEFAULT_RECONCILE_INTERVAL",
    "ChangeBatch",
    "InformerStats",
    "PrefixInformer",
]

log = logging.getLogger("discovery_mdc.etcd")

DEFAULT_RECONCILE_INTERVAL = 5.0
RELIST_REASONS = ("start", "compaction", "reconcile", "history_lost")
CHECK_KINDS = ("count", "quick", "exact", "listing", "fetch")


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    """Changes to apply together, in order.

    ``origin`` says where they came from: ``"watch"``, a relist (``"start"``,
    ``"compaction"``, ``"reconcile"``, ``"history_lost"``) or ``"repair"`` (a check found
    what the watch missed).
    ``revision`` is the informer's revision once they are applied.
    """

    changes: tuple[Change, ...]
    revision: int
    origin: str


@dataclass(slots=True)
class InformerStats:
    """Plain counters (read them at any time, e.g. from a metrics collector)."""

    events_put: int = 0
    events_delete: int = 0
    reconnects: int = 0
    relists: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RELIST_REASONS, 0))
    checks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHECK_KINDS, 0))
    repairs: dict[str, int] = field(default_factory=lambda: {"put": 0, "delete": 0})
    reconcile_bytes: int = 0
    """Response bytes read from etcd by reconciles (checks, fetches and the relists they
    needed)."""
    reconcile_failures: int = 0
    last_delivery: float = 0.0
    """``clock()`` when the watch last delivered a message (events, progress or created)."""


class PrefixInformer(AsyncService):
    """Lists and watches ``prefix``; ``async for batch in informer.batches():`` applies them.

    One consumer reads :meth:`batches` (or takes what is queued with :meth:`drain`). The
    state behind ``revision`` is updated as batches are produced, so a consumer that applies
    them in order sees exactly etcd's keys under the prefix.
    """

    def __init__(
        self,
        store: Store,
        prefix: str,
        *,
        reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL,
        check_timeout: float = 2.0,
        watch_grace: float = 1.0,
        max_repair_fetches: int = 256,
        backoff_initial: float = 0.5,
        backoff_max: float = RECONNECT_BACKOFF_MAX,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._prefix = prefix
        self._interval = reconcile_interval
        self._check_timeout = check_timeout
        self._grace = watch_grace
        self._max_fetches = max_repair_fetches
        self._backoff = (backoff_initial, backoff_max, rng)
        self._clock = clock
        self._sleep = sleep
        self._state = WatchState()
        self._queue: asyncio.Queue[ChangeBatch | None] = asyncio.Queue()
        # Relists and checks run one at a time; watch events are applied between their awaits.
        self._lock = asyncio.Lock()
        self._delivered = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._lost: str | None = None  # etcd lost history; relist before trusting anything
        self.connected = False
        """True while a watch stream is open (from its first message until it fails)."""
        self.stats = InformerStats(last_delivery=clock())

    # ------------------------------------------------------------------ public

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def revision(self) -> int:
        """The highest revision through which the state is complete; a resumed watch
        starts after it."""
        return self._state.revision

    @property
    def keys(self) -> dict[str, int]:
        """Known keys and their mod revisions (a copy)."""
        return dict(self._state.known)

    def silence(self) -> float:
        """Seconds since the watch last delivered anything."""
        return max(0.0, self._clock() - self.stats.last_delivery)

    async def start(self) -> None:
        """List the prefix (raises if etcd is unreachable), then watch and reconcile in the
        background. The listing is the first batch."""
        await self._relist("start")
        self.stats.last_delivery = self._clock()
        self._start_watch()
        if self._interval > 0:
            self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="etcd-reconcile"))

    async def close(self) -> None:
        """Stop watching and end :meth:`batches`."""
        self._closed = True
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()
        self.connected = False
        self._queue.put_nowait(None)

    async def batches(self) -> AsyncIterator[ChangeBatch]:
        """Every batch, in order, until the informer closes."""
        while (batch := await self._queue.get()) is not None:
            yield batch
        self._queue.put_nowait(None)  # a later reader ends too

    def drain(self) -> list[ChangeBatch]:
        """The batches queued now, without waiting."""
        out = []
        while not self._queue.empty():
            batch = self._queue.get_nowait()
            if batch is None:
                self._queue.put_nowait(None)
                break
            out.append(batch)
        return out

    async def reconcile(self) -> str:
        """Check the state against etcd now and repair what the watch missed.

        Returns ``"clean"`` (proved exact with one small read), ``"caught-up"`` (the
        differences were still in flight on the watch), ``"repaired"`` (the watch missed
        changes; they were applied and the watch restarted) or ``"relisted"``.
        """
        async with self._lock:
            try:
                return await self._reconcile_locked()
            except _HistoryLost:
                # Nothing from the old watch may mix with the relist; the new watch starts
                # from the relist's revision (its loop relists first if this one fails).
                self._stop_watch()
                try:
                    await self._relist_locked("history_lost", charged=True)
                finally:
                    if not self._closed:
                        self._start_watch()
                return "relisted"

    async def relist(self, reason: str = "reconcile") -> int:
        """Relist the prefix now and yield the diff; returns the number of changes."""
        async with self._lock:
            return await self._relist_locked(reason)

    def restart_watch(self, why: str) -> None:
        """Drop the current watch stream and open a new one from ``revision + 1``."""
        if self._watch_task is None or self._closed:
            return
        log.warning(
            "restarting the watch on %s from revision %d: %s",
            self._prefix,
            self._state.revision + 1,
            why,
        )
        self._stop_watch()
        self.stats.reconnects += 1
        self._start_watch()

    # ------------------------------------------------------------------ batches

    def _emit(self, changes: Iterable[Change], origin: str) -> None:
        batch = tuple(changes)
        if batch:
            self._queue.put_nowait(ChangeBatch(batch, self._state.revision, origin))

    def _observe_header(
        self,
        revision: int,
        *,
        complete: bool = False,
        floor: int | None = None,
        cluster_id: int = 0,
    ) -> None:
        """Every header revision etcd sends passes here (watch messages and range reads):
        the one place to notice etcd going backwards or a different cluster. Only a watch
        message (``complete``) vouches that every event through it was delivered. A range
        answer is checked against ``floor``, the state's revision when it was sent (none for
        a listing pinned at a revision, whose result carries that revision): raises
        :class:`_HistoryLost` if etcd lost history."""
        if complete:
            self._state.observe_revision(revision)
            return
        why = self._state.history_lost(revision if floor is None else floor, revision, cluster_id)
        if why is not None:
            self._lost = why
            raise _HistoryLost(why)

    async def _range(
        self,
        kind: str | None,
        key: str,
        *,
        prefix: bool = False,
        count_only: bool = False,
        keys_only: bool = False,
        min_mod_revision: int | None = None,
        revision: int | None = None,
    ) -> RangeResult:
        """One range read, checked by :meth:`_observe_header` (and charged to ``kind``)."""
        floor = self._state.revision
        result = await self._store.range(
            key,
            prefix=prefix,
            count_only=count_only,
            keys_only=keys_only,
            min_mod_revision=min_mod_revision,
            revision=revision,
            attempt_timeout=self._check_timeout,
        )
        if kind is not None:
            self._charge(kind, result)
        self._observe_header(result.revision, floor=floor, cluster_id=result.cluster_id)
        return result

    # ------------------------------------------------------------------ watch

    def _start_watch(self) -> None:
        self._watch_task = asyncio.create_task(self._watch_loop(), name="etcd-watch")
        self._tasks.append(self._watch_task)

    def _stop_watch(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(ValueError):
                self._tasks.remove(self._watch_task)
            self._watch_task = None
        self.connected = False

    async def _watch_loop(self) -> None:
        backoff = Backoff(*self._backoff)
        probe = False
        while True:
            if probe:
                # etcd was unreachable: a cheap read says when it answers again (and whether
                # it came back with less history) before a watch is opened.
                try:
                    await self._range(None, self._prefix, prefix=True, count_only=True)
                except asyncio.CancelledError:
                    raise
                except _HistoryLost:
                    pass
                except Exception as exc:
                    delay = backoff.next_delay()
                    log.debug("etcd still unreachable (%s); probing again in %.1fs", exc, delay)
                    await self._sleep(delay)
                    continue
                probe = False
            if self._lost is not None:
                await self._relist_with_retry("history_lost", backoff)
            start = self._state.revision + 1
            try:
                stream = self._store.watch(
                    self._prefix,
                    prefix=True,
                    start_revision=start,
                    prev_kv=False,
                    progress_notify=True,
                )
                async for resp in stream:
                    if not self.connected:
                        log.info("watching %s from revision %d", self._prefix, start)
                        self.connected = True
                    backoff.reset()
                    self._on_response(resp)
                raise EtcdError(f"watch on {self._prefix} ended")
            except asyncio.CancelledError:
                raise
            except EtcdCompactedError as exc:
                log.warning(
                    "watch on %s from revision %d hit compaction at revision %d; relisting",
                    self._prefix,
                    start,
                    exc.compact_revision,
                )
                await self._relist_with_retry("compaction", backoff)
            except Exception as exc:
                self.connected = False
                self.stats.reconnects += 1
                delay = backoff.next_delay()
                log.warning(
                    "watch on %s lost (%s); resuming from revision %d in %.1fs",
                    self._prefix,
                    exc,
                    self._state.revision + 1,
                    delay,
                )
                await self._sleep(delay)
                probe = True

    def _on_response(self, resp: WatchResponse) -> None:
        self.stats.last_delivery = self._clock()
        self._delivered.set()
        state = self._state
        changes = []
        for ev in resp.events:
            kv = ev.kv
            if ev.type == "PUT":
                self.stats.events_put += 1
                change = state.on_put(kv.key, kv.value, kv.mod_revision)
            else:
                self.stats.events_delete += 1
                change = state.on_delete(kv.key, kv.mod_revision)
            if change is not None:
                changes.append(change)
        self._observe_header(resp.header_revision, complete=True)
        self._emit(changes, "watch")

    # ------------------------------------------------------------------ relist

    async def _relist_with_retry(self, reason: str, backoff: Backoff) -> None:
        while True:
            try:
                await self.relist(reason)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected = False
                delay = backoff.next_delay()
                log.warning("relist of %s failed (%s); retrying in %.1fs", self._prefix, exc, delay)
                await self._sleep(delay)

    async def _relist(self, reason: str) -> int:
        async with self._lock:
            return await self._relist_locked(reason)

    async def _relist_locked(self, reason: str, *, charged: bool = False) -> int:
        floor = self._state.revision
        result = await self._store.range_prefix_all(self._prefix)
        if charged:
            self.stats.reconcile_bytes += result.size
        state = self._state
        lost = self._lost or state.history_lost(floor, result.revision, result.cluster_id)
        if lost is not None:
            log.error(
                "etcd lost history under %s: %s (was its data dir wiped, or was it restored "
                "from an older snapshot?); forgetting every revision, relisting %d key(s) at "
                "revision %d and watching from there",
                self._prefix,
                lost,
                len(result.kvs),
                result.revision,
            )
            state.forget_history()
            state.history_lost(0, result.revision, result.cluster_id)  # adopt the new cluster
            self._lost = None
            reason = "history_lost"
        self.stats.relists[reason] = self.stats.relists.get(reason, 0) + 1
        snapshot = {kv.key: (kv.value, kv.mod_revision) for kv in result.kvs}
        changes = self._state.diff(snapshot, result.revision)
        if changes:
            log.info("relist (%s) of %s at revision %d: %d change(s)",
                     reason, self._prefix, result.revision, len(changes))  # fmt: skip
        self._emit(changes, reason)
        return len(changes)

    # ------------------------------------------------------------------ reconcile

    async def _reconcile_loop(self) -> None:
        def failed(exc: Exception) -> None:
            self.stats.reconcile_failures += 1
            log.warning("reconcile of %s failed: %s", self._prefix, exc)

        await every(self._interval, self._sleep, self.reconcile, failed)

    def _charge(self, kind: str, result: RangeResult) -> RangeResult:
        self.stats.checks[kind] += 1
        self.stats.reconcile_bytes += result.size
        return result

    async def _modified_after(
        self, revision: int, kind: str, *, at: int | None = None
    ) -> RangeResult:
        """Keys (no values) under the prefix modified after ``revision``, read at ``at``
        (default: now), with the count of all keys under the prefix."""
        return await self._range(
            kind,
            self._prefix,
            prefix=True,
            keys_only=True,
            min_mod_revision=revision + 1,
            revision=at,
        )

    async def _reconcile_locked(self) -> str:
        state = self._state
        probe = state.probe()
        self._delivered.clear()
        # etcd counts from its in-memory index; a min_mod_revision read makes it scan every
        # key's value. While nothing in etcd changed since the last proof, the count is enough.
        counted = await self._range("count", self._prefix, prefix=True, count_only=True)
        if state.unchanged(probe, counted.count, counted.revision):
            return "clean"
        res = await self._modified_after(probe.verified, "quick")
        changed = {kv.key: kv.mod_revision for kv in res.kvs}
        if state.quick_check(probe, changed, res.count, res.revision):
            return "clean"
        # Either in flight on the watch or missed by it. While the pinned check settles what
        # was missed, see whether the watch still delivers anything at all.
        ahead = res.count != probe.count or any(m > probe.revision for m in changed.values())
        alive: asyncio.Future[bool] | None = None
        if ahead and self.connected:
            alive = asyncio.ensure_future(self._delivery_within(self._grace))
        try:
            outcome, missed = await self._settle()
            silent = alive is not None and not await alive
        finally:
            if alive is not None and not alive.done():
                alive.cancel()
        if missed:
            self.restart_watch(f"a reconcile found {missed} change(s) it never delivered")
        elif silent:
            self.restart_watch(
                f"etcd changed under the prefix and the watch delivered nothing for "
                f"{self._grace:g}s (a half-open connection?)"
            )
        return outcome

    async def _delivery_within(self, seconds: float) -> bool:
        delivered = asyncio.ensure_future(self._delivered.wait())
        pause = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait({delivered, pause}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (delivered, pause):
                task.cancel()
        return self._delivered.is_set()

    async def _settle(self) -> tuple[str, int]:
        """The pinned check: compare the state with etcd at the state's own revision and
        repair what differs. Returns (outcome, changes the watch missed)."""
        state = self._state
        probe, known = state.exact_probe()
        try:
            res = await self._modified_after(probe.verified, "exact", at=probe.revision)
            found = state.compare(probe, known, _mods(res.kvs), count=res.count)
            if found.listing and not found.unexplained:
                listing = self._charge(
                    "listing",
                    await self._store.range_prefix_all(
                        self._prefix, keys_only=True, revision=probe.revision
                    ),
                )
                found = state.compare(probe, known, _mods(listing.kvs))
        except EtcdCompactedError:
            # History at the state's revision is gone: only a relist can compare now.
            await self._relist_locked("compaction", charged=True)
            return "relisted", 0
        if found.unexplained:
            self._lost = "etcd holds an older revision of a key than it already reported"
            raise _HistoryLost(self._lost)
        if len(found.puts) > self._max_fetches:
            await self._relist_locked("reconcile", charged=True)
            return "relisted", 0
        if found.clean:
            state.mark_verified(probe.revision)
            return "caught-up", 0
        changes = [state.repair_delete(k, probe.revision) for k in found.deletes]
        for key, kv, header in await self._fetch(found.puts):
            if kv is None:
                changes.append(state.repair_delete(key, header))
            else:
                changes.append(state.repair_put(key, kv.value, kv.mod_revision))
        state.mark_verified(probe.revision)
        self.stats.repairs["put"] += len(found.puts)
        self.stats.repairs["delete"] += len(found.deletes)
        missed = len(found.puts) + len(found.deletes)
        log.warning(
            "reconcile of %s at revision %d: the watch missed %d put(s) and %d delete(s); "
            "repaired without a relist",
            self._prefix,
            probe.revision,
            len(found.puts),
            len(found.deletes),
        )
        self._emit([c for c in changes if c is not None], "repair")
        return "repaired", missed

    async def _fetch(self, keys: Iterable[str]) -> list[tuple[str, KeyValue | None, int]]:
        """The current value of each key: (key, kv or None if gone, header revision)."""
        sem = asyncio.Semaphore(16)

        async def one(key: str) -> tuple[str, KeyValue | None, int]:
            async with sem:
                res = await self._range("fetch", key)
            return key, (res.kvs[0] if res.kvs else None), res.revision

        return list(await asyncio.gather(*(one(k) for k in keys)))


class _HistoryLost(Exception):
    """etcd answered in a way only lost history explains (the reason is the message)."""


def _mods(kvs: Iterable[KeyValue]) -> dict[str, int]:
    return {kv.key: kv.mod_revision for kv in kvs}
