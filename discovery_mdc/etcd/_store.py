"""The Store protocol the publisher and the watcher use, and an in-memory implementation.

:class:`~discovery_mdc.etcd.EtcdClient` satisfies :class:`Store`. :class:`MemoryStore` follows
etcd's semantics closely enough for unit tests: one revision per write, leases that expire
when the test advances time, watches that replay history from a start revision, compaction,
and dropped connections on demand.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from discovery_mdc.errors import EtcdCompactedError, EtcdConnectionError, EtcdError
from discovery_mdc.etcd._codec import (
    KeyValue,
    Lease,
    LeaseInfo,
    RangeResult,
    WatchEvent,
    WatchResponse,
)

__all__ = ["MemoryStore", "Store"]


@runtime_checkable
class Store(Protocol):
    """The etcd operations discovery needs. Implemented by EtcdClient and MemoryStore."""

    async def range_prefix_all(
        self,
        prefix: str,
        *,
        page_size: int = 500,
        keys_only: bool = False,
        revision: int | None = None,
    ) -> RangeResult:
        """Every key under ``prefix``, as one snapshot at ``RangeResult.revision`` (pinned at
        ``revision`` if given); values left out with ``keys_only``."""
        ...

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
        """One range read, with etcd's options (see ``EtcdClient.range``)."""
        ...

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> bool:
        """Put ``key`` only if absent; False if it existed."""
        ...

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Write ``key``; returns the revision."""
        ...

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete ``key`` (or the prefix); returns how many keys went."""
        ...

    async def lease_grant(self, ttl: int) -> Lease:
        """Grant a lease of ``ttl`` seconds."""
        ...

    async def lease_keepalive(self, lease_id: int) -> int:
        """Refresh a lease; its new TTL, 0 if it is gone."""
        ...

    async def lease_revoke(self, lease_id: int) -> bool:
        """Revoke a lease and delete its keys; False if it was unknown."""
        ...

    async def lease_time_to_live(self, lease_id: int, *, keys: bool = True) -> LeaseInfo:
        """(remaining TTL, granted TTL, attached keys); TTL is -1 for an unknown lease."""
        ...

    def watch(
        self,
        key: str,
        *,
        prefix: bool = True,
        start_revision: int | None = None,
        prev_kv: bool = True,
        progress_notify: bool = True,
    ) -> AsyncIterator[WatchResponse]:
        """Stream changes from ``start_revision``; raises on compaction or disconnect."""
        ...


@dataclass(slots=True)
class _MemLease:
    ttl: int
    expires_at: float
    keys: set[str] = field(default_factory=set)


@dataclass(slots=True, eq=False)
class _MemWatch:
    key: str
    prefix: bool
    prev_kv: bool
    queue: asyncio.Queue[WatchResponse | BaseException] = field(default_factory=asyncio.Queue)

    def matches(self, key: str) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key

    def offer(self, revision: int, events: Iterable[WatchEvent]) -> None:
        mine = tuple(
            e if self.prev_kv else WatchEvent(e.type, e.kv)
            for e in events
            if self.matches(e.kv.key)
        )
        if mine:
            self.queue.put_nowait(WatchResponse(revision, mine))


def _gateway_size(kvs: Iterable[KeyValue], count: int) -> int:
    """Bytes of the JSON the etcd gateway would answer a range with."""

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    body = {
        "header": {"cluster_id": "1" * 20, "member_id": "1" * 20, "revision": "1" * 6},
        "kvs": [
            {
                "key": b64(kv.key.encode("utf-8", "surrogateescape")),
                "create_revision": str(kv.create_revision),
                "mod_revision": str(kv.mod_revision),
                "version": str(kv.version),
                **({"value": b64(kv.value)} if kv.value else {}),
                **({"lease": str(kv.lease)} if kv.lease else {}),
            }
            for kv in kvs
        ],
        "count": str(count),
    }
    return len(json.dumps(body, separators=(",", ":")))


class MemoryStore:
    """An in-memory :class:`Store` with a manual clock for lease expiry.

    Time starts at 0 and moves only through :meth:`advance`. Set :attr:`unavailable` to make
    every operation raise :class:`EtcdConnectionError`, as if etcd were down.
    """

    def __init__(self, *, min_ttl: int = 1) -> None:
        self.now = 0.0
        self.revision = 1  # etcd starts at revision 1 with an empty store
        self.compact_revision = 0
        self.cluster_id = 0x7B5A1C3E9D2F4A61
        self.unavailable = False
        self.min_ttl = min_ttl
        self._kvs: dict[str, KeyValue] = {}
        self._history: list[tuple[int, WatchEvent]] = []
        self._leases: dict[int, _MemLease] = {}
        self._watches: set[_MemWatch] = set()
        self._lease_ids = itertools.count(0x694D9981145A6100)
        self.calls: list[str] = []  # operation names, for tests that count calls

    # ------------------------------------------------------------------ test controls

    def advance(self, seconds: float) -> None:
        """Move the clock forward and expire every lease whose TTL ran out."""
        self.now += seconds
        for lease_id in [i for i, le in self._leases.items() if le.expires_at <= self.now]:
            self.expire_lease(lease_id)

    def expire_lease(self, lease_id: int) -> None:
        """Expire a lease now, deleting its keys (a no-op for an unknown lease)."""
        lease = self._leases.pop(lease_id, None)
        if lease is not None:
            self._delete_keys(sorted(lease.keys))

    def compact(self, revision: int) -> None:
        """Discard history before ``revision``; watches starting earlier raise compacted."""
        if revision > self.revision:
            raise EtcdError(f"compact: revision {revision} is a future revision")
        self.compact_revision = max(self.compact_revision, revision)
        cut = bisect.bisect_left([r for r, _ in self._history], revision)
        del self._history[:cut]

    def wipe(self, *, cluster_id: int | None = None) -> None:
        """Lose everything, as etcd restarted with its data dir wiped: no keys, leases or
        history, revision 1 again (``cluster_id`` changes it too, as a different cluster);
        open watches drop."""
        self.disconnect_watches()
        self.revision = 1
        self.compact_revision = 0
        self._kvs.clear()
        self._history.clear()
        self._leases.clear()
        if cluster_id is not None:
            self.cluster_id = cluster_id

    def disconnect_watches(self) -> None:
        """Make every open watch raise EtcdConnectionError, like a dropped connection."""
        for w in self._watches:
            w.queue.put_nowait(EtcdConnectionError("memory store: watch connection dropped"))

    def progress_notify(self) -> None:
        """Send a progress notification to every open watch."""
        for w in self._watches:
            w.queue.put_nowait(WatchResponse(self.revision, (), progress=True))

    def leases(self) -> dict[int, LeaseInfo]:
        """Every live lease: id → (remaining TTL, granted TTL, keys)."""
        return {
            i: LeaseInfo(max(0, int(le.expires_at - self.now)), le.ttl, tuple(sorted(le.keys)))
            for i, le in self._leases.items()
        }

    def get(self, key: str) -> KeyValue | None:
        """The current value of ``key`` (no failure injection; for assertions)."""
        return self._kvs.get(key)

    def keys(self) -> list[str]:
        """Every key, sorted."""
        return sorted(self._kvs)

    # ------------------------------------------------------------------ internals

    def _check(self, op: str) -> None:
        self.calls.append(op)
        if self.unavailable:
            raise EtcdConnectionError(f"memory store unavailable ({op})")

    def _commit(self, events: list[WatchEvent]) -> None:
        for e in events:
            self._history.append((self.revision, e))
        for w in self._watches:
            w.offer(self.revision, events)

    def _put(self, key: str, value: bytes, lease: int | None) -> int:
        if lease and lease not in self._leases:
            raise EtcdError(f"memory store: put {key!r}: requested lease {lease:x} not found")
        prev = self._kvs.get(key)
        if prev is not None and prev.lease and prev.lease in self._leases:
            self._leases[prev.lease].keys.discard(key)
        self.revision += 1
        kv = KeyValue(
            key=key,
            value=value,
            create_revision=prev.create_revision if prev else self.revision,
            mod_revision=self.revision,
            version=prev.version + 1 if prev else 1,
            lease=lease or 0,
        )
        self._kvs[key] = kv
        if lease:
            self._leases[lease].keys.add(key)
        self._commit([WatchEvent("PUT", kv, prev)])
        return self.revision

    def _delete_keys(self, keys: list[str]) -> int:
        present = [k for k in keys if k in self._kvs]
        if not present:
            return 0
        self.revision += 1
        events = []
        for k in present:
            prev = self._kvs.pop(k)
            if prev.lease in self._leases:
                self._leases[prev.lease].keys.discard(k)
            events.append(WatchEvent("DELETE", KeyValue(k, b"", mod_revision=self.revision), prev))
        self._commit(events)
        return len(present)

    # ------------------------------------------------------------------ Store

    def _kvs_at(self, revision: int | None) -> dict[str, KeyValue]:
        """The keys at ``revision``: the current ones with later history undone."""
        if revision is None or revision == self.revision:
            return self._kvs
        if revision > self.revision:
            raise EtcdError(f"memory store: revision {revision} is a future revision")
        if revision < self.compact_revision:
            raise EtcdCompactedError(
                self.compact_revision,
                f"memory store: revision {revision} is compacted "
                f"(compact_revision={self.compact_revision})",
            )
        kvs = dict(self._kvs)
        for rev, event in reversed(self._history):
            if rev <= revision:
                break
            if event.prev_kv is None:
                kvs.pop(event.kv.key, None)
            else:
                kvs[event.kv.key] = event.prev_kv
        return kvs

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
        """A range read with etcd's semantics: ``count`` counts every key in the range
        (before ``limit`` and ``min_mod_revision``), ``revision`` is the current one, and
        ``size`` is what the gateway's JSON answer would weigh."""
        self._check("range")
        kvs = self._kvs_at(revision)
        matched = [kvs[k] for k in sorted(kvs) if (k.startswith(key) if prefix else k == key)]
        count = len(matched)
        if count_only:
            matched = []
        if min_mod_revision:
            matched = [kv for kv in matched if kv.mod_revision >= min_mod_revision]
        more = bool(limit) and len(matched) > (limit or 0)
        if limit and more:
            matched = matched[:limit]
        if keys_only:
            matched = [dataclasses.replace(kv, value=b"") for kv in matched]
        size = _gateway_size(matched, count)
        return RangeResult(tuple(matched), self.revision, more, count, size, self.cluster_id)

    async def range_prefix_all(
        self,
        prefix: str,
        *,
        page_size: int = 500,
        keys_only: bool = False,
        revision: int | None = None,
    ) -> RangeResult:
        """Every key under ``prefix`` at the current revision (or at ``revision``)."""
        self._check("range_prefix_all")
        kvs = self._kvs_at(revision)
        found = [kvs[k] for k in sorted(kvs) if k.startswith(prefix)]
        if keys_only:
            found = [dataclasses.replace(kv, value=b"") for kv in found]
        size = _gateway_size(found, len(found))
        return RangeResult(
            tuple(found), revision or self.revision, False, len(found), size, self.cluster_id
        )

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> bool:
        """Put ``key`` only if absent; False if it existed."""
        self._check("create")
        if key in self._kvs:
            return False
        self._put(key, value, lease)
        return True

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Write ``key``; returns the revision."""
        self._check("put")
        return self._put(key, value, lease)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it)."""
        self._check("delete")
        keys = sorted(k for k in self._kvs if k.startswith(key)) if prefix else [key]
        return self._delete_keys(keys)

    async def lease_grant(self, ttl: int) -> Lease:
        """Grant a lease; TTLs below ``min_ttl`` are raised, as etcd does."""
        self._check("lease_grant")
        ttl = max(ttl, self.min_ttl)
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _MemLease(ttl, self.now + ttl)
        return Lease(lease_id, ttl)

    async def lease_keepalive(self, lease_id: int) -> int:
        """Refresh a lease; 0 if it is gone."""
        self._check("lease_keepalive")
        lease = self._leases.get(lease_id)
        if lease is None:
            return 0
        lease.expires_at = self.now + lease.ttl
        return lease.ttl

    async def lease_revoke(self, lease_id: int) -> bool:
        """Revoke a lease and delete its keys."""
        self._check("lease_revoke")
        if lease_id not in self._leases:
            return False
        self.expire_lease(lease_id)
        return True

    async def lease_time_to_live(self, lease_id: int, *, keys: bool = True) -> LeaseInfo:
        """(remaining TTL, granted TTL, attached keys); TTL is -1 for an unknown lease."""
        self._check("lease_time_to_live")
        info = self.leases().get(lease_id)
        if info is None:
            return LeaseInfo(-1, 0, ())
        return info if keys else info._replace(keys=())

    async def watch(
        self,
        key: str,
        *,
        prefix: bool = True,
        start_revision: int | None = None,
        prev_kv: bool = True,
        progress_notify: bool = True,
    ) -> AsyncIterator[WatchResponse]:
        """Replay history from ``start_revision``, then stream live changes."""
        self._check("watch")
        if start_revision is not None and 0 < start_revision < self.compact_revision:
            raise EtcdCompactedError(
                self.compact_revision,
                f"memory store: watch on {key!r} from revision {start_revision} is compacted "
                f"(compact_revision={self.compact_revision})",
            )
        w = _MemWatch(key, prefix, prev_kv)
        # Replay and registration happen with no await in between, so nothing is missed.
        created_rev = self.revision
        if start_revision is not None and start_revision <= self.revision:
            created_rev = start_revision - 1
            by_rev: dict[int, list[WatchEvent]] = {}
            for rev, event in self._history:
                if rev >= start_revision:
                    by_rev.setdefault(rev, []).append(event)
            for rev, events in by_rev.items():
                w.offer(rev, events)
        self._watches.add(w)
        try:
            yield WatchResponse(created_rev, (), created=True)
            while True:
                item = await w.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._watches.discard(w)
