"""EtcdClient, LeaseSession and EtcdServer against real etcd processes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable

import pytest

from discovery_mdc.errors import (
    EtcdAuthError,
    EtcdCompactedError,
    EtcdConnectionError,
    EtcdError,
)
from discovery_mdc.etcd import (
    EtcdClient,
    EtcdCluster,
    EtcdServer,
    LeaseSession,
    MemoryStore,
    SessionState,
    Store,
    WatchEvent,
    WatchResponse,
)
from testkit import enable_auth, free_port, tcp_connections, wait_until


async def collect_events(
    stream: AsyncIterator[WatchResponse], n: int
) -> tuple[list[WatchEvent], int]:
    """Read until ``n`` events arrived; returns them and the highest header revision seen."""
    events: list[WatchEvent] = []
    highest = 0
    async with asyncio.timeout(15):
        async for resp in stream:
            highest = max(highest, resp.header_revision)
            events.extend(resp.events)
            if len(events) >= n:
                break
    return events, highest


# ------------------------------------------------------------------ KV


async def test_put_range_create_if_absent_and_delete(etcd_client: EtcdClient) -> None:
    rev = await etcd_client.put("a/1", b"one")
    assert rev > 1
    assert await etcd_client.create("a/2", b"two") is True
    assert await etcd_client.create("a/2", b"other") is False
    got = await etcd_client.get("a/2")
    assert got is not None and got.value == b"two" and got.version == 1
    listed = await etcd_client.range("a/", prefix=True)
    assert [kv.key for kv in listed.kvs] == ["a/1", "a/2"]
    assert listed.count == 2
    assert await etcd_client.delete("a/", prefix=True) == 2
    assert await etcd_client.get("a/1") is None


async def test_range_prefix_all_paginates_over_more_than_1000_keys(
    etcd_client: EtcdClient,
) -> None:
    sem = asyncio.Semaphore(32)

    async def put(i: int) -> None:
        async with sem:
            await etcd_client.put(f"many/{i:05d}", str(i).encode())

    await asyncio.gather(*(put(i) for i in range(1203)))
    await etcd_client.put("manz", b"outside the prefix")
    snapshot = await etcd_client.range_prefix_all("many/", page_size=250)
    assert [kv.key for kv in snapshot.kvs] == [f"many/{i:05d}" for i in range(1203)]
    assert snapshot.count == 1203
    assert snapshot.revision == (await etcd_client.range("manz")).revision


async def test_range_prefix_all_pins_later_pages_to_the_first_revision(
    etcd_client: EtcdClient,
) -> None:
    for i in range(10):
        await etcd_client.put(f"snap/{i}", b"v")
    original = etcd_client.range
    calls = 0

    async def range_then_write(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        result = await original(*args, **kwargs)  # type: ignore[arg-type]
        await etcd_client.put("snap/99", b"written after the first page")
        await etcd_client.delete("snap/9")
        return result

    etcd_client.range = range_then_write  # type: ignore[method-assign, assignment]
    snapshot = await etcd_client.range_prefix_all("snap/", page_size=3)
    assert calls == 1
    assert [kv.key for kv in snapshot.kvs] == [f"snap/{i}" for i in range(10)]


# ------------------------------------------------------------------ leases


@pytest.mark.parametrize("kind", ["etcd", "memory"])
async def test_range_options_answer_as_the_informer_relies_on(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """The semantics the informer's cheap reconcile is built on (etcd 3.5 gateway), and the
    unit tests' MemoryStore answering the same."""
    if kind == "memory":
        await _range_semantics(MemoryStore())
        return
    server: EtcdServer = request.getfixturevalue("etcd_server")
    async with EtcdClient([server.client_url]) as client:
        await _range_semantics(client)


async def _range_semantics(store: Store) -> None:
    p = "v1/mdc/"
    revs = [await store.put(f"{p}k{i}", b"x" * 100) for i in range(5)]
    await store.put("v1/other", b"not under the prefix")
    counted = await store.range(p, prefix=True, count_only=True)
    assert (counted.kvs, counted.count) == ((), 5)
    # keys_only + min_mod_revision: only keys modified at or after it, without values; the
    # count is of every key in the range, not of the ones returned.
    newer = await store.range(p, prefix=True, keys_only=True, min_mod_revision=revs[3])
    assert [(kv.key, kv.mod_revision, kv.value) for kv in newer.kvs] == [
        (f"{p}k3", revs[3], b""),
        (f"{p}k4", revs[4], b""),
    ]
    assert newer.count == 5 and newer.revision == revs[4] + 1
    idle = await store.range(p, prefix=True, keys_only=True, min_mod_revision=revs[4] + 2)
    assert (idle.kvs, idle.count) == ((), 5)
    assert 0 < idle.size < 300  # the cheap check: a constant few hundred bytes
    limited = await store.range(p, prefix=True, keys_only=True, min_mod_revision=revs[1], limit=1)
    assert [kv.key for kv in limited.kvs] == [f"{p}k1"] and limited.more and limited.count == 5
    # A read pinned at an older revision sees that revision; the header is the current one.
    await store.delete(f"{p}k0")
    now = (await store.range(p, prefix=True, count_only=True)).revision
    pinned = await store.range(p, prefix=True, count_only=True, revision=revs[4])
    assert (pinned.count, pinned.revision) == (5, now)
    listing = await store.range_prefix_all(p, keys_only=True, revision=revs[4])
    assert [kv.key for kv in listing.kvs] == [f"{p}k{i}" for i in range(5)]
    assert listing.revision == revs[4] and all(kv.value == b"" for kv in listing.kvs)
    with pytest.raises(EtcdError, match="future revision"):
        await store.range(p, prefix=True, revision=now + 100)
    if isinstance(store, MemoryStore):
        store.compact(now)
    else:
        assert isinstance(store, EtcdClient)
        await store.compact(now)
    with pytest.raises(EtcdCompactedError):
        await store.range(p, prefix=True, count_only=True, revision=revs[4])
    assert (await store.range(p, prefix=True, count_only=True, revision=now)).count == 4


async def test_etcd_connections_have_tcp_keepalive(
    etcd_server: EtcdServer, etcd_client: EtcdClient
) -> None:
    stream = etcd_client.watch("v1/", start_revision=1)
    try:
        await anext(stream)  # created: the watch connection is open and idle
        await etcd_client.range("v1/", prefix=True)  # and a pooled unary one
        conns = [
            c for c in tcp_connections(os.getpid()) if c.remote_port == etcd_server.client_port
        ]
        assert len(conns) >= 2
        assert all(c.timer == "keepalive" for c in conns), conns
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_lease_ttl_lists_keys_and_revoke_removes_them(etcd_client: EtcdClient) -> None:
    lease = await etcd_client.lease_grant(30)
    assert lease.ttl == 30
    assert await etcd_client.create("leased/a", b"1", lease=lease.id)
    await etcd_client.put("leased/b", b"2", lease=lease.id)
    info = await etcd_client.lease_time_to_live(lease.id)
    assert info.granted_ttl == 30 and 0 < info.ttl <= 30
    assert sorted(info.keys) == ["leased/a", "leased/b"]
    assert await etcd_client.lease_keepalive(lease.id) == 30
    assert await etcd_client.lease_revoke(lease.id) is True
    assert (await etcd_client.range("leased/", prefix=True)).kvs == ()
    assert await etcd_client.lease_revoke(lease.id) is False
    assert (await etcd_client.lease_time_to_live(lease.id)).ttl == -1


async def test_keepalive_of_a_revoked_lease_returns_zero(etcd_client: EtcdClient) -> None:
    lease = await etcd_client.lease_grant(10)
    await etcd_client.lease_revoke(lease.id)
    assert await etcd_client.lease_keepalive(lease.id) == 0


# ------------------------------------------------------------------ watch


async def test_watch_delivers_put_and_delete_in_revision_order_with_prev_kv(
    etcd_client: EtcdClient,
) -> None:
    start = (await etcd_client.put("w/x", b"0")) + 1
    stream = etcd_client.watch("w/", start_revision=start)
    await etcd_client.put("w/x", b"1")
    await etcd_client.put("w/y", b"2")
    await etcd_client.delete("w/x")
    await etcd_client.put("other", b"not watched")
    events, highest = await collect_events(stream, 3)
    await stream.aclose()  # type: ignore[attr-defined]
    assert [(e.type, e.kv.key) for e in events] == [("PUT", "w/x"), ("PUT", "w/y"),
                                                    ("DELETE", "w/x")]  # fmt: skip
    assert [e.revision for e in events] == sorted(e.revision for e in events)
    assert events[0].prev_kv is not None and events[0].prev_kv.value == b"0"
    assert events[2].prev_kv is not None and events[2].prev_kv.value == b"1"
    assert highest == events[-1].revision


async def test_watch_streams_a_2mib_value(
    etcd_server_factory: Callable[..., EtcdServer],
) -> None:
    server = etcd_server_factory(extra_args=["--max-request-bytes=4194304"])
    big = bytes(range(256)) * (2 * 1024 * 1024 // 256)
    async with EtcdClient([server.client_url]) as client:
        stream = client.watch("big/")
        await anext(stream)  # created: the watch is in place
        await client.put("big/blob", big)
        events, _ = await collect_events(stream, 1)
        await stream.aclose()  # type: ignore[attr-defined]
        assert events[0].kv.value == big
        got = await client.get("big/blob")
        assert got is not None and got.value == big


async def test_resume_from_last_revision_replays_exactly_what_was_missed(
    etcd_client: EtcdClient,
) -> None:
    listed = await etcd_client.range_prefix_all("r/")
    stream = etcd_client.watch("r/", start_revision=listed.revision + 1)
    await etcd_client.put("r/1", b"a")
    seen, highest = await collect_events(stream, 1)
    await stream.aclose()  # type: ignore[attr-defined]
    assert [e.kv.key for e in seen] == ["r/1"]
    # Missed while no watch was open:
    await etcd_client.put("r/2", b"b")
    await etcd_client.delete("r/1")
    resumed = etcd_client.watch("r/", start_revision=highest + 1)
    missed, _ = await collect_events(resumed, 2)
    await etcd_client.put("r/3", b"c")
    live, _ = await collect_events(resumed, 1)
    await resumed.aclose()  # type: ignore[attr-defined]
    assert [(e.type, e.kv.key) for e in missed + live] == [("PUT", "r/2"), ("DELETE", "r/1"),
                                                           ("PUT", "r/3")]  # fmt: skip


async def test_watch_from_a_compacted_revision_raises_with_the_compact_revision(
    etcd_client: EtcdClient,
) -> None:
    first = await etcd_client.put("c/k", b"1")
    for i in range(5):
        last = await etcd_client.put("c/k", str(i).encode())
    await etcd_client.compact(last)
    with pytest.raises(EtcdCompactedError) as info:
        async for _ in etcd_client.watch("c/", start_revision=first):
            pass
    assert info.value.compact_revision == last
    assert str(last) in str(info.value)


async def test_created_response_never_claims_revisions_not_yet_delivered(
    etcd_client: EtcdClient,
) -> None:
    start = (await etcd_client.put("h/a", b"1")) + 1
    for i in range(3):
        await etcd_client.put("h/a", str(i).encode())
    stream = etcd_client.watch("h/", start_revision=start)
    created = await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert created.created
    assert created.header_revision == start - 1


# ------------------------------------------------------------------ failover and faults


async def test_unreachable_endpoints_raise_connection_error_naming_them() -> None:
    endpoints = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]
    # Bounded: the client gives up (well within this deadline) instead of retrying forever.
    async with asyncio.timeout(10), EtcdClient(endpoints, request_timeout=1.0) as client:
        with pytest.raises(EtcdConnectionError) as info:
            await client.put("k", b"v")
    for endpoint in endpoints:
        assert endpoint in str(info.value)


async def test_failover_to_another_member_when_the_current_one_stops(
    etcd_cluster: EtcdCluster,
) -> None:
    async with EtcdClient(etcd_cluster.client_urls) as client:
        await client.put("f/1", b"before")
        used = etcd_cluster.client_urls.index(client.current_endpoint)
        await asyncio.to_thread(etcd_cluster.stop_member, used)
        # Stopping the leader triggers an election; the client rides it out by itself.
        await client.put("f/2", b"after")
        assert client.current_endpoint != etcd_cluster.client_urls[used]
        listed = await client.range_prefix_all("f/")
        assert [kv.value for kv in listed.kvs] == [b"before", b"after"]


async def test_failover_when_the_leader_is_killed(etcd_cluster: EtcdCluster) -> None:
    leader = etcd_cluster.leader_index()
    urls = etcd_cluster.client_urls
    ordered = [urls[leader]] + [u for i, u in enumerate(urls) if i != leader]
    async with EtcdClient(ordered) as client:
        lease = await client.lease_grant(30)
        await client.put("l/k", b"v", lease=lease.id)
        await asyncio.to_thread(etcd_cluster.kill_member, leader)
        assert await client.lease_keepalive(lease.id) > 0
        got = await client.get("l/k")
        assert got is not None and got.value == b"v"
        assert await wait_until(lambda: etcd_cluster.leader_index() != leader, timeout=15)


async def test_lease_and_keys_survive_an_etcd_restart_shorter_than_the_ttl(
    etcd_server: EtcdServer, etcd_client: EtcdClient
) -> None:
    lease = await etcd_client.lease_grant(20)
    await etcd_client.put("survive/k", b"v", lease=lease.id)
    await asyncio.to_thread(etcd_server.restart)
    assert await etcd_client.lease_keepalive(lease.id) == 20
    got = await etcd_client.get("survive/k")
    assert got is not None and got.lease == lease.id


# ------------------------------------------------------------------ auth


async def test_auth_good_credentials_work_and_bad_ones_fail_fast(etcd_server: EtcdServer) -> None:
    await asyncio.to_thread(enable_auth, etcd_server.client_url)
    async with EtcdClient([etcd_server.client_url], username="root", password="rootpw") as c:
        await c.put("auth/k", b"v")
        stream = c.watch("auth/", start_revision=1)
        events, _ = await collect_events(stream, 1)
        await stream.aclose()  # type: ignore[attr-defined]
        assert events[0].kv.value == b"v"
        # An expired or unknown token is replaced once, transparently.
        c._token = "expired.1"
        assert (await c.get("auth/k")) is not None
        c._token = "expired.1"
        stream = c.watch("auth/", start_revision=1)
        events, _ = await collect_events(stream, 1)
        await stream.aclose()  # type: ignore[attr-defined]
    # Both fail fast: an auth error is not retried like an unreachable etcd.
    async with asyncio.timeout(5):
        async with EtcdClient([etcd_server.client_url], username="root", password="wrong") as bad:
            with pytest.raises(EtcdAuthError, match="root"):
                await bad.get("auth/k")
        async with EtcdClient([etcd_server.client_url]) as anonymous:
            with pytest.raises(EtcdAuthError, match="ETCD_AUTH_USERNAME"):
                await anonymous.get("auth/k")


# ------------------------------------------------------------------ LeaseSession


def card(lease_id: int) -> tuple[str, bytes]:
    return f"v1/mdc/ns/backend/generate/{lease_id:x}", b"card"


async def key_lease(client: EtcdClient, prefix: str) -> int | None:
    listed = await client.range(prefix, prefix=True)
    return listed.kvs[0].lease if len(listed.kvs) == 1 else None


async def test_lease_session_reregisters_after_an_external_revoke(
    etcd_client: EtcdClient,
) -> None:
    async with LeaseSession(etcd_client, ttl=2) as session:
        handle = await session.add(card)
        first = session.lease_id
        assert await key_lease(etcd_client, "v1/mdc/") == first
        await etcd_client.lease_revoke(first)
        # The next keepalive (every TTL/3) finds the lease gone; a session that missed it
        # would never re-register, whatever the deadline.
        new = await wait_until(lambda: _new_lease(etcd_client, first), timeout=10)
        assert handle.key == card(new)[0]
        await session.wait_state(SessionState.REGISTERED)
    assert (await etcd_client.range("v1/mdc/", prefix=True)).kvs == ()


async def _new_lease(client: EtcdClient, old: int) -> int | None:
    lease = await key_lease(client, "v1/mdc/")
    return lease if lease not in (None, old) else None


async def test_lease_session_rides_out_a_restart_shorter_than_the_ttl(
    etcd_server: EtcdServer, etcd_client: EtcdClient
) -> None:
    states: list[SessionState] = []
    async with LeaseSession(etcd_client, ttl=10, on_state_change=states.append) as session:
        await session.add(card)
        lease = session.lease_id
        await asyncio.to_thread(etcd_server.restart)
        await wait_until(lambda: etcd_client.lease_keepalive(lease), timeout=10)
        assert await key_lease(etcd_client, "v1/mdc/") == lease
        assert states == [SessionState.REGISTERED]


async def test_lease_session_republishes_after_an_outage_longer_than_the_ttl(
    etcd_server: EtcdServer,
) -> None:
    async with (
        EtcdClient([etcd_server.client_url], request_timeout=1.0) as client,
        LeaseSession(client, ttl=2, backoff_max=1.0) as session,
    ):
        await session.add(card)
        first = session.lease_id
        await asyncio.to_thread(etcd_server.stop)
        async with asyncio.timeout(20):
            await session.wait_state(SessionState.LOST)
        await asyncio.to_thread(etcd_server.wipe_and_restart)
        new = await wait_until(lambda: _new_lease(client, first), timeout=20)
        assert (await client.get(card(new)[0])) is not None
        async with asyncio.timeout(10):
            await session.wait_state(SessionState.REGISTERED)
