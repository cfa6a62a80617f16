"""The one way a test waits: poll a condition under a deadline (never a fixed sleep).

:func:`wait_until` is for async code, :func:`wait_until_sync` for blocking code (benchmarks,
the Dynamo peer helpers, threads). Both poll at once, then back off from a millisecond to
``interval``, so a condition that holds quickly is seen quickly and a slow one (an HTTP probe
of another process) is not hammered. ``interval=0`` checks after every event-loop iteration,
for state that a fake clock moves through without any real time passing.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, overload

__all__ = ["wait_until", "wait_until_sync"]

_T = TypeVar("_T")
_FIRST_PAUSE = 0.001


class _Raised:
    def __bool__(self) -> bool:
        return False


_RAISED = _Raised()


class _Child(Protocol):
    """A process to watch while waiting: ``subprocess.Popen`` or ``testkit.Process``."""

    def poll(self) -> int | None: ...


class _Poll:
    """The deadline, the pauses, what was last seen, and the failure report."""

    def __init__(
        self,
        timeout: float,
        interval: float,
        message: str | Callable[[], str],
        proc: _Child | None,
    ) -> None:
        self.timeout = timeout
        self.interval = interval
        self.message = message
        self.proc = proc
        self.last_exc: Exception | None = None
        self.last_value: object = None
        self._deadline = time.monotonic() + timeout
        self._pause = min(_FIRST_PAUSE, interval)

    def exit_code(self) -> int | None:
        """The watched process's exit code (sampled before a check, so that check saw all
        it wrote), or None."""
        return None if self.proc is None else self.proc.poll()

    def failed(self, exc: Exception) -> object:
        """The predicate raised: not yet (a falsy answer that keeps the error)."""
        self.last_exc = exc
        return _RAISED

    def pause_after(self, value: object, code: int | None) -> float:
        """After a falsy answer: how long to pause before the next check. Raises if the
        process had exited (``code``) or the deadline has passed."""
        if value is not _RAISED:
            self.last_value, self.last_exc = value, None
        if code is not None:
            raise self._failure(f"process exited ({code}) before the condition was met")
        if time.monotonic() >= self._deadline:
            raise self._failure(f"condition not met within {self.timeout}s")
        pause = self._pause
        self._pause = min(pause * 2, self.interval)
        return pause

    def _failure(self, what: str) -> AssertionError:
        text = self.message() if callable(self.message) else self.message
        if self.last_exc is not None:
            detail = f"; last error: {self.last_exc!r}"
        else:
            detail = f"; last value: {self.last_value!r}"
        describe = getattr(self.proc, "describe", None)
        tail = f"\n{describe()}" if callable(describe) and not text else ""
        error = AssertionError(f"{what}: {text}{detail}{tail}")
        error.__cause__ = self.last_exc
        return error


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[_T | None]],
    *,
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
    message: str | Callable[[], str] = ...,
    proc: _Child | None = ...,
) -> _T: ...


@overload
async def wait_until(
    predicate: Callable[[], _T | None],
    *,
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
    message: str | Callable[[], str] = ...,
    proc: _Child | None = ...,
) -> _T: ...


async def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline, not a cancel scope
    interval: float = 0.05,
    message: str | Callable[[], str] = "",
    proc: _Child | None = None,
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy, and return it.

    An exception from the predicate counts as "not yet"; at the deadline an AssertionError
    with ``message`` (or what a callable returns) is raised from the last one. With ``proc``,
    the wait fails as soon as that process exits.
    """
    poll = _Poll(timeout, interval, message, proc)
    while True:
        code = poll.exit_code()
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:  # retried until the deadline
            value = poll.failed(exc)
        if value:
            return value
        await asyncio.sleep(poll.pause_after(value, code))


def wait_until_sync(
    predicate: Callable[[], _T | None],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "",
    proc: _Child | None = None,
) -> _T:
    """:func:`wait_until` for blocking code: the same polling, with ``time.sleep``."""
    poll = _Poll(timeout, interval, message, proc)
    while True:
        code = poll.exit_code()
        answer: object
        try:
            answer = value = predicate()
        except Exception as exc:  # retried until the deadline
            answer = poll.failed(exc)
        else:
            if value:
                return value
        time.sleep(poll.pause_after(answer, code))
