"""ModelWatcher against MemoryStore, with a fake resolver, prepare hook and clock.

Nothing here opens a socket or sleeps for real: the fake clock records every sleep; backoffs
jump at once (or wait while the test holds the clock) and the reconcile interval waits for the
test to advance it, and conditions are awaited by polling
under a generous deadline. The informer underneath has its own tests
(``test_etcd_informer.py``); these check that its batches reach the registry as model events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from discovery_mdc.card import (
    ModelDeploymentCard,
    mdcsum,
)
from discovery_mdc.etcd import MemoryStore
from discovery_mdc.frontend import EventKind, ModelEvent, ModelWatcher
from testkit import (
    FakeClock,
    FakeResolver,
    RecordingStore,
    envelope_kv,
    instance_key,
    make_card,
    publish,
    wait_until,
)

RECONCILE = 1234.0  # the reconcile interval; the fake clock holds it until advanced
DEADLINE = 10.0


# --------------------------------------------------------------------------- fakes


def backoffs(clock: FakeClock) -> list[float]:
    """The watcher's backoff sleeps (every sleep but the reconcile interval)."""
    return [d for d in clock.sleeps if d != RECONCILE]


class Collector:
    """Collects a watcher's events in the background from the moment it is created."""

    def __init__(self, watcher: ModelWatcher) -> None:
        self.events: list[ModelEvent] = []
        stream = watcher.events()

        async def run() -> None:
            async for event in stream:
                self.events.append(event)

        self.task = asyncio.create_task(run())

    def kinds(self, model: str | None = None) -> list[EventKind]:
        return [e.kind for e in self.events if model is None or e.model == model]


@dataclass
class Harness:
    store: RecordingStore
    resolver: FakeResolver
    clock: FakeClock
    watcher: ModelWatcher

    def keys_in_etcd(self) -> set[str]:
        return set(self.store.keys())

    def metric(self, name: str, **labels: str) -> float:
        got = self.watcher.metrics.registry.get_sample_value(name, labels)
        return 0.0 if got is None else got


@pytest.fixture
def store() -> RecordingStore:
    return RecordingStore()


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver()


@pytest.fixture
def clock() -> FakeClock:
    """Backoff sleeps jump at once (unless held); the reconcile sleep waits for the test."""
    return FakeClock(jump_below=RECONCILE)


@asynccontextmanager
async def running(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock, **kwargs: Any
) -> AsyncIterator[Harness]:
    kwargs.setdefault("prepare", None)
    async with ModelWatcher(
        store, resolver=resolver, sleep=clock.sleep, reconcile_interval=RECONCILE, **kwargs
    ) as watcher:
        yield Harness(store, resolver, clock, watcher)


def names(watcher: ModelWatcher) -> list[str]:
    return [m.name for m in watcher.models()]


def instances(watcher: ModelWatcher, name: str) -> set[str]:
    info = watcher.model(name)
    assert info is not None, f"model {name!r} is not listed"
    return {k for ws in info.worker_sets for k in ws.instances}


def all_instances(watcher: ModelWatcher) -> set[str]:
    return {k for m in watcher.models() for ws in m.worker_sets for k in ws.instances}


async def publish_models(store: MemoryStore, items: Iterable[tuple[int, str]]) -> None:
    for instance, name in items:
        await publish(store, instance, make_card(name))


# --------------------------------------------------------------------------- list and watch


async def test_lists_then_watches_from_the_listed_revision_plus_one(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    await publish_models(store, [(1, "org/a")])
    listed_at = store.revision
    async with running(store, resolver, clock) as h:
        await wait_until(lambda: names(h.watcher) == ["org/a"])
        assert store.watch_starts == [listed_at + 1]
        await publish_models(store, [(2, "org/b")])
        await wait_until(lambda: names(h.watcher) == ["org/a", "org/b"])
        assert h.watcher.revision == store.revision
        assert h.metric("discovery_mdc_watch_events_total", type="put") == 1  # only the watched PUT
        assert h.metric("discovery_mdc_relists_total", reason="start") == 1


async def test_disconnect_resumes_after_the_highest_revision_without_duplicates_or_losses(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    async with running(store, resolver, clock) as h:
        await publish_models(store, [(1, "org/a"), (2, "org/b")])
        await wait_until(lambda: names(h.watcher) == ["org/a", "org/b"])
        seen = Collector(h.watcher)
        before = h.watcher.revision
        assert before == store.revision

        clock.hold()
        store.disconnect_watches()
        await wait_until(lambda: len(backoffs(clock)) == 1)  # the watcher is backing off now
        assert not h.watcher.connected
        await store.delete(instance_key(1))
        await publish_models(store, [(3, "org/c"), (4, "org/b")])  # new model; b gets a replica
        clock.release()

        await wait_until(lambda: names(h.watcher) == ["org/b", "org/c"])
        await wait_until(lambda: all_instances(h.watcher) == h.keys_in_etcd())
        assert store.watch_starts == [2, before + 1]  # listed an empty store at revision 1
        assert h.metric("discovery_mdc_watch_reconnects_total") == 1
        assert h.metric("discovery_mdc_relists_total", reason="compaction") == 0
        # Each PUT and DELETE was seen exactly once, replays included.
        assert h.metric("discovery_mdc_watch_events_total", type="put") == 4
        assert h.metric("discovery_mdc_watch_events_total", type="delete") == 1
        assert [resolver.count(n) for n in ("org/a", "org/b", "org/c")] == [1, 1, 1]
        await wait_until(lambda: EventKind.ADDED in seen.kinds("org/c"))
        assert seen.kinds("org/a") == [EventKind.REMOVED]
        assert seen.kinds("org/b") == [EventKind.UPDATED]


async def test_compacted_watch_relists_and_emits_deletes_and_upserts(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    async with running(store, resolver, clock) as h:
        await publish_models(store, [(1, "org/a"), (2, "org/b"), (3, "org/keep")])
        await wait_until(lambda: len(h.watcher.models()) == 3)
        seen = Collector(h.watcher)

        clock.hold()
        store.disconnect_watches()
        await wait_until(lambda: len(backoffs(clock)) == 1)
        await store.delete(instance_key(1))  # a vanishes
        await publish(store, 2, make_card("org/b", tok="7"))  # b: new incarnation, new files
        await publish_models(store, [(5, "org/new")])
        await store.delete(instance_key(5))  # created and deleted while away: never seen
        await publish_models(store, [(6, "org/new2")])
        store.compact(store.revision)
        clock.release()

        await wait_until(lambda: names(h.watcher) == ["org/b", "org/keep", "org/new2"])
        await wait_until(lambda: all_instances(h.watcher) == h.keys_in_etcd())
        assert h.metric("discovery_mdc_relists_total", reason="compaction") == 1
        await wait_until(lambda: len(seen.events) == 4)  # the collector drains a queue
        info = h.watcher.model("org/b")
        assert info is not None and info.worker_sets[0].mdcsum == mdcsum(
            make_card("org/b", tok="7")
        )
        assert seen.kinds("org/a") == [EventKind.REMOVED]
        assert seen.kinds("org/b") == [EventKind.REMOVED, EventKind.ADDED]
        assert seen.kinds("org/keep") == []
        assert seen.kinds("org/new") == []
        assert seen.kinds("org/new2") == [EventKind.ADDED]
        assert resolver.count("org/new") == 0
        # The watch resumed after the relist's revision, not from the compacted one.
        assert store.watch_starts[-1] == store.revision + 1


async def test_periodic_reconcile_repairs_events_the_watch_lost(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    async with running(store, resolver, clock) as h:
        await publish_models(store, [(1, "org/a"), (2, "org/b")])
        await wait_until(lambda: names(h.watcher) == ["org/a", "org/b"])
        seen = Collector(h.watcher)
        store.dropped = {instance_key(1), instance_key(3)}  # lost by the watch; later events arrive
        await store.delete(instance_key(1))
        await publish_models(store, [(3, "org/c")])
        store.dropped = set()
        await publish_models(store, [(4, "org/b")])
        await wait_until(lambda: instance_key(4) in h.watcher.instance_keys())
        assert names(h.watcher) == ["org/a", "org/b"]  # the watch never said

        await wait_until(lambda: RECONCILE in clock.sleeps)
        await clock.advance(RECONCILE)
        await wait_until(lambda: names(h.watcher) == ["org/b", "org/c"])
        assert all_instances(h.watcher) == h.keys_in_etcd()
        await wait_until(lambda: seen.kinds("org/a") == [EventKind.REMOVED])
        assert h.metric("discovery_mdc_relists_total", reason="reconcile") == 0
        assert h.metric("discovery_mdc_reconcile_repairs_total", kind="put") == 1
        assert h.metric("discovery_mdc_reconcile_repairs_total", kind="delete") == 1
        assert h.metric("discovery_mdc_reconcile_read_bytes_total") > 0


async def test_reconcile_restarts_a_watch_that_stays_silent_while_etcd_changes(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    async with running(store, resolver, clock) as h:
        await wait_until(lambda: h.watcher.connected and clock.sleeps.count(RECONCILE) == 1)
        await clock.advance(RECONCILE)  # a quiet interval: nothing to repair, nothing restarted
        await wait_until(lambda: clock.sleeps.count(RECONCILE) == 2)
        assert len(store.watch_starts) == 1

        store.muted = True  # the connection goes half-open: etcd changes, the watch is silent
        silent_from = h.watcher.revision
        await publish_models(store, [(1, "org/a")])
        await clock.advance(RECONCILE)
        await wait_until(lambda: len(store.watch_starts) == 2)
        assert store.watch_starts[1] == silent_from + 1  # resumed where it went quiet
        store.muted = False
        await wait_until(lambda: names(h.watcher) == ["org/a"])
        assert h.metric("discovery_mdc_watch_reconnects_total") == 1
        assert h.metric("discovery_mdc_relists_total", reason="reconcile") == 0

        await publish_models(store, [(2, "org/b")])
        await wait_until(lambda: names(h.watcher) == ["org/a", "org/b"])  # the new watch delivers


async def test_a_stale_relist_never_undoes_newer_watch_events(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    async with running(store, resolver, clock) as h:
        await publish_models(store, [(1, "org/a")])
        await wait_until(lambda: names(h.watcher) == ["org/a"])
        store.range_gate = asyncio.Event()
        started = store.ranges_started
        reconcile = asyncio.create_task(h.watcher.relist())
        await wait_until(lambda: store.ranges_started == started + 1)  # snapshot taken, held
        await store.delete(instance_key(1))
        await publish_models(store, [(2, "org/b")])
        await wait_until(lambda: names(h.watcher) == ["org/b"])
        store.range_gate.set()
        await reconcile
        # The snapshot still had a and lacked b; applying it blindly would swap them back.
        assert names(h.watcher) == ["org/b"]
        assert all_instances(h.watcher) == h.keys_in_etcd()


async def test_events_for_one_key_are_applied_in_revision_order(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    resolver.gates["org/m"] = gate = asyncio.Event()
    async with running(store, resolver, clock) as h:
        await publish(store, 1, make_card(tok="3"))
        await publish(store, 1, make_card(tok="4"))
        await store.delete(instance_key(1))
        await publish(store, 1, make_card(tok="5"))
        await wait_until(lambda: h.watcher.instance_keys() == {instance_key(1)})
        gate.set()
        await wait_until(lambda: names(h.watcher) == ["org/m"])
        info = h.watcher.model("org/m")
        assert info is not None
        assert [ws.mdcsum for ws in info.worker_sets] == [mdcsum(make_card(tok="5"))]
        assert h.watcher.rejected_keys() == set()


async def test_malformed_value_is_counted_and_skipped(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    async with running(store, resolver, clock) as h:
        await store.put(instance_key(1), b"{not json")
        await store.put(
            "v1/mdc/dynamo/backend/generate/NOT-HEX", envelope_kv(make_card("org/x"), 2)[1]
        )
        await publish_models(store, [(3, "org/good")])
        await wait_until(lambda: names(h.watcher) == ["org/good"])
        assert h.metric("discovery_mdc_malformed_cards_total") == 2
        assert resolver.count("org/x") == 0
        assert h.watcher.instance_keys() == {instance_key(3)}


async def test_a_card_that_cannot_be_hashed_never_stops_the_listing_or_the_watch(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    bad = envelope_kv(make_card("org/bad"), 1)[1].replace(
        b'"runtime_config":{}', b'"runtime_config":{"context_length":-1}'
    )
    assert b'"context_length":-1' in bad
    await store.put(instance_key(1), bad)  # listed at start
    await publish_models(store, [(2, "org/a")])
    async with running(store, resolver, clock) as h:
        await wait_until(lambda: names(h.watcher) == ["org/a"])
        await store.put(instance_key(3), bad.replace(b'"instance_id":1', b'"instance_id":3'))
        await publish_models(store, [(4, "org/b")])  # arrives after it, on the watch
        await wait_until(lambda: names(h.watcher) == ["org/a", "org/b"])
        assert h.metric("discovery_mdc_malformed_cards_total") == 2
        assert h.watcher.instance_keys() == {instance_key(2), instance_key(4)}


async def test_namespace_filter_watches_only_the_admitted_namespace(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    async with running(store, resolver, clock, namespace="ns1") as h:
        await publish(store, 1, make_card("org/ten"), ns="ns10")
        await publish(store, 2, make_card("org/one"), ns="ns1")
        await wait_until(lambda: names(h.watcher) == ["org/one"])
        await wait_until(lambda: h.watcher.revision == store.revision)
        assert resolver.count("org/ten") == 0


# --------------------------------------------------------------------------- pipelines


async def test_listed_replicas_share_one_pipeline_and_every_url_is_an_alternate(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    for i in (1, 2, 3):
        await publish(store, i, make_card(host=f"w{i}"))
    async with running(store, resolver, clock) as h:
        await wait_until(lambda: names(h.watcher) == ["org/m"])
        assert resolver.count("org/m") == 1
        (_, alternates) = resolver.calls[0]
        tok_hex = "2" * 64
        assert sorted(alternates[tok_hex]) == [
            f"http://w{i}:8081/v1/metadata/org--m/tokenizer.json" for i in (1, 2, 3)
        ]
        info = h.watcher.model("org/m")
        assert info is not None and len(info.worker_sets) == 1
        assert set(info.worker_sets[0].instances) == {
            instance_key(1),
            instance_key(2),
            instance_key(3),
        }


async def test_replicas_joining_a_running_pipeline_wait_for_it_instead_of_starting_one(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    resolver.gates["org/m"] = gate = asyncio.Event()
    async with running(store, resolver, clock) as h:
        for i in (1, 2, 3):
            await publish(store, i, make_card(host=f"w{i}"))
        await wait_until(
            lambda: h.watcher.instance_keys() == {instance_key(1), instance_key(2), instance_key(3)}
        )
        assert h.watcher.models() == []
        gate.set()
        await wait_until(lambda: names(h.watcher) == ["org/m"])
        assert resolver.count("org/m") == 1
        assert instances(h.watcher, "org/m") == {instance_key(1), instance_key(2), instance_key(3)}
        await publish(store, 4, make_card(host="w4"))  # after ready: joins with no pipeline
        await wait_until(lambda: instance_key(4) in instances(h.watcher, "org/m"))
        assert resolver.count("org/m") == 1


async def test_failing_pipeline_retries_with_backoff_and_model_stays_invisible(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    resolver.failures["org/m"] = 2
    async with running(store, resolver, clock) as h:
        clock.hold()
        await publish(store, 1)
        await wait_until(lambda: len(backoffs(clock)) == 1)
        assert h.watcher.model("org/m") is None and names(h.watcher) == []
        assert h.metric("discovery_mdc_pipelines_total", result="failed") == 1
        clock.release()
        await wait_until(lambda: names(h.watcher) == ["org/m"])
        assert resolver.count("org/m") == 3
        assert len(backoffs(clock)) == 2
        assert h.metric("discovery_mdc_pipelines_total", result="failed") == 2
        assert h.metric("discovery_mdc_pipelines_total", result="ok") == 1


async def test_prepare_failure_is_retried_and_the_model_is_ready_only_after_it_succeeds(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    prepared: list[Path | None] = []

    async def prepare(card: ModelDeploymentCard, local_dir: Path | None) -> None:
        prepared.append(local_dir)
        if len(prepared) == 1:
            raise RuntimeError("tokenizer failed to load")

    async with running(store, resolver, clock, prepare=prepare) as h:
        clock.hold()
        await publish(store, 1)
        await wait_until(lambda: len(backoffs(clock)) == 1)
        assert names(h.watcher) == []
        clock.release()
        await wait_until(lambda: names(h.watcher) == ["org/m"])
        assert len(prepared) == 2
        assert prepared[-1] == Path("/cache/by-slug") / make_card().slug / mdcsum(make_card())
        info = h.watcher.model("org/m")
        assert info is not None and info.worker_sets[0].local_dir == prepared[-1]


async def test_a_slow_model_does_not_block_another_model(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    resolver.gates["org/slow"] = asyncio.Event()  # never set
    # One permit: the stuck pipeline must give it back for the other model to load.
    async with running(
        store, resolver, clock, max_concurrent_pipelines=1, slow_pipeline_after=0.01
    ) as h:
        seen = Collector(h.watcher)
        await publish_models(store, [(1, "org/slow"), (2, "org/fast")])
        await wait_until(lambda: names(h.watcher) == ["org/fast"])
        await wait_until(lambda: seen.kinds() == [EventKind.ADDED])  # the collector drains a queue
        assert h.watcher.instance_keys() == {instance_key(1), instance_key(2)}


async def test_cards_on_a_host_that_never_answers_do_not_hold_up_a_model_elsewhere(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    stuck = [f"org/stuck-{i}" for i in range(20)]
    for name in stuck:
        resolver.gates[name] = asyncio.Event()  # fetches that never end
    async with running(store, resolver, clock) as h:
        for i, name in enumerate(stuck):
            await publish(store, i + 1, make_card(name, host="tarpit"))
        await wait_until(lambda: sum(resolver.count(n) for n in stuck) == 2)
        await publish(store, 100, make_card("org/good", host="healthy"))
        await wait_until(lambda: names(h.watcher) == ["org/good"])
        # At most two pipelines fetch from one host at a time; the rest wait their turn.
        assert sum(resolver.count(n) for n in stuck) == 2
        resolver.gates[stuck[0]].set()
        await wait_until(lambda: "org/stuck-0" in names(h.watcher))
        await wait_until(lambda: sum(resolver.count(n) for n in stuck) == 3)


async def test_deleting_the_only_instance_cancels_its_pending_pipeline(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    resolver.gates["org/m"] = asyncio.Event()  # never set
    async with running(store, resolver, clock) as h:
        await publish(store, 1)
        await wait_until(lambda: resolver.count("org/m") == 1)
        await store.delete(instance_key(1))
        await wait_until(lambda: h.watcher.instance_keys() == set())
        await wait_until(lambda: not h.watcher._pipelines)


async def test_a_pipeline_that_ends_while_its_instance_still_waits_is_started_again(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    """A pipeline can end without making its instances ready and without the watcher
    cancelling it: a CancelledError out of something it awaited ends it all the same. Its
    instance still waits, so the watcher starts the pipeline again."""
    resolver.lost["org/m"] = 1
    async with running(store, resolver, clock) as h:
        await publish(store, 1)
        await wait_until(lambda: names(h.watcher) == ["org/m"])
        assert resolver.count("org/m") == 2 and backoffs(clock) == []
        assert instances(h.watcher, "org/m") == {instance_key(1)}


# --------------------------------------------------------------------------- API


async def test_events_report_added_updated_rejected_removed_and_readmission(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    async with running(store, resolver, clock) as h:
        seen = Collector(h.watcher)
        await publish(store, 1)
        await wait_until(lambda: seen.kinds() == [EventKind.ADDED])
        await publish(store, 2, make_card(host="w2"))
        await wait_until(lambda: len(seen.events) == 2)
        await publish(store, 3, make_card(tok="9"))  # same name, other tokenizer
        await wait_until(lambda: len(seen.events) == 3)
        assert h.watcher.rejected_keys() == {instance_key(3)}
        assert instance_key(3) not in instances(h.watcher, "org/m")
        assert h.metric("discovery_mdc_rejected_instances_total", model="org/m") == 1
        await store.delete(instance_key(1))
        await wait_until(lambda: len(seen.events) == 4)
        await store.delete(instance_key(2))
        # The blocking worker set is gone: the rejected replica is admitted on its own.
        await wait_until(lambda: len(seen.events) == 6)
        assert seen.kinds() == [
            EventKind.ADDED,
            EventKind.UPDATED,
            EventKind.REJECTED,
            EventKind.UPDATED,
            EventKind.REMOVED,
            EventKind.ADDED,
        ]
        rejected = seen.events[2]
        assert rejected.key == instance_key(3) and mdcsum(make_card(tok="9")) in rejected.detail
        assert instances(h.watcher, "org/m") == {instance_key(3)}
        assert h.watcher.rejected_keys() == set()


async def test_wait_for_model_returns_when_ready_and_times_out_otherwise(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    async with running(store, resolver, clock) as h:
        waiter = asyncio.create_task(h.watcher.wait_for_model("org/m", timeout=DEADLINE))
        await publish(store, 1)
        info = await waiter
        assert info.name == "org/m"
        with pytest.raises(TimeoutError):
            await h.watcher.wait_for_model("org/never", timeout=0.01)


async def test_closing_the_watcher_ends_event_streams(
    store: RecordingStore, resolver: FakeResolver, clock: FakeClock
) -> None:
    async with running(store, resolver, clock) as h:
        seen = Collector(h.watcher)
        await publish(store, 1)
        await wait_until(lambda: seen.kinds() == [EventKind.ADDED])
    await asyncio.wait_for(seen.task, DEADLINE)
    assert h.watcher._subscribers == []
