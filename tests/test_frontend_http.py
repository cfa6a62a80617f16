"""The frontend HTTP API over a MemoryStore-backed watcher, and the metrics it exports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import pytest
import yarl
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import example, given, settings
from hypothesis import strategies as st

from discovery_mdc.cache import CacheStats
from discovery_mdc.card import ModelDeploymentCard, mdcsum, unservable_model_id
from discovery_mdc.etcd import MemoryStore
from discovery_mdc.frontend import FrontendMetrics, ModelWatcher, build_app, model_id
from discovery_mdc.frontend._state import ModelInfo, ModelStats
from testkit import FakeResolved, instance_key, make_card, publish, wait_until


async def _resolve(card: ModelDeploymentCard, *, alternates: dict[str, list[str]]) -> FakeResolved:
    return FakeResolved(card, Path("/cache") / card.slug)


@pytest.fixture
async def served() -> AsyncIterator[tuple[MemoryStore, ModelWatcher, TestClient]]:  # type: ignore[type-arg]
    store = MemoryStore()
    stats = CacheStats(bytes_fetched=1234, fetches=3, hits=2, repairs=1)
    stats.by_source["10.0.0.1:8081", "ok"] = 3
    async with (
        ModelWatcher(
            store,
            resolver=_resolve,
            prepare=None,
            reconcile_interval=0,
            metrics=FrontendMetrics(lambda: stats),
        ) as watcher,
        TestClient(TestServer(build_app(watcher))) as client,
    ):
        yield store, watcher, client


async def test_models_list_has_the_openai_shape_and_details_name_instances(
    served: tuple[MemoryStore, ModelWatcher, TestClient],  # type: ignore[type-arg]
) -> None:
    store, watcher, client = served
    await publish(store, 1, make_card("org/m"))
    await publish(store, 2, make_card("org/m", host="w2"))
    await wait_until(
        lambda: watcher.model("org/m") is not None and len(watcher.instance_keys()) == 2
    )
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    [entry] = body["data"]
    assert entry["id"] == "org/m" and entry["object"] == "model"
    assert isinstance(entry["created"], int) and entry["owned_by"]

    details = await (await client.get("/v1/models/org/m")).json()
    [ws] = details["worker_sets"]
    assert ws["mdcsum"] == mdcsum(make_card("org/m")) and ws["ready"] is True
    assert sorted(ws["instances"]) == [instance_key(1), instance_key(2)]
    assert ws["local_dir"] == str(Path("/cache") / make_card("org/m").slug)

    missing = await client.get("/v1/models/org/nope")
    assert missing.status == 404
    assert (await missing.json())["error"] == {
        "message": "The model 'org/nope' does not exist",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


async def test_health_and_metrics_report_watch_and_cache_counters(
    served: tuple[MemoryStore, ModelWatcher, TestClient],  # type: ignore[type-arg]
) -> None:
    store, watcher, client = served
    await store.put(instance_key(7), b"garbage")
    await publish(store, 1, make_card("org/m"))
    await wait_until(lambda: watcher.model(model_id(make_card("org/m"))) is not None)
    await wait_until(lambda: watcher.connected)
    health = await client.get("/health")
    assert health.status == 200 and (await health.json())["models"] == 1
    text = await (await client.get("/metrics")).text()
    for line in (
        "discovery_mdc_fetched_bytes_total 1234.0",
        "discovery_mdc_blob_fetches_total 3.0",
        "discovery_mdc_blob_repairs_total 1.0",
        "discovery_mdc_malformed_cards_total 1.0",
        'discovery_mdc_watch_events_total{type="put"} 2.0',
        'discovery_mdc_pipelines_total{result="ok"} 1.0',
        'discovery_mdc_relists_total{reason="start"} 1.0',
        'discovery_mdc_relists_total{reason="compaction"} 0.0',
        "discovery_mdc_watch_reconnects_total 0.0",
        "discovery_mdc_models_ready 1.0",
        'discovery_mdc_source_fetches_total{result="ok",source="10.0.0.1:8081"} 3.0',
        'discovery_mdc_reconcile_repairs_total{kind="delete"} 0.0',
        "discovery_mdc_reconcile_read_bytes_total 0.0",
    ):
        assert line in text, line
    assert "discovery_mdc_watch_silence_seconds " in text
    await watcher.reconcile()
    text = await (await client.get("/metrics")).text()
    assert 'discovery_mdc_reconcile_checks_total{kind="count"} 1.0' in text
    assert "discovery_mdc_reconcile_read_bytes_total 0.0" not in text


async def test_models_carry_the_context_window_of_their_card(
    served: tuple[MemoryStore, ModelWatcher, TestClient],  # type: ignore[type-arg]
) -> None:
    store, watcher, client = served
    await publish(store, 1, make_card("org/m").replace(context_length=8192))
    await wait_until(lambda: watcher.model("org/m") is not None)
    [entry] = (await (await client.get("/v1/models")).json())["data"]
    assert entry["context_window"] == 8192
    assert (await (await client.get("/v1/models/org/m")).json())["context_window"] == 8192


async def test_per_model_readiness_is_200_when_ready_and_503_when_not_or_unknown(
    served: tuple[MemoryStore, ModelWatcher, TestClient],  # type: ignore[type-arg]
) -> None:
    store, watcher, client = served
    unknown = await client.get("/v1/models/org/m/ready")
    assert unknown.status == 503
    unknown_body = await unknown.json()
    assert unknown_body == {
        "model": "org/m", "ready": False, "status": "unknown", "instances": 0,
        "ready_instances": 0, "rejected_instances": 0, "namespaces": {},
    }  # fmt: skip
    await publish(store, 1, make_card("org/m"))
    await wait_until(lambda: watcher.model("org/m") is not None)
    ready = await client.get("/v1/models/org/m/ready")
    assert ready.status == 200
    body = await ready.json()
    assert (body["model"], body["ready"], body["instances"]) == ("org/m", True, 1)
    assert set(body) == set(unknown_body)  # one shape, known or not
    assert body["namespaces"] == {"dynamo": {"worker_types": {"aggregated": {"workers": 1}}}}
    await store.delete(instance_key(1))
    await wait_until(lambda: watcher.model("org/m") is None)
    assert (await client.get("/v1/models/org/m/ready")).status == 503


async def test_live_is_200_whatever_etcd_does(
    served: tuple[MemoryStore, ModelWatcher, TestClient],  # type: ignore[type-arg]
) -> None:
    _, watcher, client = served
    watcher.informer.connected = False  # what a lost watch looks like
    assert (await client.get("/health")).status == 503
    live = await client.get("/live")
    assert live.status == 200 and await live.json() == {"status": "live"}


async def _with_a_rejected_replica(
    served: tuple[MemoryStore, ModelWatcher, TestClient],  # type: ignore[type-arg]
) -> TestClient:  # type: ignore[type-arg]
    """org/m ready from instance 1; instance 2 (another tokenizer) rejected."""
    store, watcher, client = served
    await publish(store, 1, make_card("org/m"))
    await wait_until(lambda: watcher.model("org/m") is not None)
    await publish(store, 2, make_card("org/m", tok="3"))
    await wait_until(lambda: watcher.rejected_keys() == {instance_key(2)})
    return client


async def test_rejected_instances_are_listed_with_the_fields_that_differ(
    served: tuple[MemoryStore, ModelWatcher, TestClient],  # type: ignore[type-arg]
) -> None:
    client = await _with_a_rejected_replica(served)
    [rejected] = (await (await client.get("/v1/models/org/m")).json())["rejected_instances"]
    assert rejected["key"] == instance_key(2)
    assert rejected["mdcsum"] == mdcsum(make_card("org/m", tok="3"))
    assert rejected["worker_set_mdcsum"] == mdcsum(make_card("org/m"))
    assert rejected["diff"] == [
        {
            "field": "tokenizer",
            "worker_set": f"blake3:{'2' * 64} (4 bytes)",
            "instance": f"blake3:{'3' * 64} (4 bytes)",
        }
    ]
    assert "tokenizer" in rejected["reason"] and "3" * 64 in rejected["reason"]


async def test_metrics_an_sre_alerts_on(
    served: tuple[MemoryStore, ModelWatcher, TestClient],  # type: ignore[type-arg]
) -> None:
    client = await _with_a_rejected_replica(served)
    response = await client.get("/metrics")
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = await response.text()
    for line in (
        'discovery_mdc_model_ready{model="org/m"} 1.0',
        'discovery_mdc_model_instances{model="org/m"} 1.0',
        'discovery_mdc_model_rejected_instances{model="org/m"} 1.0',
        'discovery_mdc_rejected_instances_total{model="org/m"} 1.0',
        "discovery_mdc_pipeline_seconds_count 1.0",
        "discovery_mdc_blob_fetch_seconds_count 0.0",
    ):
        assert line in text, line
    assert "\nprocess_cpu_seconds_total " in text and "\nprocess_open_fds " in text
    assert 'discovery_mdc_build_info{version="' in text
    assert "_created" not in text
    assert "bytes_fetched" not in text


class _EveryModel:
    """Stands in for a watcher that serves a model under any id it is asked for."""

    connected = True
    revision = 1

    def models(self) -> list[ModelInfo]:
        return []

    def model(self, name: str) -> ModelInfo:
        return ModelInfo(name, 0, ())

    def model_stats(self) -> list[ModelStats]:
        return []


async def _served_ids(name: str) -> list[Any]:
    app = build_app(cast(ModelWatcher, _EveryModel()))
    async with TestClient(TestServer(app)) as client:
        ids = []
        for safe in ("", "/"):  # fully percent-encoded, and with '/' as is (OpenAI clients)
            url = yarl.URL("/v1/models/" + quote(name, safe=safe), encoded=True)
            resp = await client.get(url)
            ids.append((await resp.json())["id"] if resp.status == 200 else resp.status)
        return ids


_SEGMENT = st.one_of(
    st.text(
        st.one_of(st.characters(), st.sampled_from("%?#+;=. \\\n\t\r\x00\x7f\x85")),
        max_size=12,
    ),
    st.sampled_from([".", "..", "ready", ""]),
)
_NAMES = st.lists(_SEGMENT, min_size=1, max_size=4).map("/".join)


@settings(max_examples=300, deadline=None)
@given(_NAMES)
@example("Qwen/Qwen3-0.6B")
@example("a//b/")
@example("/leading")
@example("%2e%2e")
@example(".")
@example("org/../m")
@example("org/./m")
@example("org/..")
@example("a\nb")
@example("org/ready")
@example("ready")
@example("\U0001f600" * 512)
def test_every_model_id_admission_accepts_is_answered_by_its_own_url(name: str) -> None:
    if unservable_model_id(name) is None:
        assert asyncio.run(_served_ids(name)) == [name, name]
