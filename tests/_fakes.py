"""Fakes shared by the informer and watcher unit tests (import as ``from _fakes import ...``).

- :class:`VirtualTime`: an injected clock and sleep; sleepers wake only when the test
  advances time, so intervals, graces and backoffs run with no real sleeps.
- :class:`RecordingStore`: a MemoryStore that records watch starts and can hide changes from
  watches in several ways (all commits, some keys, or hold them back like a slow stream).
- :func:`until`: poll a predicate under a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from discovery_mdc.etcd import MemoryStore, RangeResult, WatchEvent, WatchResponse

DEADLINE = 10.0


async def until(predicate: Callable[[], object], timeout: float = DEADLINE) -> None:  # noqa: ASYNC109
    """Poll ``predicate`` until it is truthy; fail after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - polls a plain predicate
                await asyncio.sleep(0.002)
    except TimeoutError:
        raise AssertionError(f"condition not met within {timeout}s") from None


class VirtualTime:
    """``clock()`` and ``sleep()`` on a virtual timeline that only :meth:`advance` moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        entry = (self.now + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    def sleeping(self, seconds: float | None = None) -> int:
        """How many sleeps (of ``seconds``, if given) are pending."""
        return sum(
            1
            for deadline, fut in self._sleepers
            if not fut.done() and (seconds is None or abs(deadline - self.now - seconds) < 1e-9)
        )

    async def advance(self, seconds: float) -> None:
        """Move time on, wake every sleeper that is due, and let them run."""
        self.now += seconds
        for deadline, fut in list(self._sleepers):
            if deadline <= self.now + 1e-9 and not fut.done():
                fut.set_result(None)
        for _ in range(20):
            await asyncio.sleep(0)


class RecordingStore(MemoryStore):
    """A MemoryStore that records watch start revisions, and can keep changes from watches:

    - ``muted``: nothing reaches a watch (a half-open connection: etcd changes, the watch
      stays quiet);
    - ``dropped``: events of these keys never reach a watch, later ones do (a watch that
      loses events);
    - ``held``: events wait until :meth:`release` (a slow stream: in flight, not lost).

    History is kept either way, so a new watch from an older revision replays it. A range
    read can be held at ``range_gate`` after its snapshot was taken.
    """

    def __init__(self) -> None:
        super().__init__()
        self.watch_starts: list[int | None] = []
        self.muted = False
        self.dropped: set[str] = set()
        self.held = False
        self._held: list[tuple[int, list[WatchEvent]]] = []
        self.range_gate: asyncio.Event | None = None
        self.ranges_started = 0

    def _commit(self, events: list[WatchEvent]) -> None:
        for e in events:
            self._history.append((self.revision, e))
        if self.muted:
            return
        shown = [e for e in events if e.kv.key not in self.dropped]
        if self.held:
            self._held.append((self.revision, shown))
            return
        for w in self._watches:
            w.offer(self.revision, shown)

    def release(self) -> None:
        """Deliver the held events, in order, and stop holding."""
        self.held = False
        for revision, events in self._held:
            for w in self._watches:
                w.offer(revision, events)
        self._held.clear()

    async def range_prefix_all(
        self,
        prefix: str,
        *,
        page_size: int = 500,
        keys_only: bool = False,
        revision: int | None = None,
    ) -> RangeResult:
        result = await super().range_prefix_all(
            prefix, page_size=page_size, keys_only=keys_only, revision=revision
        )
        self.ranges_started += 1
        if self.range_gate is not None:
            await self.range_gate.wait()
        return result

    def watch(self, key: str, **kwargs: Any) -> AsyncIterator[WatchResponse]:
        self.watch_starts.append(kwargs.get("start_revision"))
        return super().watch(key, **kwargs)
