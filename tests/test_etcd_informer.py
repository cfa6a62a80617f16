"""PrefixInformer against MemoryStore with virtual time: no sockets, no real sleeps.

Every interval, grace and backoff waits on ``FakeClock``; a test moves time on explicitly.
Watches that lose events, stay silent or lag are the ``RecordingStore`` switches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from discovery_mdc.etcd import Change, ChangeBatch, ChangeKind, MemoryStore, PrefixInformer
from testkit import FakeClock, RecordingStore, wait_until

PREFIX = "v1/mdc/"
INTERVAL = 5.0
GRACE = 1.0
BACKOFF = 0.5  # the first backoff delay with rng=1.0
NO_RELIST_AFTER_START = {"start": 1, "compaction": 0, "reconcile": 0, "history_lost": 0}


def k(i: int) -> str:
    return f"{PREFIX}ns/c/e/{i:x}"


class Got:
    """Collects an informer's batches in the background."""

    def __init__(self, informer: PrefixInformer) -> None:
        self.batches: list[ChangeBatch] = []

        async def run() -> None:
            async for batch in informer.batches():
                self.batches.append(batch)

        self.task = asyncio.create_task(run())

    def origins(self) -> list[str]:
        return [b.origin for b in self.batches]

    def changes(self, origin: str | None = None) -> list[tuple[ChangeKind, str]]:
        return [
            (c.kind, c.key)
            for b in self.batches
            if origin is None or b.origin == origin
            for c in b.changes
        ]

    def held(self) -> set[str]:
        """The keys a consumer applying every batch in order would hold."""
        held: set[str] = set()
        for b in self.batches:
            for c in b.changes:
                (held.add if c.kind is ChangeKind.PUT else held.discard)(c.key)
        return held


@pytest.fixture
def store() -> RecordingStore:
    return RecordingStore()


@pytest.fixture
def vt() -> FakeClock:
    return FakeClock()


@asynccontextmanager
async def running(
    store: MemoryStore, vt: FakeClock, **kwargs: Any
) -> AsyncIterator[tuple[PrefixInformer, Got]]:
    kwargs.setdefault("reconcile_interval", INTERVAL)
    kwargs.setdefault("watch_grace", GRACE)
    informer = PrefixInformer(
        store, PREFIX, clock=vt.clock, sleep=vt.sleep, rng=lambda: 1.0, **kwargs
    )
    async with informer:
        got = Got(informer)
        await wait_until(lambda: informer.connected)
        yield informer, got
    await asyncio.wait_for(got.task, 10)


async def in_background(vt: FakeClock, coro: Any, *, advance: float) -> Any:
    """Run ``coro``; once it waits on a virtual sleep of ``advance`` seconds, move time on."""
    task = asyncio.ensure_future(coro)
    await wait_until(lambda: task.done() or vt.sleeping(advance) > 0)
    if not task.done():
        await vt.advance(advance)
    return await asyncio.wait_for(task, 10)


# --------------------------------------------------------------------------- list and watch


async def test_lists_then_watches_from_the_listed_revision_plus_one(
    store: RecordingStore, vt: FakeClock
) -> None:
    await store.put(k(1), b"a")
    await store.put("v1/other/x", b"not ours")
    listed_at = store.revision
    async with running(store, vt) as (informer, got):
        await wait_until(lambda: got.origins() == ["start"])
        assert got.batches[0].changes == (Change(ChangeKind.PUT, k(1), b"a", 2),)
        assert store.watch_starts == [listed_at + 1]
        rev = await store.put(k(2), b"b")
        await wait_until(lambda: len(got.batches) == 2)
        put = Change(ChangeKind.PUT, k(2), b"b", rev)
        assert got.batches[1] == ChangeBatch((put,), rev, "watch")
        assert informer.revision == rev and informer.stats.events_put == 1
        assert informer.stats.relists == NO_RELIST_AFTER_START


async def test_disconnect_resumes_after_the_highest_revision_without_duplicates_or_losses(
    store: RecordingStore, vt: FakeClock
) -> None:
    async with running(store, vt) as (informer, got):
        await store.put(k(1), b"a")
        await wait_until(lambda: got.held() == {k(1)})
        before = informer.revision
        store.disconnect_watches()
        await wait_until(lambda: vt.sleeping(BACKOFF) == 1)  # backing off
        assert not informer.connected
        await store.delete(k(1))
        await store.put(k(2), b"b")
        await vt.advance(BACKOFF)
        await wait_until(lambda: got.held() == {k(2)})
        assert store.watch_starts == [2, before + 1]
        assert informer.stats.reconnects == 1 and informer.stats.relists["compaction"] == 0
        assert (informer.stats.events_put, informer.stats.events_delete) == (2, 1)
        assert got.changes() == [
            (ChangeKind.PUT, k(1)),
            (ChangeKind.DELETE, k(1)),
            (ChangeKind.PUT, k(2)),
        ]


async def test_a_compacted_resume_relists_and_yields_deletes_then_upserts(
    store: RecordingStore, vt: FakeClock
) -> None:
    for i in (1, 2, 3):
        await store.put(k(i), b"v")
    async with running(store, vt) as (informer, got):
        store.disconnect_watches()
        await wait_until(lambda: vt.sleeping(BACKOFF) == 1)
        await store.delete(k(1))
        await store.put(k(2), b"new")
        await store.put(k(5), b"x")
        await store.delete(k(5))  # created and deleted while away: never seen
        await store.put(k(6), b"y")
        store.compact(store.revision)
        await vt.advance(BACKOFF)
        await wait_until(lambda: "compaction" in got.origins())
        batch = got.batches[-1]
        assert [(c.kind, c.key) for c in batch.changes] == [
            (ChangeKind.DELETE, k(1)),
            (ChangeKind.PUT, k(2)),
            (ChangeKind.PUT, k(6)),
        ]
        assert informer.stats.relists["compaction"] == 1
        await wait_until(lambda: store.watch_starts[-1] == store.revision + 1)
        assert got.held() == set(store.keys())


# --------------------------------------------------------------------------- reconcile cost


async def _informer_with(keys: int, vt: FakeClock) -> tuple[MemoryStore, int]:
    """Bytes one clean reconcile reads for a prefix of ``keys`` ~2 KB values."""
    store = MemoryStore()
    for i in range(keys):
        await store.put(k(i), b"x" * 2300)
    async with running(store, vt) as (informer, _):
        assert await informer.reconcile() == "clean"
        return store, informer.stats.reconcile_bytes


async def test_a_clean_reconcile_reads_a_constant_few_hundred_bytes_whatever_the_key_count(
    vt: FakeClock,
) -> None:
    _, small = await _informer_with(10, vt)
    _, large = await _informer_with(1000, vt)
    assert small < 300 and large < 300
    assert abs(large - small) <= 8  # only the digits of the count and revision differ


async def test_a_reconcile_reads_keys_changed_since_the_last_check_without_values(
    store: RecordingStore, vt: FakeClock
) -> None:
    async with running(store, vt) as (informer, got):
        base = informer.stats.reconcile_bytes
        assert await informer.reconcile() == "clean"
        idle = informer.stats.reconcile_bytes - base
        for i in range(20):
            await store.put(k(i), b"x" * 2300)
        await wait_until(lambda: len(got.held()) == 20)
        before = informer.stats.reconcile_bytes
        assert await informer.reconcile() == "clean"
        busy = informer.stats.reconcile_bytes - before
        assert idle + 20 * 60 < busy < idle + 20 * 200  # ~100 B per changed key, no values
        before = informer.stats.reconcile_bytes
        assert await informer.reconcile() == "clean"  # verified: back to the constant cost
        assert informer.stats.reconcile_bytes - before <= idle + 4
        assert informer.stats.checks == {
            "count": 3,
            "quick": 1,
            "exact": 0,
            "listing": 0,
            "fetch": 0,
        }


async def test_while_nothing_in_etcd_changes_a_reconcile_only_counts(
    store: RecordingStore, vt: FakeClock
) -> None:
    await store.put(k(1), b"a")
    async with running(store, vt) as (informer, _):
        assert await informer.reconcile() == "clean"
        assert (informer.stats.checks["count"], informer.stats.checks["quick"]) == (1, 0)
        # A write elsewhere moves etcd's revision: the next check reads what changed under
        # the prefix (nothing), proves the state at the new revision, and counting suffices again.
        await store.put("v1/elsewhere", b"x")
        assert await informer.reconcile() == "clean"
        assert (informer.stats.checks["count"], informer.stats.checks["quick"]) == (2, 1)
        assert informer.revision == store.revision
        assert await informer.reconcile() == "clean"
        assert (informer.stats.checks["count"], informer.stats.checks["quick"]) == (3, 1)


async def test_reconciles_run_every_interval_on_the_injected_clock(
    store: RecordingStore, vt: FakeClock
) -> None:
    async with running(store, vt) as (informer, _):
        assert vt.sleeping(INTERVAL) == 1
        await vt.advance(INTERVAL)
        await wait_until(lambda: informer.stats.checks["count"] == 1 and vt.sleeping(INTERVAL) == 1)
        await vt.advance(INTERVAL)
        await wait_until(lambda: informer.stats.checks["count"] == 2)


async def test_reconcile_interval_zero_disables_the_loop(
    store: RecordingStore, vt: FakeClock
) -> None:
    async with running(store, vt, reconcile_interval=0) as (informer, _):
        assert vt.sleeping() == 0
        assert informer.stats.checks["count"] == 0


# --------------------------------------------------------------------------- repairs


async def test_reconcile_repairs_a_missed_put_and_a_missed_delete_without_a_relist(
    store: RecordingStore, vt: FakeClock
) -> None:
    await store.put(k(2), b"b")
    async with running(store, vt) as (informer, got):
        await store.put(k(1), b"a")
        store.dropped = {k(1), k(3)}  # the watch loses these events ...
        await store.delete(k(1))
        await store.put(k(3), b"c")
        await store.put(k(4), b"d")  # ... and delivers this one, so it moves past them
        await wait_until(lambda: k(4) in got.held())
        assert got.held() == {k(1), k(2), k(4)}
        store.dropped = set()
        outcome = await in_background(vt, informer.reconcile(), advance=GRACE)
        assert outcome == "repaired"
        repair = got.batches[-1]
        assert repair.origin == "repair"
        assert repair.changes == (
            Change(ChangeKind.DELETE, k(1), mod_revision=store.revision),
            Change(ChangeKind.PUT, k(3), b"c", store.revision - 1),
        )
        assert got.held() == set(store.keys())
        s = informer.stats
        assert s.relists == NO_RELIST_AFTER_START
        assert s.repairs == {"put": 1, "delete": 1}
        assert s.checks == {"count": 1, "quick": 1, "exact": 1, "listing": 0, "fetch": 1}
        # A watch that lost events is not trusted: it is restarted after the repair.
        assert len(store.watch_starts) == 2 and s.reconnects == 1
        await store.put(k(5), b"e")
        await wait_until(lambda: k(5) in got.held())


async def test_a_missed_delete_of_an_old_key_is_found_by_a_keys_only_listing(
    store: RecordingStore, vt: FakeClock
) -> None:
    await store.put(k(1), b"a")
    await store.put(k(2), b"b")
    async with running(store, vt) as (informer, got):
        store.dropped = {k(1)}
        await store.delete(k(1))  # listed at start, deleted unseen
        store.dropped = set()
        await store.put(k(3), b"c")
        await wait_until(lambda: k(3) in got.held())
        assert await in_background(vt, informer.reconcile(), advance=GRACE) == "repaired"
        assert got.changes("repair") == [(ChangeKind.DELETE, k(1))]
        assert informer.stats.checks["listing"] == 1
        assert informer.stats.relists["reconcile"] == 0
        assert got.held() == set(store.keys())


async def test_more_missed_puts_than_worth_fetching_one_by_one_relist_instead(
    store: RecordingStore, vt: FakeClock
) -> None:
    async with running(store, vt, max_repair_fetches=1) as (informer, got):
        store.dropped = {k(1), k(2)}
        await store.put(k(1), b"a")
        await store.put(k(2), b"b")
        store.dropped = set()
        await store.put(k(3), b"c")
        await wait_until(lambda: k(3) in got.held())
        assert await in_background(vt, informer.reconcile(), advance=GRACE) == "relisted"
        assert informer.stats.relists["reconcile"] == 1
        assert got.held() == set(store.keys())


# --------------------------------------------------------------------------- lost history


async def test_etcd_back_with_its_data_wiped_is_relisted_from_scratch_and_watched_anew(
    store: RecordingStore, vt: FakeClock
) -> None:
    for i in (1, 2, 3):
        await store.put(k(i), b"old")
    async with running(store, vt) as (informer, got):
        await store.put(k(4), b"old")
        await wait_until(lambda: got.held() == {k(1), k(2), k(3), k(4)})
        before = informer.revision
        store.wipe()  # revision 1 again; the watch drops
        await store.put(k(2), b"new")  # a worker registers again, at a lower revision
        assert store.revision < before
        await wait_until(lambda: vt.sleeping(BACKOFF) == 1)
        await vt.advance(BACKOFF)  # the probe after the backoff sees etcd behind the state
        await wait_until(lambda: "history_lost" in got.origins())
        batch = got.batches[-1]
        assert [(c.kind, c.key, c.value) for c in batch.changes] == [
            (ChangeKind.DELETE, k(1), b""),
            (ChangeKind.DELETE, k(3), b""),
            (ChangeKind.DELETE, k(4), b""),
            (ChangeKind.PUT, k(2), b"new"),
        ]
        assert informer.stats.relists["history_lost"] == 1
        assert informer.revision == store.revision
        await wait_until(
            lambda: informer.connected and store.watch_starts[-1] == store.revision + 1
        )
        rev = await store.put(k(5), b"later")  # the new watch delivers what follows
        await wait_until(lambda: got.held() == {k(2), k(5)} and informer.revision == rev)


async def test_a_reconcile_notices_etcd_went_back_and_relists(
    store: RecordingStore, vt: FakeClock
) -> None:
    await store.put(k(1), b"a")
    await store.put(k(3), b"c")
    async with running(store, vt) as (informer, got):
        store.wipe()
        await store.put(k(2), b"b")
        assert store.revision < informer.revision
        # Before the watch loop probes (virtual time stands still), the periodic check reads
        # a header revision below the state's.
        assert await informer.reconcile() == "relisted"
        await wait_until(lambda: got.held() == {k(2)})
        assert informer.stats.relists["history_lost"] == 1
        await wait_until(
            lambda: informer.connected and store.watch_starts[-1] == store.revision + 1
        )
        await store.put(k(4), b"d")
        await wait_until(lambda: got.held() == {k(2), k(4)})


async def test_another_cluster_id_is_lost_history_even_at_a_higher_revision(
    store: RecordingStore, vt: FakeClock
) -> None:
    await store.put(k(1), b"a")
    async with running(store, vt, reconcile_interval=0) as (informer, got):
        before = informer.revision
        store.wipe(cluster_id=0xC0FFEE)
        for i in range(before + 2):
            await store.put(k(2), f"v{i}".encode())
        assert store.revision > before
        await wait_until(lambda: vt.sleeping(BACKOFF) == 1)
        await vt.advance(BACKOFF)
        await wait_until(lambda: got.held() == {k(2)})
        assert informer.stats.relists["history_lost"] == 1
        assert got.batches[-1].changes[-1].value == f"v{before + 1}".encode()


async def test_a_key_etcd_holds_at_an_older_revision_than_seen_is_lost_history(
    store: RecordingStore, vt: FakeClock
) -> None:
    await store.put(k(0), b"a")
    await store.put(k(1), b"old")  # known at revision 3
    async with running(store, vt) as (informer, got):
        store.wipe()  # same cluster id; the new history overtakes the old revision
        await store.put(k(1), b"new")  # revision 2
        for _ in range(3):
            await store.put(k(2), b"x")
        await wait_until(lambda: vt.sleeping(BACKOFF) == 1)
        await vt.advance(BACKOFF)  # etcd is ahead: the watch resumes, sees only k(2)
        await wait_until(lambda: k(2) in got.held())
        assert await in_background(vt, informer.reconcile(), advance=GRACE) == "relisted"
        assert informer.stats.relists["history_lost"] == 1
        await wait_until(lambda: got.held() == {k(1), k(2)})
        assert [c for c in got.changes("history_lost") if c[1] == k(1)] == [(ChangeKind.PUT, k(1))]


# --------------------------------------------------------------------------- silent and slow


async def test_a_silent_watch_is_restarted_after_the_grace_and_no_relist(
    store: RecordingStore, vt: FakeClock
) -> None:
    async with running(store, vt) as (informer, got):
        assert await informer.reconcile() == "clean"  # quiet: nothing restarted
        before = informer.revision
        store.muted = True  # half-open: etcd changes, the watch says nothing
        await store.put(k(1), b"a")
        task = asyncio.ensure_future(informer.reconcile())
        await wait_until(lambda: vt.sleeping(GRACE) == 1)
        assert len(store.watch_starts) == 1  # not before the grace is over
        await vt.advance(GRACE)
        assert await asyncio.wait_for(task, 10) == "caught-up"
        store.muted = False
        await wait_until(lambda: got.held() == {k(1)})
        assert store.watch_starts == [before + 1, before + 1]  # resumed, not relisted
        assert informer.stats.reconnects == 1
        assert informer.stats.relists == NO_RELIST_AFTER_START


async def test_changes_still_in_flight_on_a_slow_watch_restart_nothing(
    store: RecordingStore, vt: FakeClock
) -> None:
    async with running(store, vt) as (informer, got):
        store.held = True
        await store.put(k(1), b"a")
        task = asyncio.ensure_future(informer.reconcile())
        await wait_until(lambda: vt.sleeping(GRACE) == 1)
        store.release()  # the stream delivers within the grace
        assert await asyncio.wait_for(task, 10) == "caught-up"
        await wait_until(lambda: got.held() == {k(1)})
        assert len(store.watch_starts) == 1 and informer.stats.reconnects == 0
        assert informer.stats.repairs == {"put": 0, "delete": 0}


async def test_a_check_whose_revision_was_compacted_relists(
    store: RecordingStore, vt: FakeClock
) -> None:
    async with running(store, vt) as (informer, got):
        store.muted = True
        await store.put(k(1), b"a")
        await store.put(k(2), b"b")
        store.compact(store.revision)
        assert await in_background(vt, informer.reconcile(), advance=GRACE) == "relisted"
        assert informer.stats.relists["compaction"] == 1
        assert got.held() == {k(1), k(2)}


async def test_silence_counts_virtual_seconds_since_the_last_delivery(
    store: RecordingStore, vt: FakeClock
) -> None:
    async with running(store, vt, reconcile_interval=0) as (informer, _):
        await vt.advance(7)
        assert informer.silence() == 7
        store.progress_notify()
        await wait_until(lambda: informer.silence() == 0)


async def test_close_ends_the_batch_stream(store: RecordingStore, vt: FakeClock) -> None:
    async with running(store, vt) as (informer, got):
        pass
    assert got.task.done() and not informer.connected
