"""MemoryStore follows etcd's semantics closely enough to drive publisher and watcher tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from discovery_mdc.errors import EtcdCompactedError, EtcdConnectionError, EtcdError
from discovery_mdc.etcd import EtcdClient, MemoryStore, Store, WatchResponse


async def take(stream: AsyncIterator[WatchResponse], n: int) -> list[WatchResponse]:
    out = []
    async with asyncio.timeout(5):
        for _ in range(n):
            out.append(await anext(stream))
    return out


def test_memory_store_and_client_satisfy_the_store_protocol() -> None:
    assert isinstance(MemoryStore(), Store)
    assert isinstance(EtcdClient(["http://127.0.0.1:1"]), Store)


async def test_each_write_bumps_the_revision_and_create_never_overwrites() -> None:
    store = MemoryStore()
    assert await store.put("a/1", b"x") == 2
    assert await store.create("a/1", b"y") is False
    assert await store.create("a/2", b"y") is True
    listed = await store.range_prefix_all("a/")
    assert [(kv.key, kv.value) for kv in listed.kvs] == [("a/1", b"x"), ("a/2", b"y")]
    assert listed.revision == 3
    kv = store.get("a/1")
    assert kv is not None and (kv.create_revision, kv.mod_revision, kv.version) == (2, 2, 1)


async def test_delete_prefix_counts_keys() -> None:
    store = MemoryStore()
    for k in ("p/1", "p/2", "q/1"):
        await store.put(k, b"")
    assert await store.delete("p/", prefix=True) == 2
    assert await store.delete("p/1") == 0
    assert store.keys() == ["q/1"]


async def test_lease_expiry_on_advance_deletes_its_keys() -> None:
    store = MemoryStore()
    lease = await store.lease_grant(10)
    await store.put("k", b"v", lease=lease.id)
    store.advance(9.9)
    assert await store.lease_keepalive(lease.id) == 10
    store.advance(9.9)
    assert store.get("k") is not None
    store.advance(0.2)
    assert store.get("k") is None
    assert await store.lease_keepalive(lease.id) == 0
    assert await store.lease_revoke(lease.id) is False


async def test_put_with_unknown_lease_fails() -> None:
    store = MemoryStore()
    with pytest.raises(EtcdError, match="lease"):
        await store.create("k", b"v", lease=12345)


async def test_revoke_deletes_keys_in_one_revision() -> None:
    store = MemoryStore()
    lease = await store.lease_grant(5)
    await store.put("a", b"1", lease=lease.id)
    await store.put("b", b"2", lease=lease.id)
    stream = store.watch("", start_revision=store.revision + 1)
    await take(stream, 1)  # created
    assert await store.lease_revoke(lease.id) is True
    (resp,) = await take(stream, 1)
    assert [(e.type, e.kv.key, e.revision) for e in resp.events] == [
        ("DELETE", "a", 4),
        ("DELETE", "b", 4),
    ]
    await stream.aclose()  # type: ignore[attr-defined]


async def test_watch_replays_from_start_revision_then_streams_live_with_prev_kv() -> None:
    store = MemoryStore()
    await store.put("v1/mdc/a", b"1")  # rev 2
    await store.put("v1/mdc/a", b"2")  # rev 3
    await store.put("other", b"x")  # rev 4
    stream = store.watch("v1/mdc/", start_revision=3)
    created, replayed = await take(stream, 2)
    assert created.created and created.header_revision == 2
    (event,) = replayed.events
    assert (event.type, event.kv.value, event.revision) == ("PUT", b"2", 3)
    assert event.prev_kv is not None and event.prev_kv.value == b"1"
    await store.delete("v1/mdc/a")  # rev 5
    (live,) = await take(stream, 1)
    assert live.header_revision == 5
    assert [(e.type, e.kv.key) for e in live.events] == [("DELETE", "v1/mdc/a")]
    await stream.aclose()  # type: ignore[attr-defined]


async def test_watch_without_start_revision_sees_only_new_changes() -> None:
    store = MemoryStore()
    await store.put("k", b"old")
    stream = store.watch("k", prefix=False, prev_kv=False)
    (created,) = await take(stream, 1)
    assert created.header_revision == 2
    await store.put("k", b"new")
    (resp,) = await take(stream, 1)
    assert resp.events[0].kv.value == b"new"
    assert resp.events[0].prev_kv is None
    await stream.aclose()  # type: ignore[attr-defined]


async def test_watch_from_compacted_revision_raises_with_compact_revision() -> None:
    store = MemoryStore()
    for i in range(5):
        await store.put("k", str(i).encode())  # revs 2..6
    store.compact(5)
    with pytest.raises(EtcdCompactedError) as info:
        await anext(store.watch("k", start_revision=4))
    assert info.value.compact_revision == 5
    # Like etcd, the compact revision itself is still watchable.
    stream = store.watch("k", start_revision=5)
    _, replay = await take(stream, 2)
    assert [e.revision for e in replay.events] == [5]
    await stream.aclose()  # type: ignore[attr-defined]


async def test_disconnect_watches_raises_connection_error() -> None:
    store = MemoryStore()
    stream = store.watch("")
    await take(stream, 1)
    store.disconnect_watches()
    with pytest.raises(EtcdConnectionError):
        await anext(stream)


async def test_progress_notify_reaches_watchers() -> None:
    store = MemoryStore()
    stream = store.watch("")
    await take(stream, 1)
    await store.put("x", b"")
    store.progress_notify()
    _, progress = await take(stream, 2)
    assert progress.progress and progress.header_revision == 2
    await stream.aclose()  # type: ignore[attr-defined]


async def test_unavailable_store_raises_connection_error_for_every_operation() -> None:
    store = MemoryStore()
    store.unavailable = True
    with pytest.raises(EtcdConnectionError):
        await store.put("k", b"")
    with pytest.raises(EtcdConnectionError):
        await store.lease_keepalive(1)
    with pytest.raises(EtcdConnectionError):
        await anext(store.watch(""))
