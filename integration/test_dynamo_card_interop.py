"""Cards we build and encode, checked by the real Dynamo 1.6.1 runtime (``-m dynamo``).

- Dynamo's own Rust code (``ModelDeploymentCard.from_json_str(...).local_dir()``) parses our
  encoding and computes the same mdcsum as ours.
- A Dynamo frontend lists a card we encoded (published with an Endpoint instance record on the
  same lease), caches it under ``by-slug/<slug>/<our mdcsum>/``, and drops it when the lease
  goes.

The worker-to-frontend scenarios in both directions live with the publisher and frontend
tests; this module pins only the card bytes.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from discovery_mdc.cache import resolve_metadata_files
from discovery_mdc.card import (
    ModelEnvelope,
    WorkerType,
    card_key,
    decode_envelope,
    encode_card,
    encode_envelope,
    endpoint_key,
    from_dir,
    mdcsum,
)
from discovery_mdc.etcd import EtcdServer
from discovery_mdc.worker._registry import url_segment
from testkit import free_port, wait_until_sync
from testkit.dynamo import (
    dynamo_env,
    ensure_dynamo_venv,
    etcd_get_prefix,
    etcd_lease_grant,
    etcd_lease_revoke,
    etcd_put,
    free_port_below_32768,
    oracle_local_dirs,
    start_dynamo_frontend,
    start_dynamo_worker,
    wait_for_models,
    write_dynamo_sample_model,
)

pytestmark = pytest.mark.dynamo


@pytest.fixture(scope="module")
def peer() -> Path:
    return ensure_dynamo_venv()


@pytest.fixture
def etcd_url(etcd_server: EtcdServer) -> str:
    return etcd_server.client_url


def test_dynamo_parses_our_cards_and_agrees_on_mdcsum(peer: Path, tmp_path: Path) -> None:
    basic = write_dynamo_sample_model(tmp_path / "basic", vocab_size=50)
    (basic / "README.md").write_text("# left out by Dynamo too\n")
    (basic / "tokenizer.model").write_bytes(b"\x00\x01" * 40)
    jinja = write_dynamo_sample_model(tmp_path / "jinja", vocab_size=50, seed=1)
    (jinja / "chat_template.jinja").write_text("{{ messages }}")
    bare = write_dynamo_sample_model(
        tmp_path / "bare", vocab_size=50, max_position_embeddings=None, generation_config=False
    )
    template = tmp_path / "custom.jinja"
    template.write_text("{{ messages[0] }}")
    cards = [
        from_dir(basic),
        from_dir(basic, include_extra_files=True),
        from_dir(basic, display_name="Org/Name-1.5B", kv_cache_block_size=64),
        from_dir(jinja, custom_template=template, worker_type=None),
        from_dir(bare, model_type=("Completions",)),
        from_dir(basic, worker_type=WorkerType.PREFILL, model_type=()).replace(
            needs=((WorkerType.DECODE,), (WorkerType.AGGREGATED,)), aliases=("a", "B.c")
        ),
    ]
    local_dirs = oracle_local_dirs([encode_card(c).decode() for c in cards], peer)
    for card, local_dir in zip(cards, local_dirs, strict=True):
        assert local_dir.endswith(f"/by-slug/{card.slug}/{mdcsum(card)}"), card.display_name


def test_dynamo_frontend_lists_our_card_and_drops_it_with_the_lease(
    peer: Path, etcd_url: str, tmp_path: Path
) -> None:
    model = write_dynamo_sample_model(tmp_path / "m", vocab_size=50)
    card = from_dir(model, display_name="ours-local")  # local paths, self-hosting off
    instance_id = 0x694D9981145A61AD
    lease = etcd_lease_grant(etcd_url, 30)
    envelope = ModelEnvelope(
        namespace="dynamo",
        component="backend",
        endpoint="generate",
        instance_id=instance_id,
        card=card,
    )
    # Without an Endpoint record on the same lease a Dynamo frontend never lists the model.
    record = {
        "type": "Endpoint",
        "component": "backend",
        "endpoint": "generate",
        "namespace": "dynamo",
        "instance_id": instance_id,
        "transport": {"tcp": f"127.0.0.1:1/{instance_id:x}/dynamo/backend/generate"},
    }
    for key, value in (
        (card_key("dynamo", "backend", "generate", instance_id), encode_envelope(envelope)),
        (endpoint_key("dynamo", "backend", "generate", instance_id), json.dumps(record).encode()),
    ):
        etcd_put(etcd_url, key, value, lease)
    home = tmp_path / "frontend-home"
    home.mkdir()
    port = free_port()
    frontend = start_dynamo_frontend(
        peer, dynamo_env(etcd_url, home), port, log=tmp_path / "frontend.log"
    )
    try:
        wait_for_models(port, ["ours-local"], proc=frontend)
        cached = home / ".cache" / "dynamo" / "mdc" / "by-slug" / card.slug / mdcsum(card)
        assert cached.is_dir()
        for _, f in card.files():
            assert (cached / f.basename).read_bytes() == Path(f.path).read_bytes()
        etcd_lease_revoke(etcd_url, lease)
        wait_for_models(port, ["ours-local"], present=False, proc=frontend)
    finally:
        frontend.stop()


def test_a_file_name_that_needs_encoding_is_encoded_as_dynamo_does_and_cached_by_name(
    peer: Path, etcd_url: str, tmp_path: Path
) -> None:
    """Dynamo 1.6.1 self-hosts a custom template named ``my template (v2).jinja`` at
    ``.../my%20template%20(v2).jinja``: the URL segment our worker uses for that name. Our
    frontend fetches it from Dynamo's status server and stores it under its real name."""
    model = write_dynamo_sample_model(tmp_path / "m", vocab_size=50)
    template = tmp_path / "my template (v2).jinja"
    template.write_text("{{ messages[0]['content'] }}")
    home = tmp_path / "worker-home"
    home.mkdir()
    env = dynamo_env(etcd_url, home, system_port=free_port_below_32768())
    worker = start_dynamo_worker(
        peer, env, model, "encoded", register_kwargs={"custom_template_path": str(template)},
        log=tmp_path / "worker.log",
    )  # fmt: skip
    try:
        values = wait_until_sync(
            lambda: etcd_get_prefix(etcd_url, "v1/mdc/"), message="card", proc=worker, timeout=60.0
        )
        [card] = [decode_envelope(v).card for v in values.values()]
        slot = card.chat_template_file
        assert slot is not None and slot.file.is_url
        assert slot.file.path.rsplit("/", 1)[1] == url_segment(template.name)
        resolved = asyncio.run(resolve_metadata_files(card, cache_dir=tmp_path / "cache"))
        assert resolved.local_dir is not None
        assert (resolved.local_dir / template.name).read_bytes() == template.read_bytes()
    finally:
        worker.stop()
