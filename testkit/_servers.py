"""A scripted metadata server (a worker's ``/v1/metadata`` endpoint, or any HTTP file host)
on 127.0.0.1, and free ports (the package's own ``free_port``, which ``EtcdServer`` uses)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from aiohttp import web

from discovery_mdc.card import CheckedFile, ModelDeploymentCard
from discovery_mdc.etcd._server import free_port

__all__ = ["Handler", "MetaServer", "free_port", "silent_port"]

HOST = "127.0.0.1"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
"""A scripted response for one path."""


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel completes them) and never
    answers: an etcd or HTTP server that hangs."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


class MetaServer:
    """A real aiohttp server on 127.0.0.1 (``async with MetaServer() as server``).

    ``files[path]`` is served (bytes, or a file on disk); ``handlers[path]`` scripts a
    misbehaving response; ``endless`` paths stream forever (``streamed`` counts the bytes);
    ``gated`` paths send half the body with the full Content-Length, set ``half_sent`` and
    wait for ``release``. ``gets`` counts GETs per path and ``auth`` keeps each path's last
    ``Authorization`` header.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes | Path] = {}
        self.handlers: dict[str, Handler] = {}
        self.endless: set[str] = set()
        self.gated: set[str] = set()
        self.gets: Counter[str] = Counter()
        self.auth: dict[str, str | None] = {}
        self.streamed = 0
        self.half_sent = asyncio.Event()
        self.release = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def serve(self, slug: str, f: CheckedFile) -> str:
        """Serve the file ``f`` of the card ``slug`` where a worker would; its URL."""
        path = f"/v1/metadata/{slug}/{f.basename}"
        self.files[path] = Path(f.path).read_bytes()
        return self.url(path)

    def http_card(self, card: ModelDeploymentCard) -> ModelDeploymentCard:
        """The card with every slot rewritten to a URL on this server (self-hosting)."""
        return card.with_paths(lambda _, f: self.serve(card.slug, f))

    async def __aenter__(self) -> MetaServer:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.gets[path] += 1
        self.auth[path] = request.headers.get("Authorization")
        if path in self.handlers:
            return await self.handlers[path](request)
        if path in self.endless:
            return await self._stream_forever(request)
        body = self.files.get(path)
        if body is None:
            raise web.HTTPNotFound()
        if isinstance(body, Path):
            return web.FileResponse(body)
        if path in self.gated:
            return await self._half_then_wait(request, body)
        return web.Response(body=body)

    async def _stream_forever(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked, no Content-Length
        await resp.prepare(request)
        chunk = b"x" * (1 << 16)
        while True:
            await resp.write(chunk)
            self.streamed += len(chunk)

    async def _half_then_wait(self, request: web.Request, body: bytes) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(body))})
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        self.half_sent.set()
        await self.release.wait()
        with contextlib.suppress(ConnectionResetError):  # the client may be gone (killed)
            await resp.write(body[len(body) // 2 :])
            await resp.write_eof()
        return resp
