"""EtcdClient's rounds over its endpoints: backoff between rounds, failover, retried writes.

No etcd: a refused endpoint is a socket bound but not listening, and a stub gateway on
127.0.0.1 answers with canned JSON. Pauses go to an injected sleep, so nothing waits.
"""

from __future__ import annotations

import base64
import math
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from discovery_mdc.errors import EtcdConnectionError
from discovery_mdc.etcd import EtcdClient
from testkit import FakeClock

_HEADER = {"cluster_id": "1", "member_id": "2", "revision": "7", "raft_term": "1"}


@pytest.fixture
def refused_endpoint() -> Iterator[str]:
    """An endpoint that refuses connections: bound, never listening, so no one can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


class _Gateway:
    """A stub etcd gateway: each path answers from its list of replies in turn (the last
    one repeats); a reply is a JSON body, or an int for an HTTP status with no JSON."""

    def __init__(self, replies: dict[str, list[dict[str, Any] | int]]) -> None:
        self.replies = replies
        self.calls: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(request.path)
        queue = self.replies[request.path]
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(reply, int):
            return web.Response(status=reply, text="unavailable")
        return web.json_response({"header": _HEADER, **reply})


@pytest.fixture
async def gateway() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def start(replies: dict[str, list[dict[str, Any] | int]]) -> tuple[str, _Gateway]:
        stub = _Gateway(replies)
        app = web.Application()
        app.router.add_post("/{tail:.*}", stub.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}", stub

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_rounds_back_off_exponentially_up_to_the_cap_then_give_up(
    refused_endpoint: str,
) -> None:
    clock = FakeClock(jump_below=math.inf)  # every pause returns at once
    async with EtcdClient(
        [refused_endpoint],
        connect_retries=6,
        retry_backoff=0.1,
        rng=lambda: 1.0,  # the top of each jitter range
        sleep=clock.sleep,
    ) as client:
        with pytest.raises(EtcdConnectionError, match=r"6 round\(s\)") as err:
            await client.get("k")
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])  # none after the last
    assert refused_endpoint in str(err.value)


async def test_pauses_are_jittered_but_never_below_half_the_first(refused_endpoint: str) -> None:
    clock = FakeClock(jump_below=math.inf)  # every pause returns at once
    async with EtcdClient(
        [refused_endpoint], connect_retries=3, retry_backoff=0.2, rng=lambda: 0.0, sleep=clock.sleep
    ) as client:
        with pytest.raises(EtcdConnectionError):
            await client.get("k")
    assert clock.sleeps == pytest.approx([0.1, 0.1])


async def test_a_request_fails_over_within_a_round_without_pausing(
    refused_endpoint: str, gateway: Callable[..., Any]
) -> None:
    url, stub = await gateway({"/v3/kv/range": [{"count": "0"}]})
    clock = FakeClock(jump_below=math.inf)  # every pause returns at once
    async with EtcdClient([refused_endpoint, url], sleep=clock.sleep) as client:
        assert await client.get("k") is None
        assert client.current_endpoint == url  # later requests start at the one that worked
    assert clock.sleeps == []
    assert stub.calls == ["/v3/kv/range"]


async def test_a_later_round_succeeds_after_a_pause(gateway: Callable[..., Any]) -> None:
    url, stub = await gateway({"/v3/kv/range": [503, 503, {"count": "0"}]})
    clock = FakeClock(jump_below=math.inf)  # every pause returns at once
    async with EtcdClient([url], retry_backoff=0.1, rng=lambda: 1.0, sleep=clock.sleep) as client:
        assert await client.get("k") is None
    assert clock.sleeps == pytest.approx([0.1, 0.2])
    assert len(stub.calls) == 3


def _kv(key: str, value: bytes, lease: int) -> dict[str, str]:
    return {
        "key": base64.b64encode(key.encode()).decode(),
        "value": base64.b64encode(value).decode(),
        "create_revision": "6",
        "mod_revision": "6",
        "version": "1",
        "lease": str(lease),
    }


async def test_a_create_retried_after_it_was_sent_and_found_applied_succeeds(
    gateway: Callable[..., Any],
) -> None:
    # The first txn may have reached etcd (a 503 comes from a proxy in front of it); the retry
    # then finds the key existing, holding exactly our value and lease: that was us.
    url, _ = await gateway(
        {
            "/v3/kv/txn": [503, {"succeeded": False}],
            "/v3/kv/range": [{"kvs": [_kv("k", b"v", 42)], "count": "1"}],
        }
    )
    async with EtcdClient([url], sleep=FakeClock(jump_below=math.inf).sleep) as client:
        assert await client.create("k", b"v", lease=42) is True


async def test_a_create_after_only_refused_connects_trusts_the_answer(
    refused_endpoint: str, gateway: Callable[..., Any]
) -> None:
    # A refused connection proves the request never left, so "existed" means someone else's.
    url, stub = await gateway(
        {
            "/v3/kv/txn": [{"succeeded": False}],
            "/v3/kv/range": [{"kvs": [_kv("k", b"v", 42)], "count": "1"}],
        }
    )
    async with EtcdClient(
        [refused_endpoint, url], sleep=FakeClock(jump_below=math.inf).sleep
    ) as client:
        assert await client.create("k", b"v", lease=42) is False
    assert stub.calls == ["/v3/kv/txn"]
