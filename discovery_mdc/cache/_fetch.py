"""Fetchers, one per URI scheme. Each streams bytes into a :class:`Sink` under a byte cap.

Fetchers never verify: the sink hashes while it writes, and the caller compares the digest.
They only enforce the cap, so an oversized or endless body stops as soon as it passes it.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp

from discovery_mdc._hf import HfEnv, download_hint
from discovery_mdc.errors import (
    FetchError,
    HfOfflineError,
    SizeLimitError,
    SourceUnreachableError,
    UnsupportedSchemeError,
)

__all__ = [
    "FetchConfig",
    "HfOfflineError",
    "HfRef",
    "Sink",
    "fetch_uri",
    "parse_hf_uri",
]

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_HF_SEGMENT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
COPY_CHUNK: Final = 1 << 20


class Sink(Protocol):
    """Where fetched bytes go (the staging file): it hashes and counts them."""

    @property
    def received(self) -> int: ...

    def write(self, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """Network limits. ``first_byte_timeout`` bounds the wait from sending a request to its
    response head (a server that accepts connections and never answers), ``read_timeout`` a
    stall between two reads of one body, ``total_timeout`` the whole fetch. A source that
    misses the first two (or does not connect) raises :class:`SourceUnreachableError`."""

    connect_timeout: float = 10.0
    total_timeout: float = 300.0
    read_timeout: float | None = 60.0
    first_byte_timeout: float = 10.0
    max_redirects: int = 10
    chunk_size: int = 1 << 20


def _over_cap(uri: str, cap: int, got: int | None = None) -> SizeLimitError:
    detail = f" (Content-Length {got})" if got is not None else ""
    return SizeLimitError(f"{uri}: body exceeds the cap of {cap} bytes{detail}")


def _put(sink: Sink, data: bytes, cap: int, uri: str) -> None:
    if sink.received + len(data) > cap:
        raise _over_cap(uri, cap)
    sink.write(data)


async def fetch_uri(
    uri: str,
    sink: Sink,
    cap: int,
    *,
    session: aiohttp.ClientSession | None,
    config: FetchConfig,
    hf: HfEnv | None = None,
) -> None:
    """Stream ``uri`` into ``sink``, never more than ``cap`` bytes.

    ``session`` is needed only for http(s) and remote ``hf://``, ``hf`` (the Hugging Face
    settings) only for ``hf://``. Raises :class:`FetchError`, :class:`UnsupportedSchemeError`
    or :class:`SizeLimitError`.
    """
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        await _fetch_http(uri, sink, cap, _need(session, uri), config, {}, label=uri)
    elif scheme == "file":
        await _copy_in_thread(_file_path(uri), sink, cap, uri)
    elif scheme == "hf":
        if hf is None:
            raise FetchError(f"cannot fetch {uri}: no Hugging Face settings")
        await _fetch_hf(uri, sink, cap, session, config, hf)
    else:
        raise UnsupportedSchemeError(f"cannot fetch {uri}: unsupported scheme {scheme!r}")


def _need(session: aiohttp.ClientSession | None, uri: str) -> aiohttp.ClientSession:
    if session is None:
        raise FetchError(f"cannot fetch {uri}: no HTTP session")
    return session


# --------------------------------------------------------------------------- http(s)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


@dataclass(slots=True)
class _Get:
    """One GET of ``label`` (a URL, or the ``hf://`` URI it stands for), following http(s)
    redirects; ``url`` is where it has got to."""

    session: aiohttp.ClientSession
    url: str
    config: FetchConfig
    label: str
    headers: dict[str, str] = field(default_factory=dict)

    def _via(self) -> str:
        return f" (for {self.label})" if self.url != self.label else ""

    async def response(self) -> aiohttp.ClientResponse:
        """The first 2xx response (the caller closes it); raises :class:`FetchError` for any
        other status, a redirect loop or a redirect off http(s)."""
        # sock_connect, not connect: waiting for a pooled connection is not a dead host.
        per_request = aiohttp.ClientTimeout(
            total=None, sock_connect=self.config.connect_timeout, sock_read=self.config.read_timeout
        )
        for _ in range(self.config.max_redirects + 1):
            try:
                async with asyncio.timeout(self.config.first_byte_timeout):
                    resp = await self.session.get(
                        self.url, headers=self.headers, allow_redirects=False, timeout=per_request
                    )
            except TimeoutError:
                raise SourceUnreachableError(
                    f"GET {self.url}{self._via()}: timed out, no response within "
                    f"{self.config.first_byte_timeout:g}s"
                ) from None
            if 200 <= resp.status < 300:
                return resp
            async with resp:
                self._follow(resp)
        raise FetchError(f"GET {self.label}: more than {self.config.max_redirects} redirects")

    def _follow(self, resp: aiohttp.ClientResponse) -> None:
        """Move ``url`` to where a redirect points; raise for any other non-2xx answer."""
        if resp.status not in _REDIRECTS:
            reason = f" {resp.reason}" if resp.reason else ""
            raise FetchError(f"GET {self.url} returned HTTP {resp.status}{reason}{self._via()}")
        target = resp.headers.get("Location")
        if not target:
            raise FetchError(f"GET {self.url} redirected without a Location")
        nxt = urljoin(self.url, target)
        if urlsplit(nxt).scheme.lower() not in ("http", "https"):
            raise UnsupportedSchemeError(
                f"GET {self.url} redirected to {nxt}: only http(s) redirects are followed"
            )
        if _origin(nxt) != _origin(self.url):
            # Never hand a token to another host (HF redirects to a CDN).
            self.headers.pop("Authorization", None)
        self.url = nxt


async def _fetch_http(
    url: str,
    sink: Sink,
    cap: int,
    session: aiohttp.ClientSession,
    config: FetchConfig,
    headers: Mapping[str, str],
    *,
    label: str,
) -> None:
    get = _Get(session, url, config, label, {"Accept-Encoding": "identity", **headers})
    try:
        # One deadline for the whole redirect chain and body.
        async with asyncio.timeout(config.total_timeout):
            async with await get.response() as resp:
                length = resp.content_length
                if length is not None and length > cap:
                    raise _over_cap(label, cap, length)
                await _stream_body(resp, sink, cap, label, config.chunk_size)
    except aiohttp.ServerTimeoutError as exc:  # a connect or read (stall) timeout
        raise SourceUnreachableError(f"timed out fetching {label}: {_one_line(exc)}") from None
    except TimeoutError:
        raise FetchError(
            f"timed out fetching {label} (at {get.url}) after {config.total_timeout:g}s"
        ) from None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        raise SourceUnreachableError(f"fetching {label} failed: {_one_line(exc)}") from None
    except aiohttp.ClientError as exc:
        raise FetchError(f"fetching {label} failed: {_one_line(exc)}") from None


# Large bodies are written by a worker thread, so disk writes and hashing overlap reading the
# socket. Data is never held back while the writer is idle; while it is busy, arriving chunks
# are queued (up to MAX_BUFFERED bytes, then the reader waits), which keeps memory bounded.
WRITE_BATCH = 1 << 20
MAX_BUFFERED = 4 * WRITE_BATCH


async def _stream_body(
    resp: aiohttp.ClientResponse, sink: Sink, cap: int, label: str, chunk_size: int
) -> None:
    chunks = resp.content.iter_chunked(chunk_size)
    length = resp.content_length
    if length is not None and length <= WRITE_BATCH:
        async for chunk in chunks:  # small body: a thread hop would cost more than it saves
            _put(sink, chunk, cap, label)
        return
    received = 0
    batch: list[bytes] = []
    batched = 0
    pending: asyncio.Future[None] | None = None
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > cap:
                raise _over_cap(label, cap)
            batch.append(chunk)
            batched += len(chunk)
            if pending is not None and not pending.done() and batched < MAX_BUFFERED:
                continue
            if pending is not None:
                await asyncio.shield(pending)
            pending = asyncio.ensure_future(asyncio.to_thread(_write_all, sink, batch))
            batch, batched = [], 0
        if pending is not None:
            await asyncio.shield(pending)
        _write_all(sink, batch)
    finally:
        # Never return (and let the caller close the sink) while a write is still running.
        if pending is not None and not pending.done():
            await asyncio.wait({pending})
            if not pending.cancelled():
                pending.exception()  # retrieved; the error already raised is what counts


def _write_all(sink: Sink, chunks: list[bytes]) -> None:
    for chunk in chunks:  # no joining: each chunk is written and hashed as it came
        sink.write(chunk)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line (aiohttp messages can quote whole bodies)."""
    if isinstance(exc, aiohttp.ClientResponseError):
        text = f"HTTP {exc.status} {exc.message}"
    else:
        text = str(exc)
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------- file


def _file_path(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise UnsupportedSchemeError(f"cannot fetch {uri}: file URIs must name a local path")
    return unquote(parts.path)


async def _copy_in_thread(path: str, sink: Sink, cap: int, label: str) -> None:
    """:func:`copy_file` in a thread. On cancellation the thread is stopped and awaited
    before returning, so the caller never closes the sink under a running writer."""
    stop = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(copy_file, path, sink, cap, label, stop))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller sees
        raise


def copy_file(
    path: str, sink: Sink, cap: int, label: str, stop: threading.Event | None = None
) -> None:
    """Copy a local regular file into ``sink``, refusing more than ``cap`` bytes."""
    try:
        # O_NONBLOCK: opening a FIFO named by a hostile card must not hang.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise FetchError(f"cannot read {label}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FetchError(f"cannot read {label}: not a regular file")
        if st.st_size > cap:
            raise SizeLimitError(f"{label}: file has {st.st_size} bytes, above the cap of {cap}")
        while True:
            try:
                chunk = os.read(fd, min(COPY_CHUNK, cap - sink.received + 1))
            except OSError as exc:
                raise FetchError(f"cannot read {label}: {exc.strerror}") from None
            if not chunk or (stop is not None and stop.is_set()):
                return
            _put(sink, chunk, cap, label)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- hf


@dataclass(frozen=True, slots=True)
class HfRef:
    """A parsed ``hf://<repo>[@<revision>]/<filename>``."""

    repo: str
    revision: str
    filename: str


# A branch, tag, ``refs/pr/N`` or commit: relative, no empty or dot segments, no NUL. The
# revision names a file under ``refs/``, so an absolute or odd one must never reach the path.
_HF_REVISION = re.compile(r"[A-Za-z0-9_.-][A-Za-z0-9_./-]{0,199}")


def parse_hf_uri(uri: str) -> HfRef:
    """Parse ``hf://org/name[@rev]/file`` (or ``hf://name[@rev]/file``); the last segment is
    the file name, and a revision may itself hold ``/`` (``refs/pr/1``)."""
    if not uri.lower().startswith("hf://"):
        raise UnsupportedSchemeError(f"not an hf:// URI: {uri}")
    body = uri[len("hf://") :]
    head, _, filename = body.rpartition("/")
    filename = unquote(filename)
    repo, at, revision = head.partition("@")
    revision = unquote(revision) if at else "main"
    segments = repo.split("/")
    if (
        not filename
        or filename in (".", "..")
        or "/" in filename
        or not 1 <= len(segments) <= 2
        or not all(_HF_SEGMENT.fullmatch(s) and ".." not in s for s in segments)
        or not _HF_REVISION.fullmatch(revision)
        or any(part in ("", ".", "..") for part in revision.split("/"))
    ):
        raise FetchError(f"invalid hf:// URI {uri!r}: expected hf://<org>/<name>[@<rev>]/<file>")
    return HfRef(repo, revision, filename)


async def _fetch_hf(
    uri: str,
    sink: Sink,
    cap: int,
    session: aiohttp.ClientSession | None,
    config: FetchConfig,
    hf: HfEnv,
) -> None:
    ref = parse_hf_uri(uri)
    local = await asyncio.to_thread(hf.local_file, ref.repo, ref.revision, ref.filename)
    if local is not None:
        await _copy_in_thread(os.fspath(local), sink, cap, uri)
        return
    if hf.offline:
        raise HfOfflineError(
            f"cannot fetch {uri}: not in the local HF cache ({hf.hub_cache}) and "
            f"HF_HUB_OFFLINE is set; run {download_hint(ref.repo)} where the network is "
            "reachable"
        )
    url = hf.resolve_url(ref.repo, ref.revision, ref.filename)
    token = await asyncio.to_thread(hf.token)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    await _fetch_http(url, sink, cap, _need(session, uri), config, headers, label=uri)
