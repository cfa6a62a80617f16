"""EtcdClient: an asyncio client for etcd's v3 JSON gateway (``POST /v3/...``) on aiohttp.

Failover: every request starts at the endpoint that last worked. On a connection error, a
timeout, a 502/503/504 from a proxy, or gRPC ``UNAVAILABLE`` (no leader, leader changed) it
tries the next endpoint, round-robin; after ``connect_retries`` rounds over all endpoints, with
a short jittered pause between rounds, it raises :class:`EtcdConnectionError` naming every
endpoint and the last error.

Retried writes: a request that failed after it was sent may have been applied. ``put`` and
``delete`` are idempotent in effect. ``create`` notices when a retried attempt finds the key
already holding exactly its value and lease, and then reports success. ``lease_grant`` may
leave an orphan lease behind, which expires after its TTL.

Watches are never resumed here: ``watch()`` raises on a disconnect or a compaction, and the
caller resumes from the highest ``WatchResponse.header_revision`` it has seen, plus one::

    rev = listed.revision
    while True:
        try:
            async for resp in client.watch(prefix, start_revision=rev + 1):
                handle(resp.events)
                rev = max(rev, resp.header_revision)
        except EtcdConnectionError:
            await asyncio.sleep(backoff.next_delay())
        except EtcdCompactedError:
            rev = relist_and_diff()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from discovery_mdc import _env
from discovery_mdc._backoff import Backoff
from discovery_mdc._clock import Sleep
from discovery_mdc._lifecycle import AsyncService
from discovery_mdc.errors import (
    EtcdAuthError,
    EtcdCompactedError,
    EtcdConnectionError,
    EtcdError,
    EtcdTlsError,
)
from discovery_mdc.etcd._codec import (
    GRPC_NOT_FOUND,
    GRPC_OUT_OF_RANGE,
    GRPC_PERMISSION_DENIED,
    GRPC_UNAUTHENTICATED,
    GRPC_UNAVAILABLE,
    GatewayError,
    KeyValue,
    Lease,
    LeaseInfo,
    LineSplitter,
    RangeResult,
    WatchMessage,
    WatchResponse,
    create_txn_request,
    decode_delete,
    decode_error,
    decode_lease_grant,
    decode_lease_keepalive,
    decode_lease_time_to_live,
    decode_put,
    decode_range,
    decode_status,
    decode_txn,
    decode_watch_line,
    delete_request,
    key_bytes,
    key_str,
    prefix_range_end,
    put_request,
    range_request,
    watch_create_request,
)

__all__ = ["DEFAULT_ENDPOINT", "EtcdClient", "endpoints_from_env"]

log = logging.getLogger("discovery_mdc.etcd")

DEFAULT_ENDPOINT = _env.DEFAULT_ENDPOINT
_RETRYABLE_HTTP = frozenset({502, 503, 504})
# TCP keepalive on every etcd connection: an idle connection (a quiet watch) to a host that
# vanished fails after about KEEPIDLE + KEEPINTVL * KEEPCNT seconds instead of never.
KEEPALIVE_IDLE = 5
KEEPALIVE_INTERVAL = 2
KEEPALIVE_COUNT = 3
#: The longest pause between two rounds over the endpoints.
_ROUND_PAUSE_MAX = 1.0
_T = TypeVar("_T")


class _Retryable(Exception):
    """This endpoint failed in a way another endpoint may not: try the next one.

    ``tls`` marks a TLS handshake refused on certificates: if every endpoint says so, more
    rounds will not help."""

    def __init__(self, message: str, *, tls: bool = False) -> None:
        super().__init__(message)
        self.tls = tls


def _certificate_problem(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is a TLS handshake failing on certificates: not
    trusted, refused, missing. Retrying does not fix those."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError):
            return True
        if isinstance(seen, ssl.SSLError):
            reason = str(getattr(seen, "reason", "") or seen).upper()
            return "CERTIFICATE" in reason or "UNKNOWN_CA" in reason
        os_error = getattr(seen, "os_error", None)
        seen = (
            os_error
            if isinstance(os_error, BaseException)
            else (seen.__cause__ or seen.__context__)
        )
    return False


#: etcd's gRPC gateway refuses a client certificate with a CommonName when auth is on
#: (etcd-io/etcd#10366, #17025); etcdctl and Dynamo use gRPC and are not affected.
_GATEWAY_CN = b"CommonName of client sending a request against gateway"


class _InvalidToken(Exception):
    """The auth token expired or is unknown: authenticate again."""


class _StatusError(EtcdError):
    """etcd answered with a gRPC error; ``code`` is the gRPC status code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class _Reply:
    body: Mapping[str, Any]
    endpoint: str
    # True if an earlier attempt may have reached etcd (so a write may already be applied).
    retried_after_send: bool
    size: int = 0  # bytes of the response body


def endpoints_from_env(env: Mapping[str, str] | None = None) -> list[str]:
    """``ETCD_ENDPOINTS`` split on commas; bare ``host:port`` gets ``http://`` (``https://``
    when ``ETCD_AUTH_CA`` or ``ETCD_AUTH_CLIENT_CERT`` is set). Raises
    :class:`~discovery_mdc.errors.ConfigError` for a malformed value."""
    tls = bool(_env.ETCD_AUTH_CA.get(env) or _env.ETCD_AUTH_CLIENT_CERT.get(env))
    raw = _env.ETCD_ENDPOINTS.get(env)
    return [_normalize_endpoint(e, tls) for e in raw.split(",") if e.strip()]


def _normalize_endpoint(endpoint: str, tls: bool) -> str:
    endpoint = endpoint.strip().rstrip("/")
    if "://" not in endpoint:
        endpoint = ("https://" if tls else "http://") + endpoint
    return endpoint


class EtcdClient(AsyncService):
    """Async etcd v3 client over the JSON gateway, with endpoint failover and auth.

    Use as ``async with EtcdClient([...]) as client:`` or call :meth:`close`. A request
    tries every endpoint up to ``connect_retries`` times, pausing between rounds for a
    jittered exponential backoff from ``retry_backoff`` seconds (``rng`` and ``sleep`` are
    injectable, as in :class:`~discovery_mdc.etcd.LeaseSession`).
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        request_timeout: float = 5.0,
        connect_retries: int = 5,
        retry_backoff: float = 0.1,
        rng: Callable[[], float] = random.random,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = endpoints.split(",")
        tls = bool(ca_file or cert_file)
        self._endpoints = tuple(_normalize_endpoint(e, tls) for e in endpoints if e.strip())
        if not self._endpoints:
            raise ValueError("EtcdClient needs at least one endpoint")
        if (username is None) != (password is None):
            raise ValueError("etcd username and password must be given together")
        self._username = username
        self._password = password
        self._ca_file = ca_file
        self._cert_file = cert_file
        self._key_file = key_file
        self._request_timeout = request_timeout
        self._connect_retries = max(1, connect_retries)
        self._retry_backoff = retry_backoff
        self._rng = rng
        self._sleep = sleep
        self._current = 0
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> EtcdClient:
        """A client configured from ``ETCD_ENDPOINTS``, ``ETCD_AUTH_USERNAME``/``_PASSWORD``
        and ``ETCD_AUTH_CA``/``_CLIENT_CERT``/``_CLIENT_KEY``; ``kwargs`` (``endpoints`` too)
        override."""
        opts: dict[str, Any] = {
            "username": _env.ETCD_AUTH_USERNAME.get(env),
            "password": _env.ETCD_AUTH_PASSWORD.get(env),
            "ca_file": _env.ETCD_AUTH_CA.get(env),
            "cert_file": _env.ETCD_AUTH_CLIENT_CERT.get(env),
            "key_file": _env.ETCD_AUTH_CLIENT_KEY.get(env),
        }
        if opts["username"] is not None and opts["password"] is None:
            opts["password"] = ""
        opts.update(kwargs)
        endpoints = opts.pop("endpoints", None)
        return cls(endpoints if endpoints is not None else endpoints_from_env(env), **opts)

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every endpoint, in configuration order."""
        return self._endpoints

    @property
    def current_endpoint(self) -> str:
        """The endpoint the next request tries first (the one that last worked)."""
        return self._endpoints[self._current]

    async def close(self) -> None:
        """Close the HTTP session. Open watches end with EtcdConnectionError."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not (self._ca_file or self._cert_file):
            return None
        ctx = ssl.create_default_context(cafile=self._ca_file)
        if self._cert_file:
            ctx.load_cert_chain(self._cert_file, self._key_file)
        return ctx

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            ctx = self._ssl_context()
            connector = aiohttp.TCPConnector(
                ssl=ctx if ctx is not None else True, socket_factory=_keepalive_socket
            )
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    # ------------------------------------------------------------------ transport

    def _classify(self, endpoint: str, path: str, err: GatewayError) -> Exception:
        where = f"etcd {endpoint}{path}"
        msg = err.message
        lower = msg.lower()
        if err.code == GRPC_UNAVAILABLE:
            return _Retryable(f"{where}: {msg}")
        if err.code == GRPC_UNAUTHENTICATED or "invalid auth token" in lower:
            return _InvalidToken(f"{where}: {msg}")
        if err.code == GRPC_PERMISSION_DENIED or "permission denied" in lower:
            who = f" for user {self._username!r}" if self._username else ""
            return EtcdAuthError(f"{where}: permission denied{who}: {msg}")
        if "user name is empty" in lower:
            return EtcdAuthError(
                f"{where}: etcd requires authentication ({msg}); "
                "set ETCD_AUTH_USERNAME and ETCD_AUTH_PASSWORD"
            )
        if "authentication failed" in lower:
            return EtcdAuthError(
                f"{where}: etcd rejected the credentials for user {self._username!r}: {msg}"
            )
        if err.code == GRPC_OUT_OF_RANGE and "compacted" in lower:
            return EtcdCompactedError(0, f"{where}: {msg}")
        return _StatusError(f"{where}: {msg} (gRPC code {err.code})", err.code)

    async def _post_once(
        self,
        endpoint: str,
        path: str,
        payload: Mapping[str, Any],
        headers: Mapping[str, str],
        attempt_timeout: float | None = None,
    ) -> tuple[Mapping[str, Any], int]:
        """One POST to one endpoint: (the JSON body, its size in bytes)."""
        url = endpoint + path
        limit = aiohttp.ClientTimeout(total=attempt_timeout or self._request_timeout)
        try:
            async with self._http().post(
                url, data=json.dumps(payload), headers=headers, timeout=limit
            ) as resp:
                status = resp.status
                raw = await resp.read()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise _Retryable(
                f"{url}: {type(exc).__name__}: {exc}".rstrip(": "), tls=_certificate_problem(exc)
            ) from exc
        if status == 400 and raw.startswith(_GATEWAY_CN):
            raise self._gateway_cn_error(endpoint)
        try:
            body = json.loads(raw.splitlines()[0] if raw.strip() else b"{}")
        except ValueError:
            if status in _RETRYABLE_HTTP:
                raise _Retryable(f"{url}: HTTP {status}") from None
            raise EtcdError(
                f"etcd {url}: HTTP {status} with a non-JSON body {raw[:200]!r}"
            ) from None
        err = decode_error(body)
        if err is not None:
            raise self._classify(endpoint, path, err)
        if status != 200:
            if status in _RETRYABLE_HTTP:
                raise _Retryable(f"{url}: HTTP {status}")
            raise EtcdError(f"etcd {url}: HTTP {status}: {raw[:200]!r}")
        if not isinstance(body, Mapping):
            raise EtcdError(f"etcd {url}: unexpected response {raw[:200]!r}")
        return body, len(raw)

    def _gateway_cn_error(self, endpoint: str) -> EtcdAuthError:
        return EtcdAuthError(
            f"etcd {endpoint} refuses the client certificate {self._cert_file}: it has a "
            "CommonName and etcd auth is on, which etcd's JSON gateway (the API discovery-mdc "
            "uses) does not support (etcd-io/etcd#10366); use a client certificate without a "
            "CommonName together with ETCD_AUTH_USERNAME/ETCD_AUTH_PASSWORD, or "
            "ETCD_AUTH_USERNAME/ETCD_AUTH_PASSWORD over TLS without a client certificate"
        )

    async def _failover(
        self, path: str, attempt: Callable[[str], Awaitable[_T]]
    ) -> tuple[_T, str, bool]:
        """Run ``attempt(endpoint)`` round-robin from the current endpoint until one works.

        Up to ``connect_retries`` rounds over all endpoints, with a jittered exponential pause
        (:class:`~discovery_mdc._backoff.Backoff`, at most :data:`_ROUND_PAUSE_MAX`) between
        rounds. Returns (result, endpoint, whether an earlier attempt may have reached etcd).
        """
        failures: list[_Retryable] = []
        backoff = Backoff(self._retry_backoff, _ROUND_PAUSE_MAX, self._rng)
        for round_no in range(self._connect_retries):
            if round_no:
                await self._sleep(backoff.next_delay())
            done = await self._one_round(path, attempt, failures)
            if done is not None:
                # Only a refused or failed connect proves the request never left.
                maybe_sent = any(
                    not isinstance(f.__cause__, aiohttp.ClientConnectorError) for f in failures
                )
                return done[0], done[1], maybe_sent
            if all(f.tls for f in failures[-len(self._endpoints) :]):
                raise EtcdTlsError(
                    f"TLS handshake with etcd refused on certificates for {path} (tried "
                    f"{', '.join(self._endpoints)}; check ETCD_AUTH_CA, ETCD_AUTH_CLIENT_CERT "
                    f"and ETCD_AUTH_CLIENT_KEY): {failures[-1]}"
                )
        raise EtcdConnectionError(
            f"no etcd endpoint reachable for {path} (tried {', '.join(self._endpoints)}, "
            f"{self._connect_retries} round(s)); last error: {failures[-1]}"
        )

    async def _one_round(
        self, path: str, attempt: Callable[[str], Awaitable[_T]], failures: list[_Retryable]
    ) -> tuple[_T, str] | None:
        """Try every endpoint once, from the current one: (result, endpoint) from the first
        that works, or None (each failure appended to ``failures``)."""
        n = len(self._endpoints)
        start = self._current
        for i in range(n):
            idx = (start + i) % n
            endpoint = self._endpoints[idx]
            try:
                result = await attempt(endpoint)
            except _Retryable as exc:
                failures.append(exc)
                log.debug("etcd %s%s failed (%s); trying the next endpoint", endpoint, path, exc)
                continue
            if self._current != idx:
                log.info("etcd: now using endpoint %s", endpoint)
            self._current = idx
            return result, endpoint
        return None

    async def _auth_headers(self, *, refresh: bool = False) -> dict[str, str]:
        if self._username is None:
            return {}
        async with self._auth_lock:
            if refresh or self._token is None:
                self._token = await self._authenticate()
            return {"Authorization": self._token} if self._token else {}

    async def _authenticate(self) -> str:
        payload = {"name": self._username, "password": self._password}

        async def attempt(endpoint: str) -> tuple[Mapping[str, Any], int]:
            return await self._post_once(endpoint, "/v3/auth/authenticate", payload, {})

        try:
            (body, _), endpoint, _ = await self._failover("/v3/auth/authenticate", attempt)
        except _StatusError as exc:
            if "authentication is not enabled" in str(exc):
                return ""  # credentials configured but auth off: send no token
            raise EtcdAuthError(f"authenticating user {self._username!r}: {exc}") from exc
        except _InvalidToken as exc:
            raise EtcdAuthError(f"authenticating user {self._username!r}: {exc}") from exc
        token = str(body.get("token", ""))
        if not token:
            raise EtcdAuthError(f"etcd {endpoint} returned no token for user {self._username!r}")
        return token

    async def _request(
        self, path: str, payload: Mapping[str, Any], *, attempt_timeout: float | None = None
    ) -> _Reply:
        refresh = False
        while True:
            headers = await self._auth_headers(refresh=refresh)

            async def attempt(endpoint: str) -> tuple[Mapping[str, Any], int]:
                return await self._post_once(
                    endpoint,
                    path,
                    payload,
                    headers,  # noqa: B023 - used before the loop moves on
                    attempt_timeout,
                )

            try:
                (body, size), endpoint, retried = await self._failover(path, attempt)
            except _InvalidToken as exc:
                if refresh or self._username is None:
                    raise EtcdAuthError(f"{exc} (user {self._username!r})") from exc
                refresh = True
                log.info(
                    "etcd auth token for user %r rejected; authenticating again", self._username
                )
                continue
            return _Reply(body, endpoint, retried, size)

    # ------------------------------------------------------------------ KV

    async def range(
        self,
        key: str,
        *,
        prefix: bool = False,
        revision: int | None = None,
        limit: int | None = None,
        keys_only: bool = False,
        count_only: bool = False,
        min_mod_revision: int | None = None,
        attempt_timeout: float | None = None,
    ) -> RangeResult:
        """Read one key, or every key under ``key`` if ``prefix``, at ``revision`` (default
        latest), at most ``limit`` keys (``more`` tells if there were others).

        ``keys_only`` leaves values out, ``count_only`` returns only ``count``, and
        ``min_mod_revision`` returns only keys modified at or after it (``count`` still
        counts every key in the range). ``attempt_timeout`` bounds each attempt on one
        endpoint (default: the client's ``request_timeout``). A compacted ``revision`` raises
        :class:`EtcdCompactedError`.
        """
        body = range_request(
            key,
            prefix=prefix,
            revision=revision,
            limit=limit,
            keys_only=keys_only,
            count_only=count_only,
            min_mod_revision=min_mod_revision,
        )
        reply = await self._request("/v3/kv/range", body, attempt_timeout=attempt_timeout)
        return dataclasses.replace(decode_range(reply.body), size=reply.size)

    async def get(self, key: str) -> KeyValue | None:
        """The key's current value, or None."""
        result = await self.range(key)
        return result.kvs[0] if result.kvs else None

    async def range_prefix_all(
        self,
        prefix: str,
        *,
        page_size: int = 500,
        keys_only: bool = False,
        revision: int | None = None,
    ) -> RangeResult:
        """Every key under ``prefix`` as one consistent snapshot, read in pages.

        Later pages are pinned to the first page's revision (or to ``revision``, if given;
        the result's ``revision`` is then ``revision``). If an unpinned listing's revision is
        compacted mid-listing, the listing starts over; a pinned one raises
        :class:`EtcdCompactedError`. ``keys_only`` leaves the values out.
        """
        end = prefix_range_end(key_bytes(prefix))
        for _ in range(5):
            first = await self.range(
                prefix, prefix=True, limit=page_size, keys_only=keys_only, revision=revision
            )
            at = revision or first.revision
            kvs = list(first.kvs)
            more = first.more
            size = first.size
            try:
                while more and kvs:
                    after = key_str(key_bytes(kvs[-1].key) + b"\x00")
                    body = range_request(
                        after, range_end=end, revision=at, limit=page_size, keys_only=keys_only
                    )
                    reply = await self._request("/v3/kv/range", body)
                    page = decode_range(reply.body)
                    size += reply.size
                    kvs.extend(page.kvs)
                    more = page.more
            except EtcdCompactedError:
                if revision is not None:
                    raise
                log.info("listing %s: revision %d compacted mid-listing; starting over",
                         prefix, at)  # fmt: skip
                continue
            return RangeResult(tuple(kvs), at, False, len(kvs), size, first.cluster_id)
        raise EtcdError(f"listing {prefix!r}: compacted mid-listing five times in a row")

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Write ``key`` (bound to ``lease`` if given); returns the revision of the write."""
        return decode_put(
            (await self._request("/v3/kv/put", put_request(key, value, lease=lease))).body
        )

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); returns how many were deleted."""
        reply = await self._request("/v3/kv/deleterange", delete_request(key, prefix=prefix))
        return decode_delete(reply.body)

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> bool:
        """Put ``key`` only if it does not exist (txn ``version == 0``). False if it existed."""
        reply = await self._request("/v3/kv/txn", create_txn_request(key, value, lease=lease))
        succeeded, _ = decode_txn(reply.body)
        if not succeeded and reply.retried_after_send:
            # An earlier attempt may have created it; if the key is exactly ours, it was us.
            kv = await self.get(key)
            if kv is not None and kv.value == value and kv.lease == (lease or 0):
                return True
        return succeeded

    async def compact(self, revision: int, *, physical: bool = True) -> None:
        """Discard history before ``revision``."""
        body = {"revision": str(revision), "physical": physical}
        await self._request("/v3/kv/compaction", body)

    # ------------------------------------------------------------------ leases

    async def lease_grant(self, ttl: int) -> Lease:
        """Grant a lease of ``ttl`` seconds (etcd may raise a too-small TTL)."""
        return decode_lease_grant((await self._request("/v3/lease/grant", {"TTL": ttl})).body)

    async def lease_keepalive(self, lease_id: int) -> int:
        """Refresh a lease once; returns its new TTL, or 0 if it has expired or is unknown."""
        reply = await self._request("/v3/lease/keepalive", {"ID": str(lease_id)})
        return decode_lease_keepalive(reply.body)

    async def lease_time_to_live(self, lease_id: int, *, keys: bool = True) -> LeaseInfo:
        """(remaining TTL, granted TTL, attached keys); TTL is -1 for an unknown lease."""
        body = {"ID": str(lease_id), "keys": keys}
        return decode_lease_time_to_live((await self._request("/v3/lease/timetolive", body)).body)

    async def lease_revoke(self, lease_id: int) -> bool:
        """Revoke a lease, deleting its keys at once. False if etcd did not know the lease."""
        try:
            await self._request("/v3/lease/revoke", {"ID": str(lease_id)})
        except _StatusError as exc:
            if exc.code == GRPC_NOT_FOUND:
                return False
            raise
        return True

    # ------------------------------------------------------------------ maintenance

    async def status(self, endpoint: str | None = None) -> dict[str, int | str]:
        """Maintenance status (member_id, leader, revision, raft_term, version) of
        ``endpoint``, or of whichever endpoint answers first."""
        if endpoint is None:
            return decode_status((await self._request("/v3/maintenance/status", {})).body)
        headers = await self._auth_headers()
        try:
            body, _ = await self._post_once(endpoint, "/v3/maintenance/status", {}, headers)
        except _Retryable as exc:
            raise EtcdConnectionError(f"etcd {endpoint} unreachable: {exc}") from exc
        return decode_status(body)

    # ------------------------------------------------------------------ watch

    async def watch(
        self,
        key: str,
        *,
        prefix: bool = True,
        start_revision: int | None = None,
        prev_kv: bool = True,
        progress_notify: bool = True,
    ) -> AsyncIterator[WatchResponse]:
        """Stream changes to ``key`` (or every key under it) from ``start_revision``.

        Yields a ``created`` response first, then one response per event batch or progress
        notification. Raises :class:`EtcdCompactedError` if ``start_revision`` was compacted,
        :class:`EtcdConnectionError` when the stream drops. Never resumes by itself.
        """
        request = watch_create_request(
            key,
            prefix=prefix,
            start_revision=start_revision,
            prev_kv=prev_kv,
            progress_notify=progress_notify,
        )
        refresh = False
        while True:
            headers = await self._auth_headers(refresh=refresh)
            resp, endpoint = await self._open_watch(request, headers)
            where = f"watch on {key!r} at {endpoint}"
            try:
                async with contextlib.aclosing(self._watch_messages(resp, where)) as messages:
                    async for msg in messages:
                        if msg.canceled or msg.compact_revision:
                            self._raise_cancel(msg, where, start_revision)
                        yield _watch_response(msg, start_revision)
            except EtcdAuthError:
                # An expired token shows up as a permission-denied cancel of a new watch.
                if refresh or self._username is None:
                    raise
                refresh = True
                continue
            finally:
                resp.close()
            self._rotate_from(endpoint)
            raise EtcdConnectionError(f"{where}: stream closed by the server")

    def _raise_cancel(self, msg: WatchMessage, where: str, start_revision: int | None) -> None:
        if msg.compact_revision:
            raise EtcdCompactedError(
                msg.compact_revision,
                f"{where} from revision {start_revision} was cancelled: history is compacted "
                f"up to revision {msg.compact_revision}",
            )
        reason = msg.cancel_reason or "no reason given"
        if "permission" in reason.lower() or "auth" in reason.lower():
            raise EtcdAuthError(f"{where} denied: {reason}")
        raise EtcdError(f"{where} cancelled: {reason}")

    async def _open_watch(
        self, request: Mapping[str, Any], headers: Mapping[str, str]
    ) -> tuple[aiohttp.ClientResponse, str]:
        # No total or read timeout: a quiet watch is healthy. Only connecting is bounded.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._request_timeout, sock_read=None
        )
        data = json.dumps(request)

        async def attempt(endpoint: str) -> aiohttp.ClientResponse:
            try:
                async with asyncio.timeout(self._request_timeout):
                    resp = await self._http().post(
                        endpoint + "/v3/watch",
                        data=data,
                        # Ask etcd to end the watch when its member loses the leader, so a
                        # partitioned member fails over instead of going silent.
                        headers={**headers, "Grpc-Metadata-hasleader": "true"},
                        timeout=timeout,
                    )
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                raise _Retryable(
                    f"{endpoint}/v3/watch: {type(exc).__name__}: {exc}",
                    tls=_certificate_problem(exc),
                ) from exc
            if resp.status != 200:
                raw = await resp.read()
                resp.close()
                if resp.status == 400 and raw.startswith(_GATEWAY_CN):
                    raise self._gateway_cn_error(endpoint)
                try:
                    err = decode_error(json.loads(raw))
                except ValueError:
                    err = None
                if err is not None:
                    raise self._classify(endpoint, "/v3/watch", err)
                if resp.status in _RETRYABLE_HTTP:
                    raise _Retryable(f"{endpoint}/v3/watch: HTTP {resp.status}")
                raise EtcdError(f"etcd {endpoint}/v3/watch: HTTP {resp.status}: {raw[:200]!r}")
            return resp

        try:
            resp, endpoint, _ = await self._failover("/v3/watch", attempt)
        except _InvalidToken as exc:
            raise EtcdAuthError(str(exc)) from exc
        return resp, endpoint

    async def _watch_messages(
        self, resp: aiohttp.ClientResponse, where: str
    ) -> AsyncGenerator[WatchMessage, None]:
        endpoint = str(resp.url.origin())
        splitter = LineSplitter()
        try:
            # iter_any() has no line-length cap, unlike readline(); events may carry MiBs.
            async for chunk in resp.content.iter_any():
                for line in splitter.feed(chunk):
                    try:
                        msg = decode_watch_line(line)
                    except ValueError as exc:
                        raise EtcdError(f"{where}: bad JSON line {line[:200]!r}") from exc
                    if isinstance(msg, WatchMessage):
                        yield msg
                        continue
                    err = msg
                    classified = self._classify(endpoint, "/v3/watch", err)
                    if isinstance(classified, EtcdError):
                        raise classified
                    if isinstance(classified, _InvalidToken):
                        raise EtcdAuthError(f"{where}: {err.message}")
                    self._rotate_from(endpoint)
                    raise EtcdConnectionError(f"{where}: {err.message}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._rotate_from(endpoint)
            raise EtcdConnectionError(f"{where} disconnected: {type(exc).__name__}: {exc}") from exc

    def _rotate_from(self, endpoint: str) -> None:
        """After a watch drops, start the next request at the endpoint after ``endpoint``."""
        if self._endpoints[self._current] == endpoint:
            self._current = (self._current + 1) % len(self._endpoints)


def _keepalive_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """A socket for an etcd connection, with TCP keepalive (and a matching user timeout)."""
    family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family=family, type=type_, proto=proto)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            total = KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, total * 1000)
    return sock


def _watch_response(msg: WatchMessage, start_revision: int | None) -> WatchResponse:
    """Turn a stream message into what ``watch()`` yields, with a safe ``header_revision``."""
    if msg.created:
        rev = msg.header_revision
        if start_revision is not None:
            rev = min(rev, start_revision - 1)
        return WatchResponse(rev, (), progress=False, created=True)
    if msg.events:
        return WatchResponse(max(e.revision for e in msg.events), msg.events)
    return WatchResponse(msg.header_revision, (), progress=True)
