"""Resource bounds of a real frontend process: a metadata server that streams forever, and
watch values at etcd's request-size limit. Peak RSS (VmHWM) stays under a generous limit.

Lock waits: tests/test_cache_fetch.py::test_lock_timeout_names_the_lock and
integration/test_cache_processes.py::test_lock_left_by_a_killed_holder_does_not_block.
"""

from __future__ import annotations

import os
from pathlib import Path

from discovery_mdc.card import (
    CheckedFile,
    ModelDeploymentCard,
    Slot,
    SlotVariant,
    from_dir,
    hash_bytes,
)
from discovery_mdc.etcd import EtcdClient, EtcdServer
from testkit import (
    FrontendProcess,
    MetaServer,
    Process,
    envelope_kv,
    model_dirs,
    start_frontend,
    wait_until,
)

DEADLINE = 60.0
RSS_LIMIT_KIB = 300 * 1024
# etcd's default --max-request-bytes is 1.5 MiB; leave room for the request's framing.
NEAR_LIMIT = 1_400 * 1024


async def test_endless_metadata_stream_is_cut_and_memory_stays_bounded(
    etcd_client: EtcdClient, frontend: FrontendProcess
) -> None:
    async with MetaServer() as server:
        server.endless.add("/m/config.json")
        card = ModelDeploymentCard.new(
            "endless",
            model_info=Slot(
                SlotVariant.HF_CONFIG_JSON,
                CheckedFile(server.url("/m/config.json"), hash_bytes(b"{}" * 512), 1024),
            ),
        )
        await etcd_client.put(*envelope_kv(card, 0xF1))
        await frontend.wait_listening()
        await wait_until(
            lambda: frontend.counter_at_least('discovery_mdc_pipelines_total{result="failed"}', 3),
            timeout=DEADLINE,
            message=frontend.describe,
        )
        peak = frontend.peak_rss_kib()
        assert await frontend.model_ids() == set()
        attempts = server.gets["/m/config.json"]
    print(f"\nendless stream: {attempts} attempts, peak RSS {peak // 1024} MiB")
    assert attempts >= 3
    assert peak < RSS_LIMIT_KIB, f"frontend peak RSS {peak} KiB"
    blobs = frontend.cache_dir / "blobs"
    assert not blobs.exists() or list(blobs.iterdir()) == []
    assert "size" in frontend.log().lower()


async def test_watch_values_at_the_etcd_size_limit_keep_memory_bounded_and_others_served(
    etcd_server: EtcdServer,
    etcd_client: EtcdClient,
    frontend: FrontendProcess,
    procs: list[Process],
    tmp_path: Path,
) -> None:
    good = [from_dir(d) for d in model_dirs(tmp_path / "models", 2)]
    await etcd_client.put(*envelope_kv(good[0], 0x1))
    await frontend.wait_listening()
    await wait_until(lambda: frontend.lists_only("model-0"), timeout=DEADLINE)
    garbage = os.urandom(NEAR_LIMIT)
    # Arriving live on the watch, and several revisions of it, plus a near-limit JSON value
    # shaped like an envelope: each one is skipped and counted; the reconciles (every second)
    # check them, and a frontend started afterwards lists them all at once.
    for i in range(8):
        await etcd_client.put(f"v1/mdc/dynamo/backend/generate/{0xB16 + i:x}", garbage)
    padded = envelope_kv(good[1], 0xB00)[1][:-1] + b',"pad":"' + b"x" * NEAR_LIMIT + b'"}'
    await etcd_client.put("v1/mdc/dynamo/backend/generate/b00", padded)
    await etcd_client.put(*envelope_kv(good[1], 0x2))
    await wait_until(lambda: frontend.lists_only("model-0", "model-1"), timeout=DEADLINE)
    checks = 'discovery_mdc_reconcile_checks_total{kind="count"}'
    await wait_until(lambda: frontend.counter_at_least(checks, 3), timeout=DEADLINE)
    late = await start_frontend(etcd_server.client_url, tmp_path, procs, name="late")
    await wait_until(lambda: late.lists_only("model-0", "model-1"), timeout=DEADLINE)
    for fe in (frontend, late):
        peak = fe.peak_rss_kib()
        print(f"\nnear-limit watch values: peak RSS {peak // 1024} MiB")
        assert peak < RSS_LIMIT_KIB, f"frontend peak RSS {peak} KiB"
        metrics = await fe.metrics()
        assert metrics["discovery_mdc_malformed_cards_total"] >= 8
        assert await fe.model_ids() == {"model-0", "model-1"}
