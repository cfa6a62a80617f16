"""Pure encoding and decoding of etcd v3 JSON-gateway messages (no sockets).

What etcd 3.5's gateway actually sends (checked against the real binary):

- every int64 field is a JSON *string* (``"revision": "7"``), and zero-valued fields are
  omitted entirely, so a missing field means 0 / empty / false;
- keys and values are base64;
- watch events omit ``type`` for PUT (the enum's zero value); only ``"DELETE"`` is spelled out;
- streaming endpoints (``/v3/watch``, ``/v3/lease/keepalive``) wrap each message as
  ``{"result": {...}}``, one JSON object per line;
- a keepalive for an expired or revoked lease answers 200 with a ``result`` lacking ``TTL``;
- errors are ``{"error": str, "code": <gRPC code>, "message": str}`` (streams may also send
  ``{"error": {"grpc_code": N, "message": str, ...}}``).

Keys are exposed as ``str``. Bytes that are not UTF-8 round-trip through ``surrogateescape``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import msgspec

__all__ = [
    "GatewayError",
    "KeyValue",
    "Lease",
    "LeaseInfo",
    "LineSplitter",
    "RangeResult",
    "WatchEvent",
    "WatchMessage",
    "WatchResponse",
    "b64_key",
    "create_txn_request",
    "decode_delete",
    "decode_error",
    "decode_kv",
    "decode_lease_grant",
    "decode_lease_keepalive",
    "decode_lease_time_to_live",
    "decode_put",
    "decode_range",
    "decode_status",
    "decode_txn",
    "decode_watch_line",
    "decode_watch_message",
    "delete_request",
    "header_cluster_id",
    "header_revision",
    "int64",
    "key_bytes",
    "key_str",
    "parse_json_line",
    "prefix_range_end",
    "put_request",
    "range_request",
    "watch_create_request",
]

# gRPC status codes the client maps to specific errors.
GRPC_NOT_FOUND = 5
GRPC_PERMISSION_DENIED = 7
GRPC_OUT_OF_RANGE = 11
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key in etcd. ``lease`` is 0 when the key has no lease."""

    key: str
    value: bytes
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0


@dataclass(frozen=True, slots=True)
class RangeResult:
    """A range read: the keys, etcd's header revision, and paging info.

    ``revision`` is the store's current revision when etcd answered, even for a read pinned
    at an older revision. ``count`` is the number of keys in the range, before ``limit`` and
    before ``min_mod_revision`` filtering (checked against etcd 3.5). ``size`` is the bytes
    of the response body(ies) the client read (0 when unknown). ``cluster_id`` is the
    header's cluster id (0 when unknown).
    """

    kvs: tuple[KeyValue, ...]
    revision: int
    more: bool = False
    count: int = 0
    size: int = 0
    cluster_id: int = 0


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease. ``ttl`` is what the server granted (it may raise a too-small TTL)."""

    id: int
    ttl: int


class LeaseInfo(NamedTuple):
    """``lease_time_to_live`` result. ``ttl`` is -1 when the lease does not exist."""

    ttl: int
    granted_ttl: int
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A PUT or DELETE seen by a watch; ``prev_kv`` only when the watch asked for it."""

    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    prev_kv: KeyValue | None = None

    @property
    def revision(self) -> int:
        """The revision of the change (``kv.mod_revision``)."""
        return self.kv.mod_revision


@dataclass(frozen=True, slots=True)
class WatchResponse:
    """One message yielded by ``watch()``.

    ``header_revision`` is the revision through which this stream is known to be complete, so a
    caller that tracks the highest one seen can resume with ``start_revision=that + 1`` and miss
    nothing. It is etcd's header revision except where that would overclaim: a catch-up batch
    (etcd sends at most 1000 revisions per batch yet stamps the *current* store revision on it)
    counts only through its last event, and the ``created`` message of a watch that starts in
    the past counts only through ``start_revision - 1``.
    """

    header_revision: int
    events: tuple[WatchEvent, ...] = ()
    progress: bool = False
    created: bool = False


@dataclass(frozen=True, slots=True)
class WatchMessage:
    """A raw ``/v3/watch`` stream message, before the client interprets it."""

    header_revision: int
    events: tuple[WatchEvent, ...]
    created: bool
    canceled: bool
    compact_revision: int
    cancel_reason: str
    watch_id: int

    @property
    def progress(self) -> bool:
        """A progress notification: a bare header with no events and no state change."""
        return not (self.created or self.canceled or self.events)


@dataclass(frozen=True, slots=True)
class GatewayError:
    """An error body from the gateway."""

    code: int
    message: str


# ------------------------------------------------------------------ primitives


def int64(value: Any) -> int:
    """Decode a gateway int64: a JSON string, a number, or absent (0)."""
    if value is None or value == "":
        return 0
    return int(value)


def key_bytes(key: str) -> bytes:
    """The wire bytes of a key."""
    return key.encode("utf-8", "surrogateescape")


def key_str(raw: bytes) -> str:
    """A key from wire bytes; non-UTF-8 bytes round-trip via ``surrogateescape``."""
    return raw.decode("utf-8", "surrogateescape")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not text:
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError) as exc:
        raise ValueError(f"invalid base64 from etcd gateway: {text!r:.60}") from exc


def b64_key(key: str) -> str:
    """Base64 of a key as the gateway expects it."""
    return _b64(key_bytes(key))


def prefix_range_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes ``[prefix, range_end)`` cover every key with the prefix.

    An empty or all-``0xff`` prefix means "every key", which etcd spells ``b"\\0"``.
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def header_revision(body: Mapping[str, Any]) -> int:
    """The store revision from a response's ``header`` (0 if absent)."""
    return int64(_mapping(body.get("header")).get("revision"))


def header_cluster_id(body: Mapping[str, Any]) -> int:
    """The cluster id from a response's ``header`` (0 if absent)."""
    return int64(_mapping(body.get("header")).get("cluster_id"))


# ------------------------------------------------------------------ requests


def _span(key: str, prefix: bool) -> tuple[bytes, bytes | None]:
    """(key, range_end) bytes; the empty prefix means every key (``\\0`` to ``\\0``)."""
    raw = key_bytes(key)
    if not prefix:
        return raw, None
    return (raw or b"\x00"), prefix_range_end(raw)


def range_request(
    key: str,
    *,
    prefix: bool = False,
    range_end: bytes | None = None,
    revision: int | None = None,
    limit: int | None = None,
    count_only: bool = False,
    keys_only: bool = False,
    min_mod_revision: int | None = None,
) -> dict[str, Any]:
    """Body for ``/v3/kv/range``; ``range_end`` overrides the one ``prefix`` implies."""
    raw, implied_end = _span(key, prefix)
    body: dict[str, Any] = {"key": _b64(raw)}
    if range_end is None:
        range_end = implied_end
    if range_end is not None:
        body["range_end"] = _b64(range_end)
    if revision:
        body["revision"] = str(revision)
    if limit:
        body["limit"] = str(limit)
    if count_only:
        body["count_only"] = True
    if keys_only:
        body["keys_only"] = True
    if min_mod_revision:
        body["min_mod_revision"] = str(min_mod_revision)
    return body


def put_request(key: str, value: bytes, *, lease: int | None = None) -> dict[str, Any]:
    """Body for ``/v3/kv/put`` (also a txn ``request_put``)."""
    body: dict[str, Any] = {"key": b64_key(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return body


def delete_request(key: str, *, prefix: bool = False) -> dict[str, Any]:
    """Body for ``/v3/kv/deleterange``."""
    raw, range_end = _span(key, prefix)
    body: dict[str, Any] = {"key": _b64(raw)}
    if range_end is not None:
        body["range_end"] = _b64(range_end)
    return body


def create_txn_request(key: str, value: bytes, *, lease: int | None = None) -> dict[str, Any]:
    """Body for ``/v3/kv/txn``: put only if the key does not exist (``version == 0``)."""
    return {
        "compare": [{"key": b64_key(key), "target": "VERSION", "result": "EQUAL", "version": "0"}],
        "success": [{"request_put": put_request(key, value, lease=lease)}],
    }


def watch_create_request(
    key: str,
    *,
    prefix: bool = True,
    start_revision: int | None = None,
    prev_kv: bool = True,
    progress_notify: bool = True,
) -> dict[str, Any]:
    """Body for ``/v3/watch``."""
    raw, range_end = _span(key, prefix)
    req: dict[str, Any] = {"key": _b64(raw)}
    if range_end is not None:
        req["range_end"] = _b64(range_end)
    if start_revision is not None:
        req["start_revision"] = str(start_revision)
    if prev_kv:
        req["prev_kv"] = True
    if progress_notify:
        req["progress_notify"] = True
    return {"create_request": req}


# ------------------------------------------------------------------ responses


def decode_error(body: Any) -> GatewayError | None:
    """The error in a gateway body, or None if it is not an error."""
    if not isinstance(body, Mapping) or "error" not in body:
        return None
    err = body["error"]
    if isinstance(err, Mapping):  # streaming error shape
        return GatewayError(
            int64(err.get("grpc_code") or err.get("code")), str(err.get("message") or err)
        )
    return GatewayError(int64(body.get("code")), str(body.get("message") or err))


def decode_kv(raw: Mapping[str, Any]) -> KeyValue:
    """One ``mvccpb.KeyValue``."""
    return KeyValue(
        key=key_str(_unb64(raw.get("key"))),
        value=_unb64(raw.get("value")),
        create_revision=int64(raw.get("create_revision")),
        mod_revision=int64(raw.get("mod_revision")),
        version=int64(raw.get("version")),
        lease=int64(raw.get("lease")),
    )


def decode_range(body: Mapping[str, Any]) -> RangeResult:
    """A ``/v3/kv/range`` response."""
    return RangeResult(
        kvs=tuple(decode_kv(kv) for kv in body.get("kvs") or ()),
        revision=header_revision(body),
        more=bool(body.get("more", False)),
        count=int64(body.get("count")),
        cluster_id=header_cluster_id(body),
    )


def decode_put(body: Mapping[str, Any]) -> int:
    """A ``/v3/kv/put`` response: the revision of the write."""
    return header_revision(body)


def decode_delete(body: Mapping[str, Any]) -> int:
    """A ``/v3/kv/deleterange`` response: how many keys were deleted."""
    return int64(body.get("deleted"))


def decode_txn(body: Mapping[str, Any]) -> tuple[bool, int]:
    """A ``/v3/kv/txn`` response: (succeeded, header revision)."""
    return bool(body.get("succeeded", False)), header_revision(body)


def decode_lease_grant(body: Mapping[str, Any]) -> Lease:
    """A ``/v3/lease/grant`` response."""
    return Lease(id=int64(body.get("ID")), ttl=int64(body.get("TTL")))


def decode_lease_keepalive(body: Mapping[str, Any]) -> int:
    """A ``/v3/lease/keepalive`` response: the new TTL, 0 if the lease is gone.

    The answer for an expired or unknown lease is a 200 whose ``result`` has no ``TTL``.
    """
    result = _mapping(body.get("result", body))
    return max(0, int64(result.get("TTL")))


def decode_lease_time_to_live(body: Mapping[str, Any]) -> LeaseInfo:
    """A ``/v3/lease/timetolive`` response."""
    return LeaseInfo(
        ttl=int64(body.get("TTL")),
        granted_ttl=int64(body.get("grantedTTL")),
        keys=tuple(key_str(_unb64(k)) for k in body.get("keys") or ()),
    )


def decode_status(body: Mapping[str, Any]) -> dict[str, int | str]:
    """A ``/v3/maintenance/status`` response: member_id, leader, revision, version."""
    return {
        "member_id": int64(_mapping(body.get("header")).get("member_id")),
        "leader": int64(body.get("leader")),
        "revision": header_revision(body),
        "raft_term": int64(body.get("raftTerm")),
        "version": str(body.get("version", "")),
    }


def _decode_event(raw: Mapping[str, Any]) -> WatchEvent:
    kind = raw.get("type") or "PUT"
    if kind not in ("PUT", "DELETE"):
        raise ValueError(f"unknown watch event type {kind!r}")
    prev = raw.get("prev_kv")
    return WatchEvent(
        type="DELETE" if kind == "DELETE" else "PUT",
        kv=decode_kv(_mapping(raw.get("kv"))),
        prev_kv=decode_kv(prev) if isinstance(prev, Mapping) else None,
    )


def decode_watch_message(body: Mapping[str, Any]) -> WatchMessage:
    """One line of a ``/v3/watch`` stream (the ``result`` wrapper is optional)."""
    result = _mapping(body.get("result", body))
    return WatchMessage(
        header_revision=header_revision(result),
        events=tuple(_decode_event(e) for e in result.get("events") or ()),
        created=bool(result.get("created", False)),
        canceled=bool(result.get("canceled", False)),
        compact_revision=int64(result.get("compact_revision")),
        cancel_reason=str(result.get("cancel_reason", "")),
        watch_id=int64(result.get("watch_id")),
    )


def parse_json_line(line: bytes) -> Any:
    """Parse one JSON line from a stream."""
    return json.loads(line)


# The watch stream is the hot path (every event of every key): its lines are decoded by
# msgspec straight into these typed shapes, base64 and string-encoded int64s included, in one
# pass in C (lax mode turns "7" into 7). Anything they do not fit (an error line, an unknown
# event type, bad base64) goes through the general decoder above, which names the problem.
class _LineKV(msgspec.Struct):
    key: bytes = b""
    value: bytes = b""
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0


class _LineEvent(msgspec.Struct):
    kv: _LineKV = msgspec.field(default_factory=_LineKV)
    type: Literal["PUT", "DELETE"] = "PUT"
    prev_kv: _LineKV | None = None


class _LineHeader(msgspec.Struct):
    revision: int = 0


class _LineResult(msgspec.Struct):
    header: _LineHeader = msgspec.field(default_factory=_LineHeader)
    events: list[_LineEvent] = msgspec.field(default_factory=list)
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""
    watch_id: int = 0


class _Line(msgspec.Struct):
    result: _LineResult | None = None


_LINE = msgspec.json.Decoder(_Line, strict=False)


def _line_kv(kv: _LineKV) -> KeyValue:
    return KeyValue(
        key_str(kv.key), kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease
    )


def decode_watch_line(line: bytes) -> WatchMessage | GatewayError:
    """One ``/v3/watch`` stream line: the message, or the error it carries.

    Raises ``ValueError`` for a line that is not JSON or not a watch message.
    """
    try:
        parsed = _LINE.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError):
        parsed = None
    if parsed is None or parsed.result is None:
        body = parse_json_line(line)
        err = decode_error(body)
        return err if err is not None else decode_watch_message(body)
    r = parsed.result
    return WatchMessage(
        header_revision=r.header.revision,
        events=tuple(
            WatchEvent(e.type, _line_kv(e.kv), None if e.prev_kv is None else _line_kv(e.prev_kv))
            for e in r.events
        ),
        created=r.created,
        canceled=r.canceled,
        compact_revision=r.compact_revision,
        cancel_reason=r.cancel_reason,
        watch_id=r.watch_id,
    )


class LineSplitter:
    """Splits a byte stream into newline-terminated lines with no length limit.

    aiohttp's ``readline()`` caps lines (a watch event holding a multi-MiB value exceeds it),
    so the watch reads raw chunks and feeds them here.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add a chunk; return every complete, non-blank line it finished."""
        self._buf += chunk
        if b"\n" not in chunk:
            return []
        *lines, rest = bytes(self._buf).split(b"\n")
        self._buf = bytearray(rest)
        return [line for line in lines if line.strip()]

    @property
    def pending(self) -> bytes:
        """Bytes received after the last newline."""
        return bytes(self._buf)
