"""The worker's status server: self-hosted metadata, health and metrics on aiohttp.

Routes::

    GET|HEAD /v1/metadata/<slug>/<filename>
    GET|HEAD /v1/metadata/<namespace>/<component>/<endpoint>/<slug>/<suffix>/<filename>
    GET      /health            {"status": "ready"} 200, or {"status": "notready"} 503
    GET      /live              {"status": "live"} 200 while the process serves requests
    GET      /metrics           Prometheus text (a per-server CollectorRegistry)

A metadata request is answered only when its *raw* request path (exactly as received, before
any percent-decoding or dot-segment normalisation) names a key in the
:class:`MetadataRegistry`. Registered names are plain URL-safe names, so traversal, encoded
slashes, absolute names and anything else simply never match: 404.

Slowloris: a connection that has not sent a complete request head ``header_timeout`` seconds
after it was accepted, or after its previous response, is closed. At most
``max_connections`` are open (by default about half the file descriptors the process may
still open, after room for the accept bursts the listen backlog allows, so accepting never
fails with EMFILE). A new connection beyond that closes the one that has waited longest for
a request head (a stalled attacker, never a client being served), or is itself closed when
every connection is busy.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import mimetypes
import os
import resource
import socket
import stat
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry, Counter, Gauge

from discovery_mdc import _env
from discovery_mdc._lifecycle import AsyncService
from discovery_mdc._metrics import add_standard_collectors, metrics_response
from discovery_mdc.worker._advertise import advertise_host, format_host_for_url
from discovery_mdc.worker._registry import MetadataRegistry, RegisteredFile

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_SYSTEM_HOST",
    "METADATA_PREFIX",
    "StatusServer",
    "default_backlog",
    "default_max_connections",
]

log = logging.getLogger("discovery_mdc.worker")

METADATA_PREFIX: Final = "/v1/metadata/"
DEFAULT_SYSTEM_HOST: Final = _env.DEFAULT_SYSTEM_HOST
# Longer than any valid key (5 segments of at most 255 characters and a file name of at most
# 255 bytes, each percent-encoded to 3 characters), so a cheap first cut.
_MAX_RAW_PATH: Final = len(METADATA_PREFIX) + 5 * 256 + 3 * 256
_FALLBACK_CHUNK: Final = 1 << 18
#: Seconds a connection may take to send a request head (after accept or after a response).
#: Above an HTTP client's usual 15 s keep-alive, so clients close idle connections first.
DEFAULT_HEADER_TIMEOUT: Final = 20.0
# Descriptors kept for everything but client connections (etcd, logs, the event loop).
_FD_RESERVE: Final = 64
_MAX_CONNECTIONS: Final = 4096
_MAX_BACKLOG: Final = 1024
_CAP_LOG_INTERVAL: Final = 60.0

HealthCheck = Callable[[], bool]


def _metadata_key(raw_path: str) -> str | None:
    """The registry key a raw request path asks for, or None if it cannot be one."""
    path = raw_path.split("?", 1)[0]
    if len(path) > _MAX_RAW_PATH or not path.startswith(METADATA_PREFIX):
        return None
    return path[len(METADATA_PREFIX) :]


def _fd_budget() -> int | None:
    """Descriptors this process may open for connections (None: unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else max(0, soft - _FD_RESERVE)


def default_backlog() -> int:
    """The listen backlog: an eighth of :func:`_fd_budget`, 16 to 1024.

    asyncio accepts up to ``backlog`` connections in one turn of the loop, before any of them
    reaches the connection cap, so a backlog near the descriptor limit would let a burst of
    connections end in EMFILE.
    """
    budget = _fd_budget()
    return _MAX_BACKLOG if budget is None else max(16, min(_MAX_BACKLOG, budget // 8))


def default_max_connections() -> int:
    """The connection cap: what is left of the descriptors after three accept bursts (the
    loop turns before an evicted connection's descriptor is closed), halved because each
    connection may hold a file open while it is served; 8 to 4096."""
    budget = _fd_budget()
    if budget is None:
        return _MAX_CONNECTIONS
    return max(8, min(_MAX_CONNECTIONS, (budget - 3 * default_backlog()) // 2))


class _ConnectionGuard:
    """Header-read timeout and connection cap for one aiohttp server (see the module doc).

    A connection is *waiting* from its accept, and again from the end of each response, until
    a request head arrives (the app's first middleware calls :meth:`busy`/:meth:`done`).
    ``waiting`` keeps insertion order, so its first entry has waited longest.
    """

    def __init__(self, limit: int, header_timeout: float, on_close: Callable[[str], None]) -> None:
        self.limit = limit
        self.header_timeout = header_timeout
        self._on_close = on_close
        self._waiting: dict[RequestHandler, asyncio.TimerHandle] = {}
        self._busy: set[RequestHandler] = set()
        self._capped = 0
        self._capped_logged_at = -_CAP_LOG_INTERVAL

    def __len__(self) -> int:
        return len(self._waiting) + len(self._busy)

    def install(self, server: web.Server) -> None:
        """Hook the server's connection callbacks (aiohttp has no public hook for them)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self.opened(handler)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            self.closed(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def opened(self, handler: RequestHandler) -> None:
        if len(self) >= self.limit:
            victim = next(iter(self._waiting), None)
            self._note_cap()
            if victim is None:
                self._close(handler, "refused")  # every connection is being served
                return
            self._close(victim, "evicted")
        self._wait(handler)

    def busy(self, handler: RequestHandler) -> None:
        timer = self._waiting.pop(handler, None)
        if timer is not None:
            timer.cancel()
            self._busy.add(handler)

    def done(self, handler: RequestHandler) -> None:
        if handler in self._busy:
            self._busy.discard(handler)
            self._wait(handler)

    def closed(self, handler: RequestHandler) -> None:
        self._busy.discard(handler)
        timer = self._waiting.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def _wait(self, handler: RequestHandler) -> None:
        loop = asyncio.get_running_loop()
        self._waiting[handler] = loop.call_later(self.header_timeout, self._expire, handler)

    def _expire(self, handler: RequestHandler) -> None:
        if handler in self._waiting:
            self._close(handler, "header_timeout")

    def _close(self, handler: RequestHandler, reason: str) -> None:
        self.closed(handler)
        handler.force_close()
        self._on_close(reason)

    def _note_cap(self) -> None:
        # One line a minute at most: an attack must not fill the log.
        self._capped += 1
        now = time.monotonic()
        if now - self._capped_logged_at >= _CAP_LOG_INTERVAL:
            log.warning(
                "status server: %d connections open (the cap); %d new connection(s) made "
                "room by closing the longest-waiting one (or were refused)",
                self.limit,
                self._capped,
            )
            self._capped, self._capped_logged_at = 0, now


def _open_checked(registered: RegisteredFile) -> IO[bytes]:
    """Open a registered file and check it is still the regular file of the registered size.

    Runs in a thread. Raises ``OSError`` with a message naming the file on any problem.
    The registered path is already resolved, so a symlink there now (a file swapped for a
    link to, say, ``/etc/passwd``) is refused rather than followed.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fobj = os.fdopen(os.open(registered.path, flags), "rb")
    try:
        st = os.fstat(fobj.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{registered.path} is no longer a regular file")
        if st.st_size != registered.size:
            raise OSError(
                f"{registered.path} changed since registration: size {st.st_size}, "
                f"registered {registered.size}"
            )
    except BaseException:
        fobj.close()
        raise
    return fobj


class StatusServer(AsyncService):
    """The worker's status server. ``await start()`` binds it; ``await close()`` shuts it down.

    ``health`` decides /health (``None`` means always ready); it may be replaced
    at any time, e.g. once the publisher exists. ``advertise`` overrides the host put in
    :attr:`base_url` (default: :func:`advertise_host` of the bind host). Usable as
    ``async with``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: MetadataRegistry,
        health: HealthCheck | None = None,
        advertise: str | None = None,
        shutdown_timeout: float = 5.0,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        max_connections: int | None = None,
    ) -> None:
        self.host = host
        self.registry = registry
        self.health = health
        self._requested_port = _env.check_port(port)
        self._advertise = advertise
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._base_url: str | None = None

        self.metrics = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "discovery_mdc_metadata_requests",
            "Requests to /v1/metadata/, by response status code.",
            ["status"],
            registry=self.metrics,
        )
        self._bytes = Counter(
            "discovery_mdc_metadata_sent_bytes",
            "Metadata file bytes sent, by response status code.",
            ["status"],
            registry=self.metrics,
        )
        registered = Gauge(
            "discovery_mdc_metadata_registered_files",
            "Metadata files currently registered for self-hosting.",
            registry=self.metrics,
        )
        registered.set_function(lambda: float(self.registry.file_count()))
        add_standard_collectors(self.metrics)
        closed = Counter(
            "discovery_mdc_status_connections_closed",
            "Connections the status server closed itself, by reason: header_timeout (no "
            "request head in time), evicted or refused (at the connection cap).",
            ["reason"],
            registry=self.metrics,
        )
        self._guard = _ConnectionGuard(
            default_max_connections() if max_connections is None else max_connections,
            header_timeout,
            lambda reason: closed.labels(reason).inc(),
        )
        Gauge(
            "discovery_mdc_status_connections",
            "Connections open to the status server.",
            registry=self.metrics,
        ).set_function(lambda: float(len(self._guard)))

    @classmethod
    def from_env(
        cls,
        *,
        registry: MetadataRegistry,
        health: HealthCheck | None = None,
        port: int | None = None,
        host: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> StatusServer | None:
        """A (not yet started) server on ``DYN_SYSTEM_HOST`` (default ``0.0.0.0``) and
        ``DYN_SYSTEM_PORT`` (``0``: a random port), or ``None`` when no port is set (unset or
        empty). ``port``/``host``, when given, beat the variables.

        Raises :class:`~discovery_mdc.errors.ConfigError` naming a variable with a bad value.
        """
        if port is None:
            port = _env.SYSTEM_PORT.get(env)
        if port is None:
            return None
        return cls(host or _env.SYSTEM_HOST.get(env), port, registry=registry, health=health)

    # ------------------------------------------------------------------ lifecycle

    @property
    def is_running(self) -> bool:
        return self._runner is not None

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("status server is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://<advertise-host>:<port>``, the prefix of every self-hosted URL."""
        if self._base_url is None:
            raise RuntimeError("status server is not running")
        return self._base_url

    async def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        if self._runner is not None:
            return self.port
        app = web.Application(middlewares=[self._track_busy, self._count_metadata])
        app.router.add_get(METADATA_PREFIX + "{tail:.*}", self._metadata)  # also HEAD
        app.router.add_get("/health", self._health)
        app.router.add_get("/live", self._live)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=self._shutdown_timeout)
        await runner.setup()
        assert runner.server is not None
        self._guard.install(runner.server)
        try:
            site = self._site(runner)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        host = self._advertise or advertise_host(self.host)
        self._base_url = f"http://{format_host_for_url(host)}:{self._port}"
        log.info(
            "status server listening on %s:%d; metadata advertised at %s%s",
            self.host,
            self._port,
            self._base_url,
            METADATA_PREFIX,
        )
        return self._port

    def _site(self, runner: web.AppRunner) -> web.BaseSite:
        bind = self.host.strip("[]") or DEFAULT_SYSTEM_HOST
        if bind in ("::", "::0"):
            # asyncio makes IPv6 listeners v6-only; "every interface" should include IPv4,
            # which is also what advertise_host() prefers for a wildcard.
            sock: socket.socket | None = None
            try:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", self._requested_port))
            except OSError as exc:
                if sock is not None:
                    sock.close()
                if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    raise  # e.g. the port is taken: an IPv4-only fallback would hide that
                log.warning("cannot bind dual-stack [::]: %s; binding 0.0.0.0 instead", exc)
            else:
                return web.SockSite(runner, sock, backlog=default_backlog())
            bind = DEFAULT_SYSTEM_HOST
        return web.TCPSite(runner, bind, self._requested_port, backlog=default_backlog())

    async def close(self) -> None:
        """Stop serving and close every connection. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("status server on port %s stopped", self._port)

    # ------------------------------------------------------------------ handlers

    @web.middleware
    async def _track_busy(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Any],
    ) -> web.StreamResponse:
        protocol = request.protocol
        self._guard.busy(protocol)
        try:
            response: web.StreamResponse = await handler(request)
            return response
        finally:
            self._guard.done(protocol)

    @web.middleware
    async def _count_metadata(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Any],
    ) -> web.StreamResponse:
        if not request.raw_path.startswith(METADATA_PREFIX):
            response: web.StreamResponse = await handler(request)
            return response
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            self._requests.labels(str(exc.status)).inc()
            raise
        except Exception:
            self._requests.labels("500").inc()  # aiohttp answers 500 and logs it
            raise
        self._requests.labels(str(response.status)).inc()
        return response

    async def _metadata(self, request: web.Request) -> web.StreamResponse:
        key = _metadata_key(request.raw_path)
        registered = self.registry.lookup(key) if key is not None else None
        if registered is None:
            return web.Response(status=404, text="404: Not Found")
        assert key is not None

        etag = registered.etag
        if (inm := request.if_none_match) is not None and any(e.value in ("*", etag) for e in inm):
            not_modified = web.Response(status=304)
            not_modified.etag = etag
            return not_modified

        try:
            fobj = await asyncio.to_thread(_open_checked, registered)
        except OSError as exc:
            log.error("cannot serve metadata %s from %s: %s", key, registered.path, exc)
            return web.Response(status=500, text="500: Internal Server Error")
        try:
            return await self._send(request, fobj, key, registered)
        finally:
            fobj.close()

    async def _send(
        self, request: web.Request, fobj: IO[bytes], key: str, registered: RegisteredFile
    ) -> web.StreamResponse:
        """Headers, then the body with ``loop.sendfile`` (zero-copy), as ``web.FileResponse``.

        ``web.FileResponse`` itself is not used because it would put its own mtime-based
        ETag (and conditional-request logic) in place of the blake3, substitute a ``.gz`` or
        ``.br`` sibling of the file when the client accepts that encoding (serving bytes that
        were never registered), and answer a vanished file with 404 instead of 500. The file
        is opened and checked before the headers go out, so the body comes from that very
        file descriptor.
        """
        filename = key.rsplit("/", 1)[-1]
        response = web.StreamResponse(status=200)
        response.content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        response.content_length = registered.size
        response.etag = registered.etag
        writer = await response.prepare(request)
        if request.method == "HEAD" or registered.size == 0:
            return response
        transport = request.transport
        try:
            if transport is None:
                raise ConnectionResetError("connection lost before the body")
            loop = asyncio.get_running_loop()
            try:
                await loop.sendfile(transport, fobj, 0, registered.size)
            except NotImplementedError:
                await self._send_fallback(writer, fobj, registered.size)
            await response.write_eof()
        except ConnectionError as exc:
            log.debug("client went away while sending metadata %s: %s", key, exc)
            return response
        except OSError as exc:
            # Headers are out, so a 500 is impossible; close so the client sees a short body.
            log.error("sending metadata %s from %s failed: %s", key, registered.path, exc)
            if transport is not None:
                transport.close()
            return response
        self._bytes.labels("200").inc(registered.size)
        return response

    @staticmethod
    async def _send_fallback(writer: Any, fobj: IO[bytes], count: int) -> None:
        while count > 0:
            chunk = await asyncio.to_thread(fobj.read, min(_FALLBACK_CHUNK, count))
            if not chunk:
                raise OSError("file shrank while sending")
            await writer.write(chunk)
            count -= len(chunk)

    def _ready(self) -> bool:
        if self.health is None:
            return True
        try:
            return bool(self.health())
        except Exception:
            log.exception("health check raised; reporting not ready")
            return False

    async def _health(self, request: web.Request) -> web.Response:
        ready = self._ready()
        return web.Response(
            status=200 if ready else 503,
            text=json.dumps({"status": "ready" if ready else "notready"}),
            content_type="application/json",
        )

    async def _live(self, request: web.Request) -> web.Response:
        # Liveness follows this process only: an etcd outage must not restart every worker.
        return web.json_response({"status": "live"})

    async def _metrics(self, request: web.Request) -> web.Response:
        return metrics_response(self.metrics)
