"""The one fake clock: virtual time for code that takes a ``clock`` and a ``sleep``
(``discovery_mdc._clock``: ``LeaseSession``, ``PrefixInformer``, ``ModelWatcher``,
``retry_until_reachable``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FakeClock"]

_EPSILON = 1e-9


@dataclass(eq=False)
class _Sleeper:
    until: float
    jumps: bool  # short enough to jump, but waiting because the clock is held
    woken: asyncio.Future[None] = field(repr=False)


class FakeClock:
    """Virtual monotonic time; pass ``clock=fake.clock, sleep=fake.sleep``.

    Time moves when the test calls :meth:`advance`, which wakes every sleeper that is due.
    A sleep shorter than ``jump_below`` moves time itself instead: it jumps the clock to its
    own end and returns after one yield (``jump_below=math.inf``: every sleep does, so a loop
    runs through its backoffs and intervals at once). :meth:`hold` makes those sleeps wait
    too, until :meth:`release`. ``on_advance`` gets every step of time (``MemoryStore.advance``
    keeps its leases on the same clock). ``sleeps`` records every requested sleep.
    """

    def __init__(
        self, *, jump_below: float = 0.0, on_advance: Callable[[float], object] | None = None
    ) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._jump_below = jump_below
        self._on_advance = on_advance
        self._held = False
        self._sleepers: list[_Sleeper] = []

    def clock(self) -> float:
        """The current virtual time."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Sleep in virtual time (see the class docstring for who moves it)."""
        self.sleeps.append(seconds)
        jumps = seconds < self._jump_below
        if jumps and not self._held:
            self._move(seconds)
            await asyncio.sleep(0)
            return
        sleeper = _Sleeper(self.now + seconds, jumps, asyncio.get_running_loop().create_future())
        self._sleepers.append(sleeper)
        try:
            await sleeper.woken
        finally:
            self._sleepers.remove(sleeper)

    def sleeping(self, seconds: float | None = None) -> int:
        """How many sleeps are pending (only those with ``seconds`` left, if given)."""
        return sum(
            1
            for s in self._sleepers
            if not s.woken.done()
            and (seconds is None or abs(s.until - self.now - seconds) < _EPSILON)
        )

    async def advance(self, seconds: float) -> None:
        """Move time on, wake every sleeper that is due, and let them run."""
        self._move(seconds)
        for _ in range(20):
            await asyncio.sleep(0)

    def hold(self) -> None:
        """Make sleeps shorter than ``jump_below`` wait until :meth:`release`."""
        self._held = True

    def release(self) -> None:
        """Let the held sleeps jump: time moves to the latest of their ends."""
        self._held = False
        held = [s.until for s in self._sleepers if s.jumps and not s.woken.done()]
        if held:
            self._move(max(0.0, max(held) - self.now))

    def _move(self, seconds: float) -> None:
        self.now += seconds
        if self._on_advance is not None:
            self._on_advance(seconds)
        for s in self._sleepers:
            if s.until <= self.now + _EPSILON and not s.woken.done():
                s.woken.set_result(None)
