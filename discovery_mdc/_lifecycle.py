"""``with``/``async with`` support for the package's long-lived objects, written once."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["AsyncService", "Service"]


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
