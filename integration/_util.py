"""Helpers for integration tests. Wait for conditions by polling, never with fixed sleeps."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

__all__ = ["wait_until"]

_T = TypeVar("_T")


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[_T]],
    *,
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
    message: str | Callable[[], str] = ...,
) -> _T: ...


@overload
async def wait_until(
    predicate: Callable[[], _T],
    *,
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
    message: str | Callable[[], str] = ...,
) -> _T: ...


async def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline, not a cancel scope
    interval: float = 0.05,
    message: str | Callable[[], str] = "",
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy, and return it.

    Exceptions from the predicate count as "not yet" until the deadline, then the last one is
    chained onto the AssertionError raised with ``message`` (or a callable producing it).
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_value: object = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last_value = value
        except Exception as exc:  # retried until the deadline
            last_exc = exc
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            detail = f"; last error: {last_exc!r}" if last_exc else f"; last value: {last_value!r}"
            raise AssertionError(
                f"condition not met within {timeout}s: {text}{detail}"
            ) from last_exc
        await asyncio.sleep(interval)
