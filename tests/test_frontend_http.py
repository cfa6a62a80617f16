"""The frontend HTTP API over a MemoryStore-backed watcher, and the metrics it exports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import pytest
import yarl
from _fakes import until
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_watcher_driver import FakeResolved, key, make_card, publish

from discovery_mdc.cache import CacheStats
from discovery_mdc.card import ModelDeploymentCard, mdcsum
from discovery_mdc.etcd import MemoryStore
from discovery_mdc.frontend import FrontendMetrics, ModelWatcher, build_app, model_id
from discovery_mdc.frontend._state import ModelInfo, unservable_model_id


async def _resolve(card: ModelDeploymentCard, *, alternates: dict[str, list[str]]) -> FakeResolved:
    return FakeResolved(card, Path("/cache") / card.slug)


@pytest.fixture
async def served() -> AsyncIterator[tuple[MemoryStore, ModelWatcher, TestClient]]:  # type: ignore[type-arg]
    store = MemoryStore()
    stats = CacheStats(bytes_fetched=1234, fetches=3, hits=2)
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
    await until(lambda: watcher.model("org/m") is not None and len(watcher.instance_keys()) == 2)
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    [entry] = body["data"]
    assert entry["id"] == "org/m" and entry["object"] == "model"
    assert isinstance(entry["created"], int) and entry["owned_by"]

    details = await (await client.get("/v1/models/org/m")).json()
    [ws] = details["worker_sets"]
    assert ws["mdcsum"] == mdcsum(make_card("org/m")) and ws["ready"] is True
    assert sorted(ws["instances"]) == [key(1), key(2)]
    assert ws["local_dir"] == str(Path("/cache") / make_card("org/m").slug)

    missing = await client.get("/v1/models/org/nope")
    assert missing.status == 404


async def test_health_and_metrics_report_watch_and_cache_counters(
    served: tuple[MemoryStore, ModelWatcher, TestClient],  # type: ignore[type-arg]
) -> None:
    store, watcher, client = served
    await store.put(key(7), b"garbage")
    await publish(store, 1, make_card("org/m"))
    await until(lambda: watcher.model(model_id(make_card("org/m"))) is not None)
    await until(lambda: watcher.connected)
    health = await client.get("/health")
    assert health.status == 200 and (await health.json())["models"] == 1
    text = await (await client.get("/metrics")).text()
    for line in (
        "discovery_mdc_bytes_fetched_total 1234.0",
        "discovery_mdc_blob_fetches_total 3.0",
        "discovery_mdc_malformed_cards_total 1.0",
        'discovery_mdc_watch_events_total{type="put"} 2.0',
        'discovery_mdc_pipelines_total{result="ok"} 1.0',
        'discovery_mdc_relists_total{reason="start"} 1.0',
        'discovery_mdc_relists_total{reason="compaction"} 0.0',
        "discovery_mdc_watch_reconnects_total 0.0",
        "discovery_mdc_rejected_instances_total 0.0",
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


class _EveryModel:
    """Stands in for a watcher that serves a model under any id it is asked for."""

    connected = True
    revision = 1

    def models(self) -> list[ModelInfo]:
        return []

    def model(self, name: str) -> ModelInfo:
        return ModelInfo(name, 0, ())


async def _served_ids(name: str) -> list[Any]:
    app = build_app(cast(ModelWatcher, _EveryModel()))
    async with TestClient(TestServer(app)) as client:
        ids = []
        for safe in ("", "/"):  # fully percent-encoded, and with '/' as is (OpenAI clients)
            url = yarl.URL("/v1/models/" + quote(name, safe=safe), encoded=True)
            resp = await client.get(url)
            ids.append((await resp.json())["id"] if resp.status == 200 else resp.status)
        return ids


_NAME_CHARS = st.one_of(
    st.characters(), st.sampled_from("%?#+;= \\\n\t\r\x00\x7f\x85"), st.sampled_from("./")
)


@settings(max_examples=300, deadline=None)
@given(st.text(_NAME_CHARS, max_size=30))
@example("Qwen/Qwen3-0.6B")
@example("a//b/")
@example("/leading")
@example("%2e%2e")
@example(".")
@example("org/../m")
@example("org/./m")
@example("org/..")
@example("a\nb")
@example("\U0001f600" * 512)
def test_every_model_id_admission_accepts_is_answered_by_its_own_url(name: str) -> None:
    if unservable_model_id(name) is None:
        assert asyncio.run(_served_ids(name)) == [name, name]
