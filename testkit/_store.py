"""A MemoryStore for the informer and watcher tests that records watch starts and can hide
changes from watches in several ways (all commits, some keys, or hold them back like a slow
stream)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from discovery_mdc.etcd import MemoryStore, RangeResult, WatchEvent, WatchResponse

__all__ = ["RecordingStore"]


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
