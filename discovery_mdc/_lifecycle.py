"""``with``/``async with`` support for the package's long-lived objects, and their task
shutdown, written once."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any, Self

__all__ = ["AsyncService", "Service", "cancel_and_wait"]


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel every task, then wait until each has finished. What they end with (their
    cancellation, or an error) is dropped: they are being shut down."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class AsyncService:
    """An object with ``async start()`` and ``async close()``; ``async with`` runs both."""

    async def start(self) -> object:
        """Nothing to start by default (subclasses may return what they started, e.g. a port)."""
        return None

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Service:
    """An object with ``start()`` and ``close()``; ``with`` runs both."""

    def start(self) -> Self:
        return self

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
