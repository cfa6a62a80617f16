"""The startup wait for etcd, on a fake clock: retry only what waiting can fix, give up with
one message naming the endpoints and the variable."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest

from discovery_mdc.errors import EtcdAuthError, EtcdConnectionError, EtcdTlsError
from discovery_mdc.etcd import LeaseSession, MemoryStore, retry_until_reachable
from discovery_mdc.etcd._codec import Lease
from testkit import FakeClock


class Failing:
    """An operation that raises ``error`` ``times`` times, then returns "ok"; each attempt
    takes ``cost`` seconds of ``clock``, as the client's own rounds do."""

    def __init__(self, times: int, error: Exception, clock: FakeClock, cost: float = 1.0) -> None:
        self.times, self.error, self.clock, self.cost = times, error, clock, cost
        self.count = 0

    async def __call__(self) -> str:
        self.count += 1
        self.clock.now += self.cost
        if self.count <= self.times:
            raise self.error
        return "ok"

    def calls(self) -> int:
        return self.count


async def test_retries_while_etcd_is_unreachable_logging_each_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(jump_below=math.inf)  # every sleep jumps
    op = Failing(3, EtcdConnectionError("refused"), clock)
    with caplog.at_level(logging.WARNING):
        got = await retry_until_reachable(
            op,
            timeout=120,
            what="a lease",
            clock=clock.clock,
            sleep=clock.sleep,
        )
    assert got == "ok" and op.calls() == 4
    assert len(clock.sleeps) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("etcd not reachable for a lease" in ln for ln in lines)
    assert "attempt 1" in lines[0] and "attempt 3" in lines[2]


async def test_gives_up_after_the_timeout_naming_endpoints_and_the_variable() -> None:
    clock = FakeClock(jump_below=math.inf)  # every sleep jumps
    op = Failing(10**6, EtcdConnectionError("refused by 127.0.0.1:9"), clock)
    with pytest.raises(EtcdConnectionError) as err:
        await retry_until_reachable(
            op, timeout=10, what="a lease", endpoints=("http://e1:2379", "http://e2:2379"),
            clock=clock.clock, sleep=clock.sleep,
        )  # fmt: skip
    text = str(err.value)
    assert "(http://e1:2379, http://e2:2379) still unreachable after waiting 10s" in text
    assert "ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS" in text and "refused by 127.0.0.1:9" in text
    assert clock.now <= 10 + 1.0 + 1e-9  # the last sleep stops at the deadline


@pytest.mark.parametrize(
    "error", [EtcdAuthError("bad password"), EtcdTlsError("certificate refused")]
)
async def test_what_waiting_cannot_fix_is_raised_at_once(error: Exception) -> None:
    clock = FakeClock(jump_below=math.inf)  # every sleep jumps
    op = Failing(1, error, clock)
    with pytest.raises(type(error)):
        await retry_until_reachable(op, timeout=120, what="x", clock=clock.clock, sleep=clock.sleep)
    assert op.calls() == 1 and clock.sleeps == []


async def test_timeout_0_is_one_attempt_and_the_original_error() -> None:
    clock = FakeClock(jump_below=math.inf)  # every sleep jumps
    error = EtcdConnectionError("refused")
    op = Failing(1, error, clock)
    with pytest.raises(EtcdConnectionError) as err:
        await retry_until_reachable(op, timeout=0, what="x", clock=clock.clock, sleep=clock.sleep)
    assert err.value is error and clock.sleeps == []


async def test_a_hung_attempt_is_cut_at_the_deadline() -> None:
    hung = asyncio.Event()

    async def never() -> str:
        await hung.wait()
        return "never"

    with pytest.raises(EtcdConnectionError, match="no answer from etcd within"):
        await retry_until_reachable(never, timeout=0.05, what="x")


async def test_the_lease_session_waits_for_etcd_at_start() -> None:
    clock = FakeClock(jump_below=math.inf)  # every sleep jumps
    store = MemoryStore()
    real_grant = store.lease_grant
    calls = 0

    async def grant(ttl: int) -> Lease:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise EtcdConnectionError("not up yet")
        return await real_grant(ttl)

    store.lease_grant = grant  # type: ignore[method-assign]
    session = LeaseSession(store, ttl=9, startup_timeout=60, clock=clock.clock, sleep=clock.sleep)
    await session.start()
    try:
        assert calls == 3 and len(clock.sleeps) >= 2
    finally:
        await session.close()
    with pytest.raises(EtcdConnectionError):  # without a wait: the first error
        store.lease_grant = failing_grant  # type: ignore[method-assign]
        await LeaseSession(store, ttl=9).start()


async def failing_grant(ttl: int) -> Lease:
    raise EtcdConnectionError("down")
