"""run_cancellable: a daemon thread the event loop can walk away from."""

from __future__ import annotations

import asyncio
import threading

import pytest

from discovery_mdc._threads import run_cancellable


async def test_the_result_and_exceptions_come_back_to_the_caller() -> None:
    assert await run_cancellable(lambda stop: 6 * 7, name="t") == 42

    def boom(stop: threading.Event) -> None:
        raise ValueError("bad model dir")

    with pytest.raises(ValueError, match="bad model dir"):
        await run_cancellable(boom, name="t")


async def test_cancelling_sets_the_stop_flag_and_does_not_wait_for_the_thread() -> None:
    started, release = threading.Event(), threading.Event()
    seen: list[bool] = []

    def work(stop: threading.Event) -> None:
        started.set()
        release.wait(30)  # a hash that goes on: the caller must not wait for it
        seen.append(stop.is_set())

    task = asyncio.create_task(run_cancellable(work, name="hash"))
    await asyncio.to_thread(started.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    thread = next(t for t in threading.enumerate() if t.name == "hash")
    assert thread.daemon and thread.is_alive()  # the caller returned while it still runs
    release.set()
    await asyncio.to_thread(thread.join, 30)
    assert seen == [True]
