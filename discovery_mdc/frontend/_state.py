"""The frontend's bookkeeping as plain code: namespace filter and the registry.

Nothing here touches sockets or disks. etcd changes (from the prefix informer) go in; actions
and model events come out. The asyncio driver (``_watcher.py``) feeds it and runs the
pipelines it asks for.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import blake3
import msgspec

from discovery_mdc._changes import Change, ChangeKind
from discovery_mdc.card import (
    MDC_PREFIX,
    CardFieldDiff,
    ModelDeploymentCard,
    ModelEnvelope,
    card_diff,
    decode_card,
    decode_envelope,
    explain_card_diff,
    format_model_type,
    mdcsum,
    parse_card_key,
    unservable_model_id,
)
from discovery_mdc.errors import CardDecodeError

__all__ = [
    "EventKind",
    "Instance",
    "ModelEvent",
    "ModelInfo",
    "ModelStats",
    "NamespaceFilter",
    "Registry",
    "RejectedInstance",
    "WorkerSetInfo",
    "diff_json",
    "model_id",
    "worker_set_key",
]

log = logging.getLogger("discovery_mdc.frontend")

GLOBAL_NAMESPACES: Final = frozenset({"", "dynamo"})
#: How long a model that left keeps its ``created`` time for when it comes back (a worker
#: re-registering after an etcd outage should not look like a new model to clients).
CREATED_MEMORY: Final = 600


@dataclass(frozen=True, slots=True)
class NamespaceFilter:
    """Global (no filter), exact namespace, or namespace prefix.

    Exact matching compares the whole key segment, so ``ns1`` never admits ``ns10``. Prefix
    matching is a string prefix of the namespace segment (``team-`` admits ``team-a``).
    """

    namespace: str | None = None
    prefix: str | None = None

    @classmethod
    def create(cls, namespace: str | None = None, prefix: str | None = None) -> NamespaceFilter:
        if namespace is not None and prefix is not None:
            raise ValueError("give either a namespace or a namespace prefix, not both")
        if namespace in GLOBAL_NAMESPACES:
            namespace = None
        if prefix == "":
            prefix = None
        return cls(namespace, prefix)

    def etcd_prefix(self) -> str:
        """The narrowest etcd prefix that still holds every admitted key."""
        if self.namespace is not None:
            return f"{MDC_PREFIX}{self.namespace}/"
        if self.prefix is not None:
            return f"{MDC_PREFIX}{self.prefix}"
        return MDC_PREFIX

    def admits(self, namespace: str) -> bool:
        if self.namespace is not None:
            return namespace == self.namespace
        if self.prefix is not None:
            return namespace.startswith(self.prefix)
        return True


def model_id(card: ModelDeploymentCard) -> str:
    """The name a model is served under: the LoRA name for an adapter, else display_name."""
    return card.lora.name if card.lora is not None else card.display_name


def worker_set_key(env: ModelEnvelope) -> str:
    worker_type = env.card.worker_type.value if env.card.worker_type else "none"
    return f"{env.namespace}:{format_model_type(env.card.model_type)}:{worker_type}"


# --------------------------------------------------------------------------- registry


class EventKind(enum.Enum):
    ADDED = "added"
    UPDATED = "updated"
    REMOVED = "removed"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """``detail`` says why; for REJECTED, ``diff`` lists the card fields that differ from
    the worker set's (``detail`` is their one-line explanation)."""

    kind: EventKind
    model: str
    key: str | None = None
    detail: str = ""
    diff: tuple[CardFieldDiff, ...] = ()


@dataclass(frozen=True, slots=True)
class RejectedInstance:
    """An instance refused at admission: its key and mdcsum, the worker set it would have
    joined, and why. Refused by the mdcsum gate: that set's mdcsum and what differs; refused
    for a model id ``/v1/models/{id}`` could not serve: ``worker_set_mdcsum`` is empty."""

    key: str
    mdcsum: str
    worker_set: str
    worker_set_mdcsum: str
    reason: str
    diff: tuple[CardFieldDiff, ...] = ()


def diff_json(diff: Iterable[CardFieldDiff]) -> list[dict[str, str]]:
    """A rejection's differing fields as JSON, as ``/v1/models/{id}``, ``ls --json`` and the
    JSON log line show them: ``[{"field", "worker_set", "instance"}, ...]``."""
    return [{"field": d.field, "worker_set": d.first, "instance": d.second} for d in diff]


@dataclass(slots=True)
class Instance:
    """An admitted card key: its envelope, its card's mdcsum (computed once per distinct
    ``card_json``), and whether its worker set is ready."""

    key: str
    envelope: ModelEnvelope
    mdcsum: str
    ready: bool = False


@dataclass(slots=True)
class _WorkerSet:
    key: str
    mdcsum: str
    instances: dict[str, Instance] = field(default_factory=dict)
    card: ModelDeploymentCard | None = None  # the resolved card, once ready
    local_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class WorkerSetInfo:
    key: str
    mdcsum: str
    ready: bool
    local_dir: Path | None
    instances: tuple[str, ...]
    files: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A snapshot of one ready model. ``context_window`` is the effective context length of
    its first ready worker set's card."""

    name: str
    created: int
    worker_sets: tuple[WorkerSetInfo, ...]
    rejected: tuple[RejectedInstance, ...] = ()
    context_window: int | None = None


@dataclass(frozen=True, slots=True)
class ModelStats:
    """Counts for one known model, ready or not (per-model metrics, readiness)."""

    name: str
    ready: bool
    instances: int
    ready_instances: int
    rejected: int


@dataclass(frozen=True, slots=True)
class PipelineRequest:
    """Run verify-and-cache (and prepare) for (model, mdcsum); :meth:`Registry.sources`
    gives the card and its sources at each attempt."""

    model: str
    mdcsum: str


@dataclass(slots=True)
class _Model:
    name: str
    worker_sets: dict[str, _WorkerSet] = field(default_factory=dict)
    visible: bool = False
    created: int = 0


@dataclass(slots=True)
class Outcome:
    events: list[ModelEvent] = field(default_factory=list)
    pipelines: list[PipelineRequest] = field(default_factory=list)
    cancelled: list[tuple[str, str]] = field(default_factory=list)
    malformed: bool = False


class Registry:
    """Worker sets by mdcsum, instances by key, and which models are visible."""

    def __init__(self, namespace_filter: NamespaceFilter | None = None) -> None:
        self.filter = namespace_filter or NamespaceFilter()
        self._models: dict[str, _Model] = {}
        self._by_key: dict[str, tuple[str, str]] = {}  # key -> (model, worker set key)
        # Rejected instances, reconsidered when the worker set that blocked them is dropped:
        # a fresh frontend would admit them then, and this one must converge to the same.
        self._rejected: dict[str, tuple[ModelEnvelope, RejectedInstance]] = {}
        # name -> (created, when it left), for models that left recently (CREATED_MEMORY).
        self._gone: dict[str, tuple[int, int]] = {}
        # Replicas publish the same card_json; decode and hash each distinct one once
        # (raw card_json -> (card, mdcsum)). The mdcsum then travels with the instance.
        self._cards: dict[bytes, tuple[ModelDeploymentCard, str]] = {}
        # key -> digest of the value last applied (a 16-byte digest, not the ~2 KB value).
        self._values: dict[str, bytes] = {}

    # -- queries

    def instance_keys(self) -> set[str]:
        return set(self._by_key)

    def rejected_keys(self) -> set[str]:
        return set(self._rejected)

    def counts(self) -> tuple[int, int]:
        """(ready models, admitted instances), cheaply, for the gauges."""
        return sum(1 for m in self._models.values() if m.visible), len(self._by_key)

    def ready_models(self) -> list[ModelInfo]:
        return [
            self._info(m) for m in sorted(self._models.values(), key=lambda m: m.name) if m.visible
        ]

    def model(self, name: str) -> ModelInfo | None:
        m = self._models.get(name)
        return self._info(m) if m is not None and m.visible else None

    def model_stats(self) -> list[ModelStats]:
        """Every known model (ready, still being prepared, or with rejected instances)."""
        rejected: dict[str, int] = {}
        for env, _ in self._rejected.values():
            rejected[model_id(env.card)] = rejected.get(model_id(env.card), 0) + 1
        out = []
        for name in sorted(self._models.keys() | rejected.keys()):
            m = self._models.get(name)
            sets = list(m.worker_sets.values()) if m is not None else []
            out.append(
                ModelStats(
                    name,
                    m is not None and m.visible,
                    sum(len(ws.instances) for ws in sets),
                    sum(len(ws.instances) for ws in sets if ws.card is not None),
                    rejected.get(name, 0),
                )
            )
        return out

    def rejected_instances(self, name: str) -> tuple[RejectedInstance, ...]:
        """The instances of model ``name`` refused by the mdcsum gate, by key."""
        return tuple(
            info
            for key, (env, info) in sorted(self._rejected.items())
            if model_id(env.card) == name
        )

    def _info(self, m: _Model) -> ModelInfo:
        sets = []
        context_window = None
        for ws in m.worker_sets.values():
            if ws.card is not None and context_window is None:
                context_window = ws.card.effective_context_length()
            files = tuple(f.path for _, f in ws.card.files()) if ws.card else ()
            sets.append(
                WorkerSetInfo(
                    ws.key,
                    ws.mdcsum,
                    ws.card is not None,
                    ws.local_dir,
                    tuple(sorted(ws.instances)),
                    files,
                )
            )
        return ModelInfo(
            m.name, m.created, tuple(sets), self.rejected_instances(m.name), context_window
        )

    # -- changes

    def apply(self, change: Change, now: int = 0) -> Outcome:
        """Apply one etcd change; returns model events and the pipelines to start."""
        out = Outcome()
        if change.kind is ChangeKind.DELETE:
            self._remove(change.key, out, now)
            return out
        digest = blake3.blake3(change.value).digest(16)
        if self._values.get(change.key) == digest:
            return out  # the same bytes again (a replay or a relist upsert): nothing changed
        card_key = parse_card_key(change.key)
        if card_key is None:
            log.warning(
                "ignoring key %s: not a card key (instance id must be lowercase hex)",
                change.key,
                extra={"key": change.key},
            )
            self._remove(change.key, out, now)
            out.malformed = True
            return out
        if not self.filter.admits(card_key.namespace):
            return out
        try:
            env, sum_ = self._decode(change.value)
        except CardDecodeError as exc:
            log.warning(
                "skipping malformed card at %s: %s", change.key, exc, extra={"key": change.key}
            )
            self._remove(change.key, out, now)
            out.malformed = True
            return out
        except Exception as exc:  # a decoder bug must cost one key, never the watcher
            log.error(
                "skipping card at %s that failed to decode: %r",
                change.key,
                exc,
                extra={"key": change.key},
            )
            self._remove(change.key, out, now)
            out.malformed = True
            return out
        self._add(change.key, env, sum_, out, now)
        self._values[change.key] = digest
        return out

    def _decode(self, value: bytes) -> tuple[ModelEnvelope, str]:
        """The envelope in ``value`` and its card's mdcsum, each distinct card decoded and
        hashed once (memo keyed by the raw ``card_json``)."""
        sums: list[str] = []

        def card(card_json: msgspec.Raw) -> ModelDeploymentCard:
            raw = bytes(card_json)
            hit = self._cards.get(raw)
            if hit is None:
                if len(self._cards) > 4 * len(self._models) + 64:
                    self._cards.clear()  # bounded: only cards of live models stay hot
                decoded = decode_card(raw)
                hit = self._cards[raw] = (decoded, mdcsum(decoded))
            sums.append(hit[1])
            return hit[0]

        env = decode_envelope(value, card_decoder=card)
        return env, sums[0]

    def _add(self, key: str, env: ModelEnvelope, sum_: str, out: Outcome, now: int) -> None:
        name = model_id(env.card)
        unservable = unservable_model_id(name)
        if unservable is not None:
            # Listing it would advertise an id that /v1/models/{id} answers with 404.
            self._remove(key, out, now)
            reason = f"{unservable}: /v1/models/{{id}} could not serve it"
            log.error("rejected instance %s of model %r: %s", key, name, reason)
            out.events.append(ModelEvent(EventKind.REJECTED, name, key, reason))
            info = RejectedInstance(key, sum_, worker_set_key(env), "", reason)
            self._rejected[key] = (env, info)
            return
        ws_key = worker_set_key(env)
        previous = self._by_key.get(key)
        if previous is not None:
            old = self._models[previous[0]].worker_sets[previous[1]].instances[key]
            if old.envelope == env:
                return
            # A new incarnation of the same key: remove, then add.
            self._remove(key, out, now)
        self._rejected.pop(key, None)
        model = self._models.get(name)
        if model is None:
            model = self._models[name] = _Model(name)
        ws = model.worker_sets.get(ws_key)
        if ws is not None and ws.mdcsum != sum_:
            self._reject(key, env, name, ws, sum_, out)
            return
        if ws is None:
            ws = model.worker_sets[ws_key] = _WorkerSet(ws_key, sum_)
            # Another worker set of this model may already hold the same files.
            for other in model.worker_sets.values():
                if other.mdcsum == sum_ and other.card is not None:
                    ws.card, ws.local_dir = other.card, other.local_dir
                    break
        inst = Instance(key, env, sum_, ready=ws.card is not None)
        ws.instances[key] = inst
        self._by_key[key] = (name, ws_key)
        if ws.card is None:
            out.pipelines.append(PipelineRequest(name, sum_))
        elif model.visible:
            out.events.append(ModelEvent(EventKind.UPDATED, name, key, "instance added"))
        else:
            self._make_visible(model, now, out, key)

    def _reject(
        self,
        key: str,
        env: ModelEnvelope,
        name: str,
        ws: _WorkerSet,
        sum_: str,
        out: Outcome,
    ) -> None:
        # Compare with the card as a member of the set published it (the resolved card's
        # paths point into the cache; paths are not compared anyway).
        reference = next(iter(ws.instances.values())).envelope.card
        diff = card_diff(reference, env.card)
        reason = (
            f"mdcsum {sum_} differs from worker set {ws.key}'s {ws.mdcsum}: "
            f"{explain_card_diff(diff)}"
        )
        log.error(
            "rejected instance %s of model %r: %s",
            key,
            name,
            reason,
            extra={
                "model": name,
                "key": key,
                "mdcsum": sum_,
                "namespace": env.namespace,
                "reason": reason,
                "diff": diff_json(diff),
            },
        )
        out.events.append(ModelEvent(EventKind.REJECTED, name, key, reason, diff))
        info = RejectedInstance(key, sum_, ws.key, ws.mdcsum, reason, diff)
        self._rejected[key] = (env, info)

    def _make_visible(self, model: _Model, now: int, out: Outcome, key: str | None) -> None:
        model.visible = True
        remembered = self._gone.pop(model.name, None)
        if not model.created and remembered is not None and now - remembered[1] <= CREATED_MEMORY:
            model.created = remembered[0]
        model.created = model.created or now
        log.info(
            "model %r added (worker sets: %s)",
            model.name,
            ", ".join(f"{k}={ws.mdcsum[:12]}" for k, ws in model.worker_sets.items()),
            extra={"model": model.name, "key": key},
        )
        out.events.append(ModelEvent(EventKind.ADDED, model.name, key))

    def _remove(self, key: str, out: Outcome, now: int = 0) -> None:
        self._values.pop(key, None)
        if self._rejected.pop(key, None) is not None:
            return  # never registered
        where = self._by_key.pop(key, None)
        if where is None:
            return
        name, ws_key = where
        model = self._models[name]
        ws = model.worker_sets[ws_key]
        del ws.instances[key]
        dropped = not ws.instances
        if dropped:
            del model.worker_sets[ws_key]
            # The pipeline is per (model, mdcsum): another worker set may still wait for it.
            if ws.card is None and not self.pending(name, ws.mdcsum):
                out.cancelled.append((name, ws.mdcsum))
        if not any(w.card is not None for w in model.worker_sets.values()):
            if model.visible:
                model.visible = False
                self._forget_gone(now)
                self._gone[name] = (model.created, now)
                model.created = 0
                log.info(
                    "model %r removed (no ready instances left)",
                    name,
                    extra={"model": name, "key": key},
                )
                out.events.append(ModelEvent(EventKind.REMOVED, name, key))
        elif model.visible:
            out.events.append(ModelEvent(EventKind.UPDATED, name, key, "instance removed"))
        if not model.worker_sets:
            del self._models[name]
        if dropped:
            self._readmit(name, ws_key, out, now)

    def _readmit(self, name: str, ws_key: str, out: Outcome, now: int) -> None:
        """Admit again the instances rejected by a worker set that is now gone."""
        for key, (env, info) in list(self._rejected.items()):
            if model_id(env.card) == name and worker_set_key(env) == ws_key:
                del self._rejected[key]
                log.info(
                    "reconsidering instance %s of model %r: worker set %s is gone",
                    key,
                    name,
                    ws_key,
                    extra={"model": name, "key": key},
                )
                self._add(key, env, info.mdcsum, out, now)

    def _forget_gone(self, now: int) -> None:
        self._gone = {n: v for n, v in self._gone.items() if now - v[1] <= CREATED_MEMORY}

    def pipeline_done(
        self,
        model_name: str,
        sum_: str,
        card: ModelDeploymentCard,
        local_dir: Path | None,
        now: int = 0,
    ) -> Outcome:
        """Mark every pending instance of (model, mdcsum) ready with the resolved card."""
        out = Outcome()
        model = self._models.get(model_name)
        if model is None:
            return out
        became_ready = False
        for ws in model.worker_sets.values():
            if ws.mdcsum == sum_ and ws.card is None:
                ws.card, ws.local_dir = card, local_dir
                for inst in ws.instances.values():
                    inst.ready = True
                became_ready = True
        if became_ready:
            if model.visible:
                out.events.append(
                    ModelEvent(EventKind.UPDATED, model_name, None, "worker set ready")
                )
            else:
                self._make_visible(model, now, out, None)
        return out

    def pending(self, model_name: str, sum_: str) -> bool:
        """True while some instance still waits for the (model, mdcsum) pipeline."""
        model = self._models.get(model_name)
        return model is not None and any(
            ws.mdcsum == sum_ and ws.card is None and ws.instances
            for ws in model.worker_sets.values()
        )

    def sources(
        self, model_name: str, sum_: str, *, waiting_only: bool = True
    ) -> tuple[ModelDeploymentCard, dict[str, list[str]]] | None:
        """What a pipeline for (model, mdcsum) fetches from: the card of one waiting instance
        (any instance unless ``waiting_only``) and, for each blob, every such replica's URI
        (in the order the replicas were admitted; the cache decides which one to try first).
        None when there is none."""
        waiting = [
            i for i in self.instances_for(model_name, sum_) if not (i.ready and waiting_only)
        ]
        if not waiting:
            return None
        alternates: dict[str, list[str]] = {}
        for inst in waiting:
            for _, f in inst.envelope.card.files():
                uris = alternates.setdefault(f.checksum.hex, [])
                if f.path not in uris:
                    uris.append(f.path)
        return waiting[0].envelope.card, alternates

    def instances_for(self, model_name: str, sum_: str) -> Iterable[Instance]:
        model = self._models.get(model_name)
        if model is None:
            return ()
        return [
            i
            for ws in model.worker_sets.values()
            if ws.mdcsum == sum_
            for i in ws.instances.values()
        ]
