"""Cards and envelopes for tests: a small card, the key and value a worker would publish, model
dirs that differ, and a fake resolver for the watcher."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from discovery_mdc._sample import write_sample_model
from discovery_mdc.card import (
    CheckedFile,
    Checksum,
    ModelDeploymentCard,
    Slot,
    SlotVariant,
    WorkerType,
    card_key,
    decode_envelope,
    mdcsum,
)
from discovery_mdc.errors import FetchError
from discovery_mdc.etcd import EtcdClient, Store
from discovery_mdc.frontend import model_id
from discovery_mdc.worker._publisher import _card_entry as card_entry

__all__ = [
    "FakeResolved",
    "FakeResolver",
    "card_keys",
    "card_keys_are",
    "envelope_kv",
    "instance_key",
    "make_card",
    "model_dirs",
    "publish",
    "published_card",
]


def make_card(name: str = "org/m", tok: str = "2", host: str = "w1") -> ModelDeploymentCard:
    """A two-file card self-hosted on ``host``; ``tok`` picks the tokenizer's checksum, so two
    cards of one name with different ``tok`` have different mdcsums."""
    base = f"http://{host}:8081/v1/metadata/{name.replace('/', '--')}"
    return ModelDeploymentCard.new(
        name,
        model_info=Slot(
            SlotVariant.HF_CONFIG_JSON,
            CheckedFile(f"{base}/config.json", Checksum("1" * 64), 3),
        ),
        tokenizer=Slot(
            SlotVariant.HF_TOKENIZER_JSON,
            CheckedFile(f"{base}/tokenizer.json", Checksum(tok * 64), 4),
        ),
        worker_type=WorkerType.AGGREGATED,
    )


def instance_key(instance: int, namespace: str = "dynamo") -> str:
    """The card key of instance ``instance`` on ``{namespace}/backend/generate``."""
    return card_key(namespace, "backend", "generate", instance)


def envelope_kv(
    card: ModelDeploymentCard,
    instance_id: int,
    *,
    namespace: str = "dynamo",
    component: str = "backend",
    endpoint: str = "generate",
) -> tuple[str, bytes]:
    """The key and value a worker with lease ``instance_id`` would publish for ``card``
    (the worker's own encoder, so tests publish exactly what a worker does)."""
    return card_entry(card, namespace, component, endpoint, instance_id)


async def publish(
    store: Store, instance: int, card: ModelDeploymentCard | None = None, ns: str = "dynamo"
) -> str:
    """Put the envelope of ``card`` (default :func:`make_card`) for ``instance``; its key."""
    key, value = envelope_kv(card or make_card(), instance, namespace=ns)
    await store.put(key, value)
    return key


async def card_keys(client: EtcdClient, prefix: str = "v1/mdc/") -> set[str]:
    """Every key under ``prefix`` now."""
    return {kv.key for kv in (await client.range_prefix_all(prefix)).kvs}


async def card_keys_are(client: EtcdClient, want: set[str]) -> bool:
    """True if the card keys in etcd are exactly ``want`` (a wait predicate)."""
    return await card_keys(client) == want


async def published_card(client: EtcdClient, key: str) -> ModelDeploymentCard:
    """The card published at ``key`` (which must exist)."""
    kv = await client.get(key)
    assert kv is not None, f"nothing at {key}"
    return decode_envelope(kv.value).card


def model_dirs(root: Path, n: int) -> list[Path]:
    """``n`` sample model dirs whose files (hence mdcsums) all differ."""
    return [write_sample_model(root / f"model-{i}", vocab_size=60 + i, seed=i) for i in range(n)]


@dataclass
class FakeResolved:
    """What a resolver returns to the watcher: the card and its local directory."""

    card: ModelDeploymentCard
    local_dir: Path | None


@dataclass
class FakeResolver:
    """A watcher resolver that records calls; per model it can block on a gate, fail a
    number of times, or end a number of times with the CancelledError of a future someone
    else cancelled (``lost``)."""

    calls: list[tuple[str, dict[str, list[str]]]] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)

    async def __call__(
        self, card: ModelDeploymentCard, *, alternates: dict[str, list[str]]
    ) -> FakeResolved:
        name = model_id(card)
        self.calls.append((name, {h: list(u) for h, u in alternates.items()}))
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()
        if self.failures.get(name, 0) > 0:
            self.failures[name] -= 1
            raise FetchError(f"fake fetch of {name} failed")
        if self.lost.get(name, 0) > 0:
            self.lost[name] -= 1
            cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            cancelled.cancel()
            await cancelled  # raises CancelledError, though nobody cancelled this call
        return FakeResolved(card, Path("/cache/by-slug") / card.slug / mdcsum(card))

    def count(self, name: str) -> int:
        """How many times ``name`` was resolved."""
        return sum(1 for n, _ in self.calls if n == name)
