"""A frontend keeps what it serves in the cache: it marks it used and fetches it again when it
is removed (``cache rm``, ``cache verify --fix``) while still served."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from discovery_mdc.cache import CacheLayout, scan_cache
from discovery_mdc.cache._store import remove_link_dir
from discovery_mdc.card import ModelEnvelope, encode_envelope, from_dir
from discovery_mdc.etcd import MemoryStore
from discovery_mdc.frontend import ModelWatcher
from testkit import backdate

DAY = 86400.0


def _last_used(cache: CacheLayout) -> float:
    [card] = scan_cache(cache).cards
    return card.last_used


def _names(local_dir: Path) -> list[str]:
    return sorted(p.name for p in local_dir.iterdir() if p.exists())


async def test_served_cards_are_marked_used_and_fetched_again_when_removed(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    cache = CacheLayout(tmp_path / "cache")
    card = from_dir(make_model_dir("served"))
    env = ModelEnvelope(
        namespace="dynamo", component="backend", endpoint="generate", instance_id=7, card=card
    )
    store = MemoryStore()
    await store.put(env.key, encode_envelope(env))
    async with ModelWatcher(
        store, cache_dir=cache.root, reconcile_interval=0, cache_upkeep_interval=0
    ) as watcher:
        info = await watcher.wait_for_model("served", timeout=30)
        local_dir = info.worker_sets[0].local_dir
        assert local_dir is not None
        names = _names(local_dir)
        assert names == sorted(f.basename for _, f in card.files())
        # One cache for the watcher's lifetime; /metrics reads its counters.
        assert watcher.cache is not None and watcher.cache.layout == cache
        fetched = watcher.metrics.registry.get_sample_value("discovery_mdc_blob_fetches_total")
        blobs = {f.checksum.hex for _, f in card.files()}
        assert fetched == watcher.cache.stats.fetches == len(blobs)

        backdate(local_dir, 40 * DAY)
        assert time.time() - _last_used(cache) > 39 * DAY
        await watcher.cache_upkeep()
        assert time.time() - _last_used(cache) < 120

        remove_link_dir(local_dir)  # what `cache rm` does to a card it removes
        await watcher.cache_upkeep()
        assert _names(local_dir) == names
        assert watcher.model("served") is not None


async def test_closing_the_watcher_closes_its_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[bool] = []
    async with ModelWatcher(MemoryStore(), cache_dir=tmp_path / "cache") as watcher:
        cache = watcher.cache
        assert cache is not None
        close = cache.close

        async def recording_close() -> None:
            closed.append(True)
            await close()

        monkeypatch.setattr(cache, "close", recording_close)
        assert closed == []
    assert closed == [True]
