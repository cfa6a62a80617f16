"""Worker (the publisher) against MemoryStore: keys, envelopes, create-if-absent, unregister,
revoke on exit, re-publishing after lease loss, and the Dynamo endpoint-instance record."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from discovery_mdc.cache import resolve_metadata_files
from discovery_mdc.card import decode_envelope
from discovery_mdc.etcd import KeyExistsError, LeaseSession, MemoryStore, SessionState
from discovery_mdc.worker import Worker
from testkit import FakeClock, wait_until

PREFIX = "v1/mdc/dynamo/backend/generate/"


def value_of(store: MemoryStore, key: str | None) -> dict[str, Any]:
    assert key is not None
    kv = store.get(key)
    assert kv is not None, f"{key} is not in the store"
    parsed: dict[str, Any] = json.loads(kv.value)
    return parsed


async def test_card_is_published_under_the_lease_keyed_card_key_with_the_spec_envelope(
    make_model_dir: Callable[..., Path],
) -> None:
    store = MemoryStore()
    model = make_model_dir("tiny-llama")
    async with Worker(store, lease_ttl=10) as worker:
        published = await worker.register_model(model)
        lease = worker.session.lease_id
        assert published.key == f"{PREFIX}{lease:x}"
        kv = store.get(published.key)
        assert kv is not None and kv.lease == lease
        raw = json.loads(kv.value)
        assert list(raw) == [
            "type", "namespace", "component", "endpoint", "instance_id", "card_json",
        ]  # fmt: skip
        assert raw["type"] == "Model"
        assert (raw["namespace"], raw["component"], raw["endpoint"]) == (
            "dynamo", "backend", "generate",
        )  # fmt: skip
        # The instance id is the lease id, exact even above 2**53.
        assert raw["instance_id"] == lease > 2**53
        assert raw["card_json"]["display_name"] == "tiny-llama"
        assert raw["card_json"]["source_path"] == str(model)
        env = decode_envelope(kv.value)
        assert env.card == published.card and env.key == published.key
        assert store.leases()[lease].keys == (published.key,)


async def test_namespace_component_endpoint_and_lora_suffix_shape_the_key(
    make_model_dir: Callable[..., Path],
) -> None:
    store = MemoryStore()
    async with Worker(store, lease_ttl=10) as worker:
        published = await worker.register_model(
            make_model_dir(),
            model_name="Org/Base",
            namespace="prod",
            component="vllm",
            endpoint="chat",
            lora_name="Adapter.A",
        )
        lease = worker.session.lease_id
        assert published.key == f"v1/mdc/prod/vllm/chat/{lease:x}/adapter_a"
        raw = value_of(store, published.key)
        assert raw["model_suffix"] == "adapter_a"
        assert list(raw)[-1] == "model_suffix"
        assert raw["card_json"]["lora"] == {"name": "Adapter.A"}
        assert (raw["namespace"], raw["component"], raw["endpoint"]) == ("prod", "vllm", "chat")


async def test_second_publish_of_the_same_key_raises_and_does_not_overwrite(
    make_model_dir: Callable[..., Path],
) -> None:
    store = MemoryStore()
    async with Worker(store, lease_ttl=10, system_port=0, system_host="127.0.0.1") as worker:
        first = await worker.register_model(make_model_dir("first"))
        before = store.get(first.key or "")
        served = worker.registry.keys()
        # Another model on the same endpoint maps to the same key (one card per instance).
        with pytest.raises(KeyExistsError, match=first.key or ""):
            await worker.register_model(make_model_dir("second"))
        assert store.get(first.key or "") == before
        assert worker.published == (first,)
        # The rejected card's files are not served.
        assert worker.registry.keys() == served
        # The same model again: refused too, and the first card's files stay served.
        with pytest.raises(KeyExistsError):
            await worker.register_model(make_model_dir("first"))
        assert worker.registry.keys() == served
        assert store.get(first.key or "") == before


async def test_unregister_deletes_the_key_and_stops_serving_the_files(
    make_model_dir: Callable[..., Path],
) -> None:
    store = MemoryStore()
    async with Worker(store, lease_ttl=10, system_port=0, system_host="127.0.0.1") as worker:
        published = await worker.register_model(
            make_model_dir(), instance_transport="tcp://127.0.0.1:9000/generate"
        )
        assert len(store.keys()) == 2 and len(worker.registry) > 0
        await worker.unregister(published)
        assert store.keys() == []
        assert len(worker.registry) == 0
        assert worker.published == ()
        # The lease stays: the worker can publish again.
        assert worker.session.lease_id in store.leases()
        await worker.unregister(published)  # a second unregister is a no-op


async def test_leaving_the_context_revokes_the_lease_so_keys_vanish_at_once(
    make_model_dir: Callable[..., Path],
) -> None:
    store = MemoryStore()
    async with Worker(store, lease_ttl=10, system_port=0, system_host="127.0.0.1") as worker:
        await worker.register_model(make_model_dir(), instance_transport="tcp://h:1/x")
        lease = worker.session.lease_id
        assert store.keys()
    assert store.keys() == []
    assert lease not in store.leases()
    assert worker.session.state is SessionState.CLOSED
    assert worker.server is not None and not worker.server.is_running


async def test_lost_lease_republishes_the_card_under_the_new_lease_and_key(
    make_model_dir: Callable[..., Path],
) -> None:
    store = MemoryStore()
    fake = FakeClock(on_advance=store.advance)  # sleeps wait for advance()
    session = LeaseSession(store, ttl=9, clock=fake.clock, sleep=fake.sleep)
    async with Worker(store, session=session) as worker:
        published = await worker.register_model(
            make_model_dir(), instance_transport="tcp://10.0.0.1:9000/generate"
        )
        old_lease, old_key = session.lease_id, published.key
        store.expire_lease(old_lease)  # the next keepalive answers TTL 0
        assert store.keys() == []
        await wait_until(fake.sleeping, interval=0)  # the session is asleep
        await fake.advance(3)
        await wait_until(
            lambda: session.lease_id != old_lease and session.state is SessionState.REGISTERED,
            interval=0,
        )
        new_lease = session.lease_id
        assert published.key == f"{PREFIX}{new_lease:x}" != old_key
        raw = value_of(store, published.key)
        assert raw["instance_id"] == new_lease
        record = value_of(store, f"v1/instances/dynamo/backend/generate/{new_lease:x}")
        assert record["instance_id"] == new_lease
        assert sorted(store.leases()[new_lease].keys) == store.keys()
        assert len(store.keys()) == 2


async def test_instance_record_is_the_dynamo_endpoint_record_on_the_same_lease(
    make_model_dir: Callable[..., Path],
) -> None:
    store = MemoryStore()
    async with Worker(store, lease_ttl=10) as worker:
        published = await worker.register_model(
            make_model_dir(), instance_transport="tcp://10.1.2.3:9000/dynamo.backend.generate"
        )
        lease = worker.session.lease_id
        key = f"v1/instances/dynamo/backend/generate/{lease:x}"
        assert published.instance_handle is not None and published.instance_handle.key == key
        kv = store.get(key)
        assert kv is not None and kv.lease == lease
        assert json.loads(kv.value) == {
            "type": "Endpoint",
            "component": "backend",
            "endpoint": "generate",
            "namespace": "dynamo",
            "instance_id": lease,
            "transport": {"tcp": "10.1.2.3:9000/dynamo.backend.generate"},
        }
        assert set(store.leases()[lease].keys) == {key, published.key}


async def test_cards_on_one_endpoint_share_its_instance_record(
    make_model_dir: Callable[..., Path],
) -> None:
    store = MemoryStore()
    transport = "tcp://127.0.0.1:9000/generate"
    async with Worker(store, lease_ttl=10) as worker:
        model = make_model_dir()
        base = await worker.register_model(model, instance_transport=transport)
        lora = await worker.register_model(model, lora_name="a", instance_transport=transport)
        assert lora.instance_handle is base.instance_handle
        record = f"v1/instances/dynamo/backend/generate/{worker.session.lease_id:x}"
        assert store.keys() == sorted([base.key or "", lora.key or "", record])
        with pytest.raises(ValueError, match="already advertises"):
            await worker.register_model(model, lora_name="b", instance_transport="tcp://h:1/x")
        await worker.unregister(base)
        assert store.keys() == sorted([lora.key or "", record])
        await worker.unregister(lora)
        assert store.keys() == []


@pytest.mark.parametrize("bad", ["http://h:1/x", "tcp://h/x", "tcp://:1"])
async def test_bad_instance_transport_is_refused_before_publishing(
    make_model_dir: Callable[..., Path], bad: str
) -> None:
    store = MemoryStore()
    async with Worker(store, lease_ttl=10) as worker:
        with pytest.raises(ValueError, match="tcp://host:port"):
            await worker.register_model(make_model_dir(), instance_transport=bad)
        assert store.keys() == []


async def test_health_is_ready_only_while_the_cards_are_registered(
    make_model_dir: Callable[..., Path],
) -> None:
    store = MemoryStore()
    fake = FakeClock(on_advance=store.advance)  # sleeps wait for advance()
    session = LeaseSession(store, ttl=9, clock=fake.clock, sleep=fake.sleep)
    async with (
        Worker(store, session=session, system_port=0, system_host="127.0.0.1") as worker,
        aiohttp.ClientSession() as http,
    ):
        assert worker.server is not None
        url = f"http://127.0.0.1:{worker.server.port}/health"

        async def status() -> int:
            async with http.get(url) as resp:
                return resp.status

        assert await status() == 503  # nothing published yet
        await worker.register_model(make_model_dir())
        assert await status() == 200
        store.unavailable = True  # etcd down: keepalives fail until the deadline passes
        await wait_until(fake.sleeping, interval=0)  # the session is asleep
        await fake.advance(9)
        await wait_until(lambda: session.state is SessionState.LOST, interval=0)
        assert await status() == 503
        store.unavailable = False
        await wait_until(fake.sleeping, interval=0)  # the session is asleep
        await fake.advance(1)  # the recovery backoff
        await wait_until(lambda: session.state is SessionState.REGISTERED, interval=0)
        assert await status() == 200


async def test_model_name_defaults_to_the_dir_basename_and_source_path_is_as_given(
    make_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model_dir("Llama-3.1-8B")
    monkeypatch.chdir(model.parent)
    store = MemoryStore()
    async with Worker(store, lease_ttl=10) as worker:
        published = await worker.register_model("./Llama-3.1-8B")
        card = value_of(store, published.key)["card_json"]
        assert card["display_name"] == "Llama-3.1-8B"
        assert card["slug"] == "llama-3_1-8b"
        assert card["source_path"] == "./Llama-3.1-8B"


async def test_registered_log_line_names_the_key_and_the_lease_in_hex(
    make_model_dir: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    caplog.set_level(logging.INFO, logger="discovery_mdc.worker")
    async with Worker(store, lease_ttl=10) as worker:
        published = await worker.register_model(make_model_dir())
        lines = [r.getMessage() for r in caplog.records if "registered model" in r.getMessage()]
        assert lines == [
            f"registered model 'sample-model' at {published.key} "
            f"(lease {worker.session.lease_id:x})"
        ]


async def test_the_card_is_built_before_the_lease_so_a_bad_model_dir_never_reaches_etcd(
    tmp_path: Path,
) -> None:
    from discovery_mdc.errors import ModelDirError

    store = MemoryStore()
    async with Worker(store, lease_ttl=10) as worker:
        with pytest.raises(ModelDirError):
            await worker.register_model(tmp_path)  # no config.json
        assert store.calls == []
        assert worker.session.state is SessionState.STARTING
    assert store.calls == []


async def test_etcd_down_at_the_first_registration_raises_and_serves_nothing(
    make_model_dir: Callable[..., Path],
) -> None:
    from discovery_mdc.errors import EtcdConnectionError

    store = MemoryStore()
    store.unavailable = True
    async with Worker(store, lease_ttl=10, system_port=0, system_host="127.0.0.1") as worker:
        with pytest.raises(EtcdConnectionError):
            await worker.register_model(make_model_dir())
        assert len(worker.registry) == 0 and worker.published == ()
        store.unavailable = False  # a retry works once etcd answers
        published = await worker.register_model(make_model_dir())
        assert store.keys() == [published.key]


async def test_files_that_cannot_be_served_together_are_refused_before_the_lease(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    from discovery_mdc.errors import RegistryError

    # A custom template named like the model's tokenizer_config.json cannot share its URL.
    template = tmp_path / "elsewhere" / "tokenizer_config.json"
    template.parent.mkdir()
    template.write_text('{"chat_template": "x"}')
    store = MemoryStore()
    async with Worker(store, lease_ttl=10, system_port=0, system_host="127.0.0.1") as worker:
        with pytest.raises(RegistryError, match=r"tokenizer_config\.json"):
            await worker.register_model(make_model_dir(), custom_template=template)
        assert len(worker.registry) == 0 and worker.published == ()
        assert store.calls == [] and worker.session.state is SessionState.STARTING


async def test_concurrent_registrations_on_one_endpoint_share_one_instance_record(
    make_model_dir: Callable[..., Path],
) -> None:
    store = MemoryStore()
    transport = "tcp://127.0.0.1:9000/generate"
    async with Worker(store, lease_ttl=10) as worker:
        model = make_model_dir()
        base, lora = await asyncio.gather(
            worker.register_model(model, instance_transport=transport),
            worker.register_model(model, lora_name="a", instance_transport=transport),
        )
        assert base.instance_handle is lora.instance_handle
        keys = store.keys()
        assert len([k for k in keys if k.startswith("v1/instances/")]) == 1


async def test_a_failed_unregister_changes_nothing_and_can_be_retried(
    make_model_dir: Callable[..., Path],
) -> None:
    from discovery_mdc.errors import EtcdConnectionError

    store = MemoryStore()
    async with Worker(store, lease_ttl=10, system_port=0, system_host="127.0.0.1") as worker:
        published = await worker.register_model(make_model_dir())
        served = len(worker.registry)
        store.unavailable = True
        with pytest.raises(EtcdConnectionError):
            await worker.unregister(published)
        assert worker.published == (published,) and len(worker.registry) == served
        assert published.key is not None
        store.unavailable = False
        await worker.unregister(published)
        assert store.keys() == [] and len(worker.registry) == 0 and not worker.published


async def test_registration_duration_is_a_histogram_on_the_status_server(
    make_model_dir: Callable[..., Path],
) -> None:
    store = MemoryStore()
    async with Worker(store, lease_ttl=10, system_port=0, system_host="127.0.0.1") as worker:
        await worker.register_model(make_model_dir("timed"))
        assert worker.server is not None
        sample = worker.server.metrics.get_sample_value
        assert sample("discovery_mdc_worker_registration_seconds_count") == 1
        assert (sample("discovery_mdc_worker_registration_seconds_sum") or 0) > 0


def test_worker_from_env_reads_dynamos_variables_and_keywords_win() -> None:
    env = {
        "ETCD_LEASE_TTL": "7",
        "DYN_SYSTEM_PORT": "0",
        "DYN_SYSTEM_HOST": "127.0.0.1",
        "DYN_SELF_HOST_METADATA": "off",
        "ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS": "3",
        "DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT": "4",
    }
    worker = Worker.from_env(MemoryStore(), env=env, lease_ttl=9)
    assert worker.server is not None and worker.server.host == "127.0.0.1"
    assert worker.session.ttl == 9  # the keyword beats ETCD_LEASE_TTL
    assert worker._self_host is False
    # Without DYN_SYSTEM_PORT there is no status server; the constructor reads no variable.
    assert Worker.from_env(MemoryStore(), env={}).server is None
    assert Worker(MemoryStore()).server is None


@pytest.mark.parametrize("worker_default", [True, False])
async def test_self_host_metadata_is_chosen_per_model(
    make_model_dir: Callable[..., Path], worker_default: bool
) -> None:
    store = MemoryStore()
    async with Worker(
        store,
        lease_ttl=10,
        system_port=0,
        system_host="127.0.0.1",
        self_host_metadata=worker_default,
    ) as worker:
        default = await worker.register_model(make_model_dir("a"), endpoint="a")
        hosted = await worker.register_model(
            make_model_dir("b"), endpoint="b", self_host_metadata=True
        )
        local = await worker.register_model(
            make_model_dir("c"), endpoint="c", self_host_metadata=False
        )
        base = f"http://127.0.0.1:{worker.server.port}/v1/metadata/" if worker.server else "?"

        def self_hosted(p: Any) -> bool:
            return all(f.path.startswith(base) for _, f in p.card.files())

        # Per model, whatever the Worker says; None falls back to the Worker's setting.
        assert self_hosted(default) is worker_default
        assert self_hosted(hosted) and hosted.card.extra_files
        assert not any(f.path.startswith("http") for _, f in local.card.files())
        assert local.card.extra_files == ()
        keys = worker.registry.keys()
        assert {k.split("/")[0] for k in keys if k.count("/") == 1} == (
            {"a", "b"} if worker_default else {"b"}
        )


async def test_a_custom_template_whose_name_needs_encoding_is_served(
    make_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    template = tmp_path / "my template.jinja"
    template.write_text("{{ messages }}")
    async with Worker(
        MemoryStore(), lease_ttl=10, system_port=0, system_host="127.0.0.1"
    ) as worker:
        published = await worker.register_model(make_model_dir("t"), custom_template=template)
        slot = published.card.chat_template_file
        assert slot is not None
        assert slot.file.path.endswith("/v1/metadata/t/my%20template.jinja")
        async with aiohttp.ClientSession() as session, session.get(slot.file.path) as resp:
            assert resp.status == 200
            assert await resp.read() == b"{{ messages }}"
        # A frontend decodes the name and stores the file under it.
        resolved = await resolve_metadata_files(published.card, cache_dir=tmp_path / "cache")
        assert resolved.local_dir is not None
        assert _read(resolved.local_dir / "my template.jinja") == b"{{ messages }}"


def _read(path: Path) -> bytes:
    return path.read_bytes()
