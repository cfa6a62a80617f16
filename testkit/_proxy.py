"""A loopback TCP proxy that a test can cut, freeze and restore, to partition a process
from etcd or leave it with silently dead connections.

It runs its own event loop in a thread, so it keeps forwarding whatever the test's loop is
doing (blocking on a subprocess, say)::

    with TcpProxy("127.0.0.1", etcd.client_port) as proxy:
        ... start a process with --etcd proxy.url ...
        proxy.cut()      # abort every connection; new ones are accepted and closed at once
        proxy.restore()  # forward again
        proxy.freeze()   # open connections stop forwarding, without closing; new ones pass
        proxy.tarpit()   # new connections are accepted and never answered (a frozen host)

``bytes_down`` / ``bytes_up`` count what it forwarded from / to the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from discovery_mdc._lifecycle import Service

__all__ = ["TcpProxy"]

_T = TypeVar("_T")
_CHUNK = 64 * 1024


class TcpProxy(Service):
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.accepted = 0  # connections accepted while forwarding
        self.refused = 0  # connections closed at once because the proxy was cut
        self.tarpitted = 0  # connections accepted and held unanswered (tarpit mode)
        self.bytes_down = 0  # forwarded from the target to clients
        self.bytes_up = 0  # forwarded from clients to the target
        self._cut = False
        self._tarpit = False
        self._flowing: set[asyncio.Event] = set()  # one per open connection pair
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    # ------------------------------------------------------------------ control

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def cut(self) -> None:
        """Abort every open connection and refuse new ones until :meth:`restore`."""
        self._call(self._abort_all(cut=True))

    def restore(self) -> None:
        """Forward new connections again (connections held by :meth:`tarpit` stay held)."""
        self._cut = False
        self._tarpit = False

    def tarpit(self) -> None:
        """Accept new connections and never answer them: no byte either way, nothing closed
        (a host whose server process is frozen, while the kernel still completes handshakes).
        Open connections keep forwarding; :meth:`restore` forwards new ones again."""
        self._tarpit = True

    def freeze(self) -> None:
        """Stop forwarding on every open connection, in both directions, without closing it
        (a half-open path: the peers see no error, just silence). New connections pass."""

        async def freeze() -> None:
            for flowing in self._flowing:
                flowing.clear()

        self._call(freeze())

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    # ------------------------------------------------------------------ loop side

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._abort_all(cut=True)
        # Aborted transports end every pipe; wait for the handlers so none is left pending.
        if self._handlers:
            _, pending = await asyncio.wait(self._handlers, timeout=10)
            for task in pending:
                task.cancel()

    async def _abort_all(self, *, cut: bool) -> None:
        self._cut = cut
        for writer in list(self._conns):
            writer.transport.abort()
        self._conns.clear()
        for flowing in self._flowing:
            flowing.set()  # wake frozen pipes, so they see the aborted transports and end

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._forward(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tarpit:
            self.tarpitted += 1
            self._conns.add(writer)
            held = asyncio.Event()  # set only by _abort_all (cut, close)
            self._flowing.add(held)
            try:
                await held.wait()
            finally:
                self._flowing.discard(held)
                self._conns.discard(writer)
                writer.transport.abort()
            return
        if self._cut:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if self._cut:  # cut while connecting upstream
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.accepted += 1
        self._conns.update((writer, up_writer))
        flowing = asyncio.Event()
        flowing.set()
        self._flowing.add(flowing)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, flowing, up=True),
                self._pipe(up_reader, writer, flowing, up=False),
            )
        finally:
            self._flowing.discard(flowing)
            for w in (writer, up_writer):
                self._conns.discard(w)
                w.transport.abort()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        flowing: asyncio.Event,
        *,
        up: bool,
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                await flowing.wait()  # frozen: stop reading, so bytes stay where they are
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await flowing.wait()
                writer.write(data)
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                await writer.drain()
        # One side finished: end the other, so a closed stream closes the pair.
        writer.transport.abort()
