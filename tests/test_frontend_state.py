"""The frontend's pure bookkeeping: admission by mdcsum, filtering, pipeline sources."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from discovery_mdc.card import (
    ModelDeploymentCard,
    card_key,
    mdcsum,
)
from discovery_mdc.cli._logging import JsonFormatter
from discovery_mdc.etcd import Change, ChangeKind
from discovery_mdc.frontend._state import CREATED_MEMORY, EventKind, NamespaceFilter, Registry
from testkit import envelope_kv, instance_key, make_card


def _put(
    instance: int, card: ModelDeploymentCard | None = None, ns: str = "dynamo", rev: int = 1
) -> Change:
    return Change(ChangeKind.PUT, *envelope_kv(card or make_card(), instance, namespace=ns), rev)


def _delete(instance: int, ns: str = "dynamo") -> Change:
    return Change(ChangeKind.DELETE, instance_key(instance, ns), mod_revision=9)


def test_first_instance_requests_a_pipeline_and_is_invisible_until_done() -> None:
    reg = Registry()
    out = reg.apply(_put(1))
    assert [p.model for p in out.pipelines] == ["org/m"]
    assert out.events == [] and reg.ready_models() == []
    done = reg.pipeline_done("org/m", mdcsum(make_card()), make_card(), Path("/cache/x"), now=5)
    assert [e.kind for e in done.events] == [EventKind.ADDED]
    (info,) = reg.ready_models()
    assert info.name == "org/m" and info.created == 5
    assert info.worker_sets[0].instances == (card_key("dynamo", "backend", "generate", 1),)


def test_replica_with_same_mdcsum_joins_without_a_new_pipeline_once_ready() -> None:
    reg = Registry()
    reg.apply(_put(1))
    reg.pipeline_done("org/m", mdcsum(make_card()), make_card(), Path("/c"))
    out = reg.apply(_put(2))
    assert out.pipelines == []
    assert [e.kind for e in out.events] == [EventKind.UPDATED]
    (info,) = reg.ready_models()
    assert len(info.worker_sets) == 1 and len(info.worker_sets[0].instances) == 2


def test_replica_with_different_mdcsum_is_rejected_loudly(caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry()
    reg.apply(_put(1))
    with caplog.at_level(logging.ERROR):
        out = reg.apply(_put(3, make_card(tok="9")))
    assert [e.kind for e in out.events] == [EventKind.REJECTED]
    assert out.pipelines == []
    assert card_key("dynamo", "backend", "generate", 3) not in reg.instance_keys()
    assert mdcsum(make_card()) in caplog.text and mdcsum(make_card(tok="9")) in caplog.text
    assert "v1/mdc/dynamo/backend/generate/3" in caplog.text
    # ... and says which field differs, with both values, in the log and the event.
    differs = f"tokenizer blake3:{'2' * 64} (4 bytes) vs blake3:{'9' * 64} (4 bytes)"
    assert differs in caplog.text
    (event,) = out.events
    assert differs in event.detail
    assert [(d.field, d.first, d.second) for d in event.diff] == [
        ("tokenizer", f"blake3:{'2' * 64} (4 bytes)", f"blake3:{'9' * 64} (4 bytes)")
    ]
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.model == "org/m"  # type: ignore[attr-defined]
    assert record.key == card_key("dynamo", "backend", "generate", 3)  # type: ignore[attr-defined]
    # As a JSON log line: the namespace, and the diff as a list of objects, not a repr.
    line = json.loads(JsonFormatter().format(record))
    assert line["namespace"] == "dynamo" and line["model"] == "org/m"
    assert line["diff"] == [
        {
            "field": "tokenizer",
            "worker_set": f"blake3:{'2' * 64} (4 bytes)",
            "instance": f"blake3:{'9' * 64} (4 bytes)",
        }
    ]


def test_a_rejection_names_context_length_block_size_and_worker_type() -> None:
    reg = Registry()
    reg.apply(_put(1))
    other = make_card().replace(context_length=8192, kv_cache_block_size=32)
    (event,) = reg.apply(_put(2, other)).events
    fields = {d.field: (d.first, d.second) for d in event.diff}
    assert fields == {"context_length": ("0", "8192"), "kv_cache_block_size": ("16", "32")}
    (rejected,) = reg.rejected_instances("org/m")
    assert rejected.key == card_key("dynamo", "backend", "generate", 2)
    assert rejected.diff == event.diff and rejected.reason == event.detail


def test_model_stats_count_every_known_model_ready_or_not() -> None:
    reg = Registry()
    reg.apply(_put(1))
    reg.apply(_put(2, make_card(tok="9")))  # rejected: same worker set, other mdcsum
    reg.apply(_put(3, make_card("org/other")))
    stats = {s.name: s for s in reg.model_stats()}
    assert (stats["org/m"].ready, stats["org/m"].instances, stats["org/m"].rejected) == (
        False, 1, 1
    )  # fmt: skip
    reg.pipeline_done("org/m", mdcsum(make_card()), make_card(), Path("/c"))
    stats = {s.name: s for s in reg.model_stats()}
    assert (stats["org/m"].ready, stats["org/m"].ready_instances) == (True, 1)
    assert (stats["org/other"].ready, stats["org/other"].instances) == (False, 1)


def test_created_survives_a_brief_drop_out_but_not_a_long_one() -> None:
    reg = Registry()
    reg.apply(_put(1), now=100)
    reg.pipeline_done("org/m", mdcsum(make_card()), make_card(), Path("/c"), now=100)
    reg.apply(_delete(1), now=110)  # e.g. etcd down longer than the TTL
    assert reg.ready_models() == []
    reg.apply(_put(2), now=130)  # the worker re-registers under a new lease
    reg.pipeline_done("org/m", mdcsum(make_card()), make_card(), Path("/c"), now=131)
    (info,) = reg.ready_models()
    assert info.created == 100
    reg.apply(_delete(2), now=200)
    reg.apply(_put(3), now=200 + CREATED_MEMORY + 1)
    reg.pipeline_done(
        "org/m", mdcsum(make_card()), make_card(), Path("/c"), now=200 + CREATED_MEMORY + 1
    )
    (info,) = reg.ready_models()
    assert info.created == 200 + CREATED_MEMORY + 1


def test_deleting_every_instance_removes_the_model() -> None:
    reg = Registry()
    reg.apply(_put(1))
    reg.apply(_put(2))
    reg.pipeline_done("org/m", mdcsum(make_card()), make_card(), Path("/c"))
    assert [e.kind for e in reg.apply(_delete(1)).events] == [EventKind.UPDATED]
    assert [e.kind for e in reg.apply(_delete(2)).events] == [EventKind.REMOVED]
    assert reg.ready_models() == [] and reg.instance_keys() == set()


def test_deleting_a_pending_worker_set_cancels_its_pipeline() -> None:
    reg = Registry()
    reg.apply(_put(1))
    out = reg.apply(_delete(1))
    assert out.cancelled == [("org/m", mdcsum(make_card()))]
    assert out.events == []
    assert reg.pipeline_done("org/m", mdcsum(make_card()), make_card(), Path("/c")).events == []
    assert reg.ready_models() == []


def test_new_incarnation_of_a_key_is_remove_then_add() -> None:
    reg = Registry()
    reg.apply(_put(1))
    reg.pipeline_done("org/m", mdcsum(make_card()), make_card(), Path("/c"))
    assert reg.apply(_put(1)).events == []  # same card again: nothing
    out = reg.apply(_put(1, make_card(tok="7")))
    assert [e.kind for e in out.events] == [EventKind.REMOVED]
    assert [p.mdcsum for p in out.pipelines] == [mdcsum(make_card(tok="7"))]


def test_malformed_and_non_hex_keys_are_skipped_and_flagged() -> None:
    reg = Registry()
    bad = reg.apply(Change(ChangeKind.PUT, "v1/mdc/dynamo/backend/generate/1", b"{not json", 1))
    assert bad.malformed and bad.pipelines == []
    nonhex = reg.apply(
        Change(ChangeKind.PUT, "v1/mdc/dynamo/backend/generate/XYZ", _put(1).value, 2)
    )
    assert nonhex.malformed and reg.instance_keys() == set()
    assert reg.apply(_put(5)).pipelines


@pytest.mark.parametrize(
    ("flt", "admitted"),
    [
        (NamespaceFilter.create(), {"ns1", "ns10", "dynamo"}),
        (NamespaceFilter.create("dynamo"), {"ns1", "ns10", "dynamo"}),
        (NamespaceFilter.create(""), {"ns1", "ns10", "dynamo"}),
        (NamespaceFilter.create("ns1"), {"ns1"}),
        (NamespaceFilter.create(prefix="ns1"), {"ns1", "ns10"}),
        (NamespaceFilter.create(prefix="dyn"), {"dynamo"}),
    ],
)
def test_namespace_filter(flt: NamespaceFilter, admitted: set[str]) -> None:
    reg = Registry(flt)
    got = set()
    for i, ns in enumerate(["ns1", "ns10", "dynamo"]):
        if reg.apply(_put(i + 1, ns=ns)).pipelines:
            got.add(ns)
    assert got == admitted


def test_exact_filter_narrows_the_etcd_prefix_on_a_slash_boundary() -> None:
    assert NamespaceFilter.create("ns1").etcd_prefix() == "v1/mdc/ns1/"
    assert NamespaceFilter.create().etcd_prefix() == "v1/mdc/"


def test_deleting_one_of_two_pending_worker_sets_keeps_the_shared_pipeline() -> None:
    reg = Registry()
    reg.apply(_put(1, ns="ns1"))
    out = reg.apply(_put(2, ns="ns2"))
    assert out.pipelines  # same (model, mdcsum): the driver joins the running pipeline
    out = reg.apply(_delete(1, ns="ns1"))
    assert out.cancelled == []
    assert reg.pending("org/m", mdcsum(make_card()))


def test_rejected_instance_is_admitted_once_the_blocking_worker_set_is_gone() -> None:
    reg = Registry()
    reg.apply(_put(1))
    reg.pipeline_done("org/m", mdcsum(make_card()), make_card(), Path("/c"))
    reg.apply(_put(3, make_card(tok="9")))
    assert reg.rejected_keys() == {card_key("dynamo", "backend", "generate", 3)}
    out = reg.apply(_delete(1))
    assert [e.kind for e in out.events] == [EventKind.REMOVED]
    assert [p.mdcsum for p in out.pipelines] == [mdcsum(make_card(tok="9"))]
    assert reg.rejected_keys() == set()
    assert reg.instance_keys() == {card_key("dynamo", "backend", "generate", 3)}


def test_deleting_a_rejected_key_forgets_it() -> None:
    reg = Registry()
    reg.apply(_put(1))
    reg.apply(_put(3, make_card(tok="9")))
    assert reg.apply(_delete(3)).events == []
    assert reg.rejected_keys() == set()
    reg.apply(_delete(1))
    assert reg.instance_keys() == set()


def test_replicas_share_one_decoded_card_and_same_bytes_are_skipped() -> None:
    reg = Registry()
    reg.apply(_put(1))
    reg.apply(_put(2))
    cards = {id(i.envelope.card) for i in reg.instances_for("org/m", mdcsum(make_card()))}
    assert len(cards) == 1  # card_json decoded once for both replicas
    again = reg.apply(_put(1, rev=7))
    assert again.pipelines == [] and again.events == []


def test_each_distinct_card_json_is_hashed_once_and_its_mdcsum_travels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from discovery_mdc.frontend import _state

    hashed: list[str] = []

    def counting(card: ModelDeploymentCard) -> str:
        hashed.append(card.tokenizer.file.checksum.hex[:1] if card.tokenizer else "?")
        return mdcsum(card)

    monkeypatch.setattr(_state, "mdcsum", counting)
    reg = Registry()
    first = reg.apply(_put(1))
    reg.apply(_put(2))  # a replica: same card_json
    reg.apply(_put(3, make_card(tok="9")))  # other files: rejected by the mdcsum gate
    # Enough other cards (ids no frontend can serve, so no model is kept) to flush the
    # bounded memo: the rejected card's mdcsum must not be needed again.
    for i in range(100):
        reg.apply(_put(0x100 + i, make_card(f"bad\n{i}", tok="5")))
    reg.apply(_delete(1))
    out = reg.apply(_delete(2))  # the blocking set is gone: 3 is admitted again
    assert (hashed.count("2"), hashed.count("9"), hashed.count("5")) == (1, 1, 100)
    assert [p.mdcsum for p in first.pipelines] == [mdcsum(make_card())]
    assert [p.mdcsum for p in out.pipelines] == [mdcsum(make_card(tok="9"))]
    (inst,) = reg.instances_for("org/m", mdcsum(make_card(tok="9")))
    assert inst.mdcsum == mdcsum(make_card(tok="9"))


def test_sources_are_the_waiting_replicas_uris_per_blob() -> None:
    def served_by(host: str) -> ModelDeploymentCard:
        return make_card().with_paths(lambda _, f: f"http://{host}:8081/v1/metadata/m/{f.basename}")

    reg = Registry()
    reg.apply(_put(1, served_by("w1")))
    reg.apply(_put(2, served_by("w2")))
    reg.apply(_put(3, served_by("w1")))  # same URLs as instance 1: listed once
    got = reg.sources("org/m", mdcsum(make_card()))
    assert got is not None
    card, alternates = got
    assert card.model_info is not None and "w1" in card.model_info.file.path
    assert alternates["2" * 64] == [
        "http://w1:8081/v1/metadata/m/tokenizer.json",
        "http://w2:8081/v1/metadata/m/tokenizer.json",
    ]
    reg.pipeline_done("org/m", mdcsum(make_card()), make_card(), Path("/c"))
    assert reg.sources("org/m", mdcsum(make_card())) is None  # nobody waits any more


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("org/m\n", "U+000A, a control character"),
        ("org/\tm", "U+0009, a control character"),
        ("org\u2028m", "U+2028, a line separator"),
        ("org/../m", "'.' or '..' path segment"),
        (".", "'.' or '..' path segment"),
        ("m" * 513, "513 characters long, above 512"),
        ("org/ready", "ends in '/ready'"),
    ],
)
def test_a_model_id_the_route_cannot_serve_is_rejected_with_a_reason(
    name: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    reg = Registry()
    bad = make_card().replace(display_name=name)  # a valid slug: only the id is wrong
    with caplog.at_level(logging.ERROR):
        out = reg.apply(_put(1, bad))
    key = card_key("dynamo", "backend", "generate", 1)
    [event] = out.events
    assert (event.kind, event.model, event.key) == (EventKind.REJECTED, name, key)
    assert why in event.detail and "/v1/models/{id} could not serve it" in event.detail
    assert why in caplog.text and key in caplog.text
    assert out.pipelines == [] and reg.instance_keys() == set() and reg.ready_models() == []
    assert reg.rejected_keys() == {key}
    assert reg.apply(_put(1, bad, rev=2)).events == []  # the same bytes again: said once
    # The worker fixes its name: the same key is admitted.
    assert [p.model for p in reg.apply(_put(1, make_card(), rev=3)).pipelines] == ["org/m"]
    assert reg.rejected_keys() == set() and reg.instance_keys() == {key}
    # An admitted key that turns bad leaves, and a delete forgets it.
    reg.pipeline_done("org/m", mdcsum(make_card()), make_card(), Path("/c"))
    assert [e.kind for e in reg.apply(_put(1, bad, rev=4)).events] == [
        EventKind.REMOVED,
        EventKind.REJECTED,
    ]
    assert reg.apply(_delete(1)).events == [] and reg.rejected_keys() == set()
