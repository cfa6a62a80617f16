"""The time protocol long-running loops take, so tests drive them with no real sleeps.

``LeaseSession``, ``PrefixInformer``, ``ModelWatcher`` and the cache's ``blob_lock`` accept a
``clock`` (seconds on a monotonic scale) and a ``sleep`` (an awaitable pause); the defaults are
``time.monotonic`` and ``asyncio.sleep``. A test passes a fake pair and advances time itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["Clock", "Sleep", "every"]

Clock = Callable[[], float]
"""Seconds on a monotonic scale (``time.monotonic``)."""

Sleep = Callable[[float], Awaitable[None]]
"""Pause for that many seconds (``asyncio.sleep``)."""


async def every(
    seconds: float,
    sleep: Sleep,
    step: Callable[[], Awaitable[object]],
    on_error: Callable[[Exception], None],
) -> None:
    """Pause ``seconds``, run ``step``, repeat until cancelled. An error goes to ``on_error``
    and the loop carries on."""
    while True:
        await sleep(seconds)
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            on_error(exc)
