"""Decoding real-shaped etcd 3.5 JSON-gateway messages (captured from the etcd binary)."""

from __future__ import annotations

import base64
import json

import pytest

from discovery_mdc.etcd._codec import (
    GatewayError,
    KeyValue,
    LineSplitter,
    create_txn_request,
    decode_delete,
    decode_error,
    decode_kv,
    decode_lease_grant,
    decode_lease_keepalive,
    decode_lease_time_to_live,
    decode_range,
    decode_status,
    decode_txn,
    decode_watch_line,
    decode_watch_message,
    delete_request,
    int64,
    key_str,
    prefix_range_end,
    put_request,
    range_request,
    watch_create_request,
)

HEADER = {"cluster_id": "324952591200643719", "member_id": "3319814642761637952",
          "revision": "8", "raft_term": "2"}  # fmt: skip


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def test_int64_fields_are_strings_and_missing_means_zero() -> None:
    assert int64("9223372036854775807") == 2**63 - 1
    assert int64(None) == 0
    assert int64("") == 0
    assert int64(5) == 5


def test_range_response_decodes_base64_and_string_revisions() -> None:
    body = {
        "header": HEADER,
        "kvs": [{"key": b64("foo"), "create_revision": "2", "mod_revision": "7",
                 "version": "3", "value": b64("bar"), "lease": "7587889726860452269"}],
        "more": True,
        "count": "4",
    }  # fmt: skip
    result = decode_range(body)
    assert result.revision == 8
    assert result.more is True
    assert result.count == 4
    assert result.kvs == (KeyValue("foo", b"bar", 2, 7, 3, 7587889726860452269),)


def test_empty_range_omits_kvs_and_count() -> None:
    result = decode_range({"header": HEADER})
    assert result.kvs == ()
    assert result.count == 0
    assert result.more is False


def test_kv_with_empty_value_omits_value_and_lease() -> None:
    kv = decode_kv({"key": b64("k"), "create_revision": "2", "mod_revision": "2", "version": "1"})
    assert kv == KeyValue("k", b"", 2, 2, 1, 0)


def test_non_utf8_key_round_trips() -> None:
    kv = decode_kv({"key": b64(b"\xff\xfe")})
    assert kv.key.encode("utf-8", "surrogateescape") == b"\xff\xfe"
    assert key_str(b"\xff\xfe") == kv.key


def test_txn_failure_omits_succeeded() -> None:
    assert decode_txn({"header": HEADER}) == (False, 8)
    ok = {"header": HEADER, "succeeded": True,
          "responses": [{"response_put": {"header": {"revision": "8"}}}]}  # fmt: skip
    assert decode_txn(ok) == (True, 8)


def test_deleterange_counts_and_zero_omitted() -> None:
    assert decode_delete({"header": HEADER, "deleted": "3"}) == 3
    assert decode_delete({"header": HEADER}) == 0


def test_lease_grant_and_time_to_live() -> None:
    lease = decode_lease_grant({"header": HEADER, "ID": "2324035693859688457", "TTL": "5"})
    assert (lease.id, lease.ttl) == (2324035693859688457, 5)
    info = decode_lease_time_to_live(
        {"header": HEADER, "ID": "1", "TTL": "4", "grantedTTL": "5", "keys": [b64("k2")]}
    )
    assert info == (4, 5, ("k2",))
    gone = decode_lease_time_to_live({"header": HEADER, "ID": "1", "TTL": "-1"})
    assert gone.ttl == -1
    assert gone.keys == ()


def test_keepalive_reply_carries_ttl_inside_result() -> None:
    body = {"result": {"header": HEADER, "ID": "2324035693859688460", "TTL": "5"}}
    assert decode_lease_keepalive(body) == 5


def test_keepalive_of_expired_lease_has_no_ttl_and_means_zero() -> None:
    body = {"result": {"header": HEADER, "ID": "2324035693859688460"}}
    assert decode_lease_keepalive(body) == 0


def test_put_event_omits_type_delete_spells_it_out() -> None:
    put = {"result": {"header": HEADER, "events": [
        {"kv": {"key": b64("new1"), "create_revision": "5", "mod_revision": "7",
                "version": "2", "value": b64("v2")},
         "prev_kv": {"key": b64("new1"), "create_revision": "5", "mod_revision": "5",
                     "version": "1", "value": b64("bar")}}]}}  # fmt: skip
    msg = decode_watch_message(put)
    (event,) = msg.events
    assert event.type == "PUT"
    assert event.revision == 7
    assert event.kv.value == b"v2"
    assert event.prev_kv is not None and event.prev_kv.value == b"bar"
    assert not msg.progress

    delete = {"result": {"header": HEADER, "events": [
        {"type": "DELETE", "kv": {"key": b64("new1"), "mod_revision": "8"}}]}}  # fmt: skip
    (event,) = decode_watch_message(delete).events
    assert event.type == "DELETE"
    assert event.kv == KeyValue("new1", b"", mod_revision=8)
    assert event.prev_kv is None


def test_watch_created_message() -> None:
    msg = decode_watch_message({"result": {"header": HEADER, "created": True}})
    assert msg.created
    assert not msg.canceled
    assert not msg.progress
    assert msg.header_revision == 8
    assert msg.watch_id == 0


def test_watch_progress_notification_is_a_bare_header() -> None:
    msg = decode_watch_message({"result": {"header": HEADER}})
    assert msg.progress
    assert msg.header_revision == 8
    assert msg.events == ()


def test_watch_cancelled_for_compaction_has_no_header_revision() -> None:
    body = {"result": {"header": {"cluster_id": "1", "member_id": "2", "raft_term": "2"},
                       "canceled": True, "compact_revision": "3"}}  # fmt: skip
    msg = decode_watch_message(body)
    assert msg.canceled
    assert msg.compact_revision == 3
    assert msg.header_revision == 0
    assert not msg.progress


def test_watch_permission_denied_cancel_reason() -> None:
    reason = "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
    body = {"result": {"header": HEADER, "created": True, "canceled": True,
                       "cancel_reason": reason}}  # fmt: skip
    msg = decode_watch_message(body)
    assert msg.created and msg.canceled
    assert msg.cancel_reason == reason


def test_unknown_event_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown watch event type"):
        decode_watch_message({"result": {"events": [{"type": "BOGUS", "kv": {}}]}})


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"error": "etcdserver: requested lease not found", "code": 5,
          "message": "etcdserver: requested lease not found"},
         GatewayError(5, "etcdserver: requested lease not found")),
        ({"error": "etcdserver: invalid auth token", "code": 16,
          "message": "etcdserver: invalid auth token"},
         GatewayError(16, "etcdserver: invalid auth token")),
        ({"error": {"grpc_code": 14, "http_code": 503, "message": "etcdserver: no leader",
                    "http_status": "Service Unavailable"}},
         GatewayError(14, "etcdserver: no leader")),
    ],
)  # fmt: skip
def test_error_bodies(body: dict[str, object], expected: GatewayError) -> None:
    assert decode_error(body) == expected


_LINES = [
    {"result": {"header": HEADER, "events": [
        {"kv": {"key": b64("new1"), "create_revision": "5", "mod_revision": "7",
                "version": "2", "value": b64("v2"), "lease": "7587888745474578185"},
         "prev_kv": {"key": b64("new1"), "mod_revision": "5", "value": b64("bar")}},
        {"type": "DELETE", "kv": {"key": b64(b"\xffraw"), "mod_revision": "8"}}]}},
    {"result": {"header": HEADER, "created": True}},
    {"result": {"header": HEADER}},
    {"result": {"header": {"cluster_id": "1"}, "canceled": True, "compact_revision": "3"}},
    {"result": {"header": HEADER, "created": True, "canceled": True, "cancel_reason": "no"}},
    {"header": HEADER, "events": [{"kv": {"key": b64("bare"), "mod_revision": "9"}}]},
    {"error": {"grpc_code": 14, "http_code": 503, "message": "etcdserver: no leader"}},
    {"error": "etcdserver: invalid auth token", "code": 16, "message": "invalid auth token"},
]  # fmt: skip


@pytest.mark.parametrize("body", _LINES)
def test_the_fast_watch_line_decoder_agrees_with_the_general_one(body: dict[str, object]) -> None:
    expected = decode_error(body) or decode_watch_message(body)
    assert decode_watch_line(json.dumps(body).encode()) == expected


@pytest.mark.parametrize(
    "line",
    [b"{not json", b'{"result":{"events":[{"type":"BOGUS","kv":{}}]}}',
     b'{"result":{"events":[{"kv":{"key":"%%%"}}]}}'],
)  # fmt: skip
def test_a_watch_line_that_is_not_a_watch_message_is_a_value_error(line: bytes) -> None:
    with pytest.raises(ValueError):
        decode_watch_line(line)


def test_success_bodies_are_not_errors() -> None:
    assert decode_error({"header": HEADER}) is None
    assert decode_error([1, 2]) is None


def test_status_response() -> None:
    body = {"header": HEADER, "version": "3.5.1", "dbSize": "20480",
            "leader": "3319814642761637952", "raftIndex": "18", "raftTerm": "2"}  # fmt: skip
    status = decode_status(body)
    assert status["leader"] == status["member_id"] == 3319814642761637952
    assert status["revision"] == 8


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"v1/mdc/") == b"v1/mdc0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff\xff") == b"\x00"
    assert prefix_range_end(b"") == b"\x00"


def test_requests_encode_int64_as_strings_and_base64() -> None:
    assert range_request("v1/", prefix=True, revision=9, limit=500) == {
        "key": b64("v1/"), "range_end": b64("v10"), "revision": "9", "limit": "500"}  # fmt: skip
    assert range_request("", prefix=True)["key"] == b64(b"\x00")
    assert put_request("k", b"\x00\x01", lease=2**62) == {
        "key": b64("k"), "value": b64(b"\x00\x01"), "lease": str(2**62)}  # fmt: skip
    assert delete_request("p/", prefix=True) == {"key": b64("p/"), "range_end": b64("p0")}


def test_create_is_a_txn_comparing_version_zero() -> None:
    txn = create_txn_request("k", b"v", lease=7)
    assert txn["compare"] == [
        {"key": b64("k"), "target": "VERSION", "result": "EQUAL", "version": "0"}
    ]
    assert txn["success"] == [{"request_put": {"key": b64("k"), "value": b64("v"), "lease": "7"}}]
    json.dumps(txn)


def test_watch_create_request() -> None:
    req = watch_create_request("v1/mdc/", start_revision=12)["create_request"]
    assert req == {"key": b64("v1/mdc/"), "range_end": b64("v1/mdc0"), "start_revision": "12",
                   "prev_kv": True, "progress_notify": True}  # fmt: skip
    bare = watch_create_request("k", prefix=False, prev_kv=False, progress_notify=False)
    assert bare == {"create_request": {"key": b64("k")}}


def test_line_splitter_handles_split_and_huge_lines() -> None:
    splitter = LineSplitter()
    big = b'{"v":"' + b"x" * (3 * 1024 * 1024) + b'"}'
    out: list[bytes] = []
    for i in range(0, len(big), 65536):
        out += splitter.feed(big[i : i + 65536])
    assert out == []
    out += splitter.feed(b"\n{}\n\n{")
    assert out == [big, b"{}"]
    assert splitter.pending == b"{"
