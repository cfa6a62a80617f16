"""Blocking work the event loop can walk away from.

Blocking work is offloaded with ``asyncio.to_thread`` throughout the package (never
``loop.run_in_executor``), except work a stop must not wait for, which goes here.

``asyncio.to_thread`` runs in the loop's default executor, which ``asyncio.run`` joins on
exit: a worker stopped by SIGTERM while it hashes a large file would wait for the hash to
finish. :func:`run_cancellable` runs the function in its own daemon thread instead and, when
the awaiting task is cancelled, sets the stop event the function polls and returns at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["run_cancellable"]

_T = TypeVar("_T")


async def run_cancellable(fn: Callable[[threading.Event], _T], *, name: str) -> _T:
    """Run ``fn(stop)`` in a daemon thread and await its result.

    If the caller is cancelled, ``stop`` is set and the cancellation propagates without
    waiting for the thread; ``fn`` should poll ``stop`` and return soon, and nothing joins it.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()
    stop = threading.Event()

    def settle(result: _T | None, exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result, exc = fn(stop), None
        except BaseException as err:  # handed to the awaiting task
            result, exc = None, err
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody waits
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=target, name=name, daemon=True).start()
    try:
        return await done
    except asyncio.CancelledError:
        stop.set()
        raise
