"""The time protocol long-running loops take, so tests drive them with no real sleeps.

``LeaseSession``, ``PrefixInformer`` and ``ModelWatcher`` accept a ``clock`` (seconds on a
monotonic scale) and a ``sleep`` (an awaitable pause); the defaults are ``time.monotonic`` and
``asyncio.sleep``. A test passes a fake pair and advances time itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

__all__ = ["Clock", "Sleep"]

Clock = Callable[[], float]
"""Seconds on a monotonic scale (``time.monotonic``)."""

Sleep = Callable[[float], Awaitable[None]]
"""Pause for that many seconds (``asyncio.sleep``)."""
