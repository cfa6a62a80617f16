"""Waiting for etcd at start: pods start in any order, so etcd may come up after us."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from discovery_mdc._backoff import RECONNECT_BACKOFF_MAX, Backoff
from discovery_mdc._clock import Clock, Sleep
from discovery_mdc.errors import EtcdConnectionError

__all__ = ["retry_until_reachable"]


class _AttemptTimedOut(EtcdConnectionError):
    """One attempt outlived the wait's deadline (etcd accepts but does not answer)."""


log = logging.getLogger("discovery_mdc.etcd")

_T = TypeVar("_T")


async def retry_until_reachable(
    op: Callable[[], Awaitable[_T]],
    *,
    timeout: float,  # noqa: ASYNC109 - a retry budget, not a cancel scope
    what: str,
    endpoints: Sequence[str] = (),
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    backoff: Backoff | None = None,
) -> _T:
    """Run ``op()``; while etcd is unreachable (:class:`EtcdConnectionError`), retry it with
    jittered backoff for up to ``timeout`` seconds, logging every failed attempt.

    ``timeout`` 0 means one attempt. Every other error (credentials, TLS certificates, a
    refused request) is raised at once: waiting would not fix it. After the deadline the last
    connection error is raised, with how long it waited (and ``endpoints``, to name them
    even when the last attempt only timed out).
    """
    deadline = clock() + timeout
    backoff = backoff or Backoff(0.5, RECONNECT_BACKOFF_MAX)
    attempt = 0
    last: EtcdConnectionError | None = None  # the last error etcd's client itself raised
    while True:
        attempt += 1
        try:
            if timeout <= 0:
                return await op()
            # A hung etcd must not hold one attempt far past the deadline (the last attempt
            # still gets a second).
            bound = max(deadline - clock(), 1.0)
            try:
                async with asyncio.timeout(bound):
                    return await op()
            except TimeoutError:
                raise _AttemptTimedOut(f"no answer from etcd within {bound:.1f}s") from None
        except EtcdConnectionError as exc:
            if not isinstance(exc, _AttemptTimedOut):
                last = exc
            left = deadline - clock()
            if left <= 0:
                if timeout <= 0:
                    raise
                where = f" ({', '.join(endpoints)})" if endpoints else ""
                cause = exc if last is None else f"{exc}; last error: {last}"
                raise EtcdConnectionError(
                    f"etcd{where} still unreachable after waiting {timeout:g}s for {what} "
                    f"({attempt} attempts; ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS): {cause}"
                ) from None
            delay = min(backoff.next_delay(), left)
            log.warning(
                "etcd not reachable for %s (attempt %d, giving up in %.0fs): %s; retrying in %.1fs",
                what,
                attempt,
                left,
                exc,
                delay,
            )
            await sleep(delay)
