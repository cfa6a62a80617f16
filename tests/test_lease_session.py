"""LeaseSession against MemoryStore with a fake clock: deadlines and backoff run instantly."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import pytest

from discovery_mdc.errors import EtcdError
from discovery_mdc.etcd import (
    KeyExistsError,
    LeaseSession,
    MemoryStore,
    SessionState,
)
from testkit import FakeClock, wait_until

Marks = list[tuple[SessionState, int]]
"""(state entered, sleeps so far) at each state change."""


async def sleeps_when_lost(session: LeaseSession, marks: Marks) -> int:
    """How many sleeps had happened when the session entered LOST."""
    await session.wait_state(SessionState.LOST)
    return next(n for state, n in marks if state is SessionState.LOST)


def fake_time(store: MemoryStore) -> FakeClock:
    """Every sleep jumps the clock, and the store's leases age with it."""
    return FakeClock(jump_below=math.inf, on_advance=store.advance)


def card_key(lease_id: int) -> tuple[str, bytes]:
    return f"v1/mdc/dynamo/backend/generate/{lease_id:x}", b"card"


def make(
    ttl: int = 9,
    rng: Callable[[], float] = lambda: 1.0,
    store: MemoryStore | None = None,
    marks: Marks | None = None,
) -> tuple[LeaseSession, MemoryStore, FakeClock, list[SessionState]]:
    store = store or MemoryStore()
    fake = fake_time(store)
    states: list[SessionState] = []

    def on_state_change(state: SessionState) -> None:
        states.append(state)
        if marks is not None:
            marks.append((state, len(fake.sleeps)))

    session = LeaseSession(store, ttl=ttl, clock=fake.clock, sleep=fake.sleep,
                           on_state_change=on_state_change, rng=rng)  # fmt: skip
    return session, store, fake, states


async def test_start_grants_a_lease_and_add_creates_the_key_bound_to_it() -> None:
    session, store, _, states = make()
    async with session:
        handle = await session.add(card_key)
        assert handle.key == card_key(session.lease_id)[0]
        kv = store.get(handle.key)
        assert kv is not None and kv.lease == session.lease_id and kv.value == b"card"
        assert session.state is SessionState.REGISTERED
    assert states == [SessionState.REGISTERED, SessionState.CLOSED]


async def test_keepalive_cadence_is_a_third_of_the_ttl() -> None:
    session, store, fake, _ = make(ttl=9)
    async with session:
        await wait_until(lambda: store.calls.count("lease_keepalive") >= 5, interval=0)
        assert fake.sleeps[:5] == [3.0] * 5
        assert session.state is SessionState.REGISTERED
        assert session.lease_id in store.leases()


async def test_second_create_of_an_existing_key_raises_and_does_not_overwrite() -> None:
    session, store, _, _ = make()
    async with session:
        await store.put("fixed", b"theirs")
        with pytest.raises(KeyExistsError, match="fixed"):
            await session.add(lambda lid: ("fixed", b"ours"))
        assert store.get("fixed").value == b"theirs"  # type: ignore[union-attr]
        assert session.handles == ()


async def test_ttl_zero_reply_regrants_and_reregisters_under_new_keys() -> None:
    session, store, _, states = make()
    async with session:
        handle = await session.add(card_key)
        old_lease, old_key = session.lease_id, handle.key
        store.expire_lease(old_lease)  # etcd now answers keepalives with no TTL
        assert store.get(old_key or "") is None
        await wait_until(lambda: session.lease_id != old_lease
                         and session.state is SessionState.REGISTERED, interval=0)  # fmt: skip
        assert states[-2:] == [SessionState.LOST, SessionState.REGISTERED]
        assert handle.key == card_key(session.lease_id)[0] != old_key
        kv = store.get(handle.key)
        assert kv is not None and kv.lease == session.lease_id


async def test_no_reply_before_the_deadline_means_lost_even_without_a_ttl_zero() -> None:
    session, store, fake, states = make(ttl=9)
    lost_at: list[float] = []
    async with session:
        await session.add(card_key)
        granted_lease = session.lease_id
        store.unavailable = True
        await wait_until(lambda: session.state is SessionState.LOST, interval=0)
        lost_at.append(fake.now)
        # Three keepalives at 3 s cadence failed, then a few 1 s retries, then the 9 s deadline.
        assert 9.0 <= lost_at[0] <= 10.0
        store.unavailable = False
        await wait_until(lambda: session.state is SessionState.REGISTERED, interval=0)
        assert session.lease_id != granted_lease
        assert store.keys() == [card_key(session.lease_id)[0]]
    assert states == [SessionState.REGISTERED, SessionState.LOST, SessionState.REGISTERED,
                      SessionState.CLOSED]  # fmt: skip


async def test_keepalive_connection_errors_before_the_deadline_keep_the_lease() -> None:
    session, store, fake, states = make(ttl=9)
    async with session:
        lease_id = session.lease_id
        store.unavailable = True
        await wait_until(lambda: fake.now >= 5.0, interval=0)
        store.unavailable = False
        await wait_until(lambda: fake.now >= 30.0, interval=0)
        assert session.lease_id == lease_id
        assert states == [SessionState.REGISTERED]


async def test_recovery_backoff_is_jittered_exponential_and_capped() -> None:
    marks: Marks = []
    session, store, fake, _ = make(ttl=3, rng=lambda: 1.0, marks=marks)
    async with session:
        store.unavailable = True
        before = await sleeps_when_lost(session, marks)
        await wait_until(lambda: len(fake.sleeps) >= before + 8, interval=0)
        # Capped at 2 s by default, so a long outage costs at most that once etcd is back.
        assert fake.sleeps[before : before + 8] == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
        store.unavailable = False
        await wait_until(lambda: session.state is SessionState.REGISTERED, interval=0)


async def test_backoff_uses_injected_randomness() -> None:
    marks: Marks = []
    session, store, fake, _ = make(ttl=3, rng=lambda: 0.5, marks=marks)
    async with session:
        store.unavailable = True
        before = await sleeps_when_lost(session, marks)
        await wait_until(lambda: len(fake.sleeps) >= before + 4, interval=0)
        # Full jitter with rng()=0.5, floored at initial/2.
        assert fake.sleeps[before : before + 4] == [0.25, 0.5, 1.0, 1.0]
        store.unavailable = False


async def test_close_revokes_the_lease_so_keys_vanish_at_once() -> None:
    session, store, _, _ = make()
    await session.start()
    await session.add(card_key)
    assert store.keys()
    await session.close()
    assert store.keys() == []
    assert store.leases() == {}
    assert session.state is SessionState.CLOSED
    await session.close()  # idempotent


async def test_close_with_etcd_down_does_not_hang() -> None:
    session, store, _, _ = make()
    await session.start()
    store.unavailable = True
    async with asyncio.timeout(5):
        await session.close()
    assert session.state is SessionState.CLOSED


async def test_unexpected_exceptions_never_kill_the_keepalive_loop() -> None:
    class Flaky(MemoryStore):
        failures = 0

        async def lease_keepalive(self, lease_id: int) -> int:
            if self.failures < 3:
                self.failures += 1
                raise RuntimeError("boom")
            return await super().lease_keepalive(lease_id)

    store = Flaky()
    session, _, _, _ = make(store=store, ttl=30)
    async with session:
        await wait_until(lambda: store.calls.count("lease_keepalive") >= 3, interval=0)
        assert store.failures == 3
        assert session.state is SessionState.REGISTERED


async def test_a_failing_state_callback_does_not_break_the_session() -> None:
    store = MemoryStore()
    fake = fake_time(store)

    def explode(state: SessionState) -> None:
        raise ValueError("callback bug")

    session = LeaseSession(store, ttl=9, clock=fake.clock, sleep=fake.sleep,
                           on_state_change=explode)  # fmt: skip
    async with session:
        old = session.lease_id
        store.expire_lease(old)
        await wait_until(lambda: session.lease_id != old
                         and session.state is SessionState.REGISTERED, interval=0)  # fmt: skip


async def test_remove_deletes_the_key_and_it_is_not_reregistered() -> None:
    session, store, _, _ = make()
    async with session:
        keep = await session.add(card_key)
        gone = await session.add(lambda lid: (f"extra/{lid:x}", b"x"))
        await session.remove(gone)
        assert gone.key is None
        assert store.keys() == [keep.key]
        old = session.lease_id
        store.expire_lease(old)
        await wait_until(lambda: session.lease_id != old
                         and session.state is SessionState.REGISTERED, interval=0)  # fmt: skip
        assert store.keys() == [card_key(session.lease_id)[0]]


async def test_add_while_lost_is_created_with_the_next_lease() -> None:
    session, store, _, _ = make()
    async with session:
        store.unavailable = True
        await wait_until(lambda: session.state is SessionState.LOST, interval=0)
        handle = await session.add(card_key)
        assert handle.key is None
        store.unavailable = False
        await session.wait_state(SessionState.REGISTERED)
        assert handle.key == card_key(session.lease_id)[0]
        assert handle.key is not None and store.get(handle.key) is not None


async def test_add_before_start_is_an_error() -> None:
    session, _, _, _ = make()
    with pytest.raises(EtcdError, match="starting"):
        await session.add(card_key)


async def test_start_fails_when_etcd_is_unreachable() -> None:
    session, store, _, _ = make()
    store.unavailable = True
    with pytest.raises(ConnectionError):
        await session.start()


async def test_wait_state_returns_when_the_state_is_reached() -> None:
    session, store, _, _ = make()
    async with session:
        waiter = asyncio.create_task(session.wait_state(SessionState.LOST))
        await asyncio.sleep(0)
        store.expire_lease(session.lease_id)
        async with asyncio.timeout(5):
            await waiter


@pytest.mark.parametrize("bad", [0, -1, 9_000_000_001])
def test_a_session_refuses_a_ttl_etcd_would_not_grant(bad: int) -> None:
    with pytest.raises(ValueError, match="lease TTL must be 1 to 9000000000 seconds"):
        LeaseSession(MemoryStore(), ttl=bad)


async def test_a_key_deleted_while_the_lease_lives_is_created_again_once() -> None:
    recreated: list[str] = []
    session, store, _, states = make(ttl=9)
    session.on_key_recreated = recreated.append
    async with session:
        handle = await session.add(card_key)
        key, lease_id = handle.key, session.lease_id
        assert key is not None
        await store.delete("v1/", prefix=True)  # an operator's `etcdctl del --prefix v1/`
        await wait_until(lambda: store.get(key) is not None, interval=0)
        kv = store.get(key)
        assert kv is not None and kv.lease == lease_id and kv.value == b"card"
        assert session.lease_id == lease_id and handle.key == key
        assert session.keys_recreated == 1 and recreated == [key]
        # Present again: later checks leave it alone.
        await wait_until(lambda: store.calls.count("lease_time_to_live") >= 3, interval=0)
        assert session.keys_recreated == 1
    assert states == [SessionState.REGISTERED, SessionState.CLOSED]


async def test_a_key_someone_else_rewrote_is_never_overwritten_and_is_retaken_once_gone() -> None:
    session, store, _, _ = make(ttl=9)
    async with session:
        handle = await session.add(card_key)
        key = handle.key
        assert key is not None
        await store.put(key, b"theirs")  # no lease: no longer ours
        await wait_until(lambda: handle.key is None, interval=0)
        assert store.get(key).value == b"theirs"  # type: ignore[union-attr]
        assert session.keys_recreated == 0
        await store.delete(key)
        await wait_until(lambda: handle.key == key, interval=0)
        kv = store.get(key)
        assert kv is not None and kv.value == b"card" and kv.lease == session.lease_id
        assert session.keys_recreated == 1


async def test_key_checks_run_every_few_keepalives_and_can_be_turned_off() -> None:
    session, store, _, _ = make(ttl=9)
    async with session:
        await session.add(card_key)
        await wait_until(lambda: store.calls.count("lease_keepalive") >= 6, interval=0)
        assert store.calls.count("lease_time_to_live") in (1, 2)
    store = MemoryStore()
    fake = fake_time(store)
    quiet = LeaseSession(store, ttl=9, clock=fake.clock, sleep=fake.sleep, key_check_every=0)
    async with quiet:
        handle = await quiet.add(card_key)
        await store.delete(handle.key or "")
        await wait_until(lambda: store.calls.count("lease_keepalive") >= 6, interval=0)
        assert "lease_time_to_live" not in store.calls and store.keys() == []
