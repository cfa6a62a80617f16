"""The worker half: status server, one lease, and the cards published under it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import Counter, Histogram

from discovery_mdc import _env
from discovery_mdc._env import (
    DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT,
    DEFAULT_LEASE_TTL,
    DEFAULT_SYSTEM_HOST,
)
from discovery_mdc._hf import HfEnv
from discovery_mdc._lifecycle import AsyncService
from discovery_mdc._metrics import SECONDS_BUCKETS
from discovery_mdc._threads import run_cancellable
from discovery_mdc.card import (
    ModelDeploymentCard,
    ModelEnvelope,
    ModelInput,
    WorkerType,
    encode_envelope,
    endpoint_key,
)
from discovery_mdc.etcd import KeyHandle, LeaseSession, SessionState, Store
from discovery_mdc.etcd import Registration as EtcdRegistration
from discovery_mdc.worker._registry import MetadataRegistry, ModelRef
from discovery_mdc.worker._selfhost import (
    PreparedCard,
    build_worker_card,
    model_ref,
    running_base_url,
)
from discovery_mdc.worker._server import StatusServer

__all__ = ["PublishedModel", "Worker", "parse_instance_transport"]

log = logging.getLogger("discovery_mdc.worker")


@dataclass(frozen=True, slots=True)
class PublishedModel:
    """A card kept registered under the worker's lease (re-published with a new lease)."""

    card: ModelDeploymentCard
    namespace: str
    component: str
    endpoint: str
    handle: KeyHandle
    instance_handle: KeyHandle | None = None
    instance_transport: str | None = None

    @property
    def key(self) -> str | None:
        """The current etcd key (None while the lease is lost)."""
        return self.handle.key

    @property
    def endpoint_id(self) -> tuple[str, str, str]:
        """``(namespace, component, endpoint)``."""
        return self.namespace, self.component, self.endpoint


def parse_instance_transport(uri: str) -> dict[str, Any]:
    """``tcp://host:port[/path]`` -> the Dynamo endpoint record's ``transport`` object."""
    parts = urlsplit(uri)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise ValueError(f"instance transport {uri!r} must look like tcp://host:port[/path]")
    return {"tcp": uri[len("tcp://") :]}


def _card_entry(
    card: ModelDeploymentCard, namespace: str, component: str, endpoint: str, lease_id: int
) -> tuple[str, bytes]:
    """The card's key and envelope under lease ``lease_id``."""
    env = ModelEnvelope(
        namespace=namespace,
        component=component,
        endpoint=endpoint,
        instance_id=lease_id,
        card=card,
        model_suffix=card.lora_slug,
    )
    return env.key, encode_envelope(env)


def _endpoint_entry(
    namespace: str, component: str, endpoint: str, transport: dict[str, Any], lease_id: int
) -> tuple[str, bytes]:
    """The Dynamo endpoint-instance record's key and value under lease ``lease_id``."""
    value = {
        "type": "Endpoint",
        "component": component,
        "endpoint": endpoint,
        "namespace": namespace,
        "instance_id": lease_id,
        "transport": transport,
    }
    key = endpoint_key(namespace, component, endpoint, lease_id)
    return key, json.dumps(value, separators=(",", ":")).encode()


class Worker(AsyncService):
    """Publishes model deployment cards for one worker process.

    ``async with Worker(store, system_port=0) as w: await w.register_model(path)``. The first
    registration grants the lease; leaving the block revokes it (keys vanish at once) and
    stops the status server. :meth:`from_env` takes the settings from Dynamo's variables.

    ``system_port`` None means no status server: cards keep local (or ``hf://``) paths.
    ``startup_timeout``: how long the first lease grant waits for an unreachable etcd.
    ``shutdown_timeout``: the most :meth:`close` takes (revoke, then in-flight downloads).
    ``hf``: where HF repo ids given as models are looked up (None: huggingface_hub's
    variables, read at each registration).
    """

    def __init__(
        self,
        store: Store,
        *,
        lease_ttl: int = DEFAULT_LEASE_TTL,
        system_port: int | None = None,
        system_host: str = DEFAULT_SYSTEM_HOST,
        self_host_metadata: bool = True,
        startup_timeout: float = 0.0,
        shutdown_timeout: float = DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT,
        session: LeaseSession | None = None,
        hf: HfEnv | None = None,
    ) -> None:
        self._store = store
        self._hf = hf
        self.registry = MetadataRegistry()
        # The revoke gets at most 5 s of the shutdown budget; the server drains in the rest.
        revoke_budget = min(5.0, shutdown_timeout)
        self.server = (
            None
            if system_port is None
            else StatusServer(
                system_host,
                system_port,
                registry=self.registry,
                health=self._healthy,
                shutdown_timeout=max(0.0, shutdown_timeout - revoke_budget),
            )
        )
        self.session = session or LeaseSession(
            store, ttl=lease_ttl, startup_timeout=startup_timeout, close_timeout=revoke_budget
        )
        if self.server is not None:
            recreated = Counter(
                "discovery_mdc_etcd_keys_recreated",
                "Keys of this worker found missing from etcd while their lease lived "
                "(deleted by someone else) and created again.",
                registry=self.server.metrics,
            )
            self.session.on_key_recreated = lambda _key: recreated.inc()
        self._self_host = self_host_metadata
        # Exported on the status server's /metrics (without a server there is no /metrics).
        self._registration_seconds = (
            None
            if self.server is None
            else Histogram(
                "discovery_mdc_worker_registration_seconds",
                "from register_model() to its card in etcd (hashing, self-hosting, lease, "
                "put), seconds",
                buckets=SECONDS_BUCKETS,
                registry=self.server.metrics,
            )
        )
        self._published: list[PublishedModel] = []
        self._lease_lock = asyncio.Lock()
        self._publish_lock = asyncio.Lock()

    @classmethod
    def from_env(
        cls, store: Store, *, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> Worker:
        """A worker configured from ``ETCD_LEASE_TTL``, ``DYN_SYSTEM_PORT``,
        ``DYN_SYSTEM_HOST``, ``DYN_SELF_HOST_METADATA``, ``ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS``
        and ``DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT``, and the HF cache from huggingface_hub's
        variables; keyword arguments that are not None win.

        Raises :class:`~discovery_mdc.errors.ConfigError` naming a variable with a bad value.
        """
        settings: dict[str, Any] = {
            "lease_ttl": _env.ETCD_LEASE_TTL.get(env),
            "system_port": _env.SYSTEM_PORT.get(env),
            "system_host": _env.SYSTEM_HOST.get(env),
            "self_host_metadata": _env.SELF_HOST_METADATA.get(env),
            "startup_timeout": float(_env.STARTUP_CONNECT_TIMEOUT.get(env)),
            "shutdown_timeout": float(_env.GRACEFUL_SHUTDOWN_TIMEOUT.get(env)),
            "hf": HfEnv.from_env(env),
        }
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(store, **settings)

    def _healthy(self) -> bool:
        # Ready means discoverable: the lease is live and every card is in etcd under it.
        return (
            self.session.state is SessionState.REGISTERED
            and bool(self._published)
            and all(p.key is not None for p in self._published)
        )

    async def start(self) -> None:
        """Start the status server (if configured). The lease is granted by the first
        :meth:`register_model`, once its card is built, so a bad model dir fails before etcd
        is contacted."""
        if self.server is not None:
            await self.server.start()  # it logs the bound address and the advertised URL

    async def _ensure_lease(self) -> None:
        async with self._lease_lock:
            if self.session.state is SessionState.STARTING:
                await self.session.start()

    async def close(self) -> None:
        """Revoke the lease (every key vanishes at once), then stop the server."""
        try:
            await self.session.close()
        finally:
            if self.server is not None:
                await self.server.close()

    @property
    def published(self) -> tuple[PublishedModel, ...]:
        return tuple(self._published)

    async def register_model(
        self,
        model: str | os.PathLike[str],
        *,
        model_name: str | None = None,
        namespace: str = "dynamo",
        component: str = "backend",
        endpoint: str = "generate",
        custom_template: str | os.PathLike[str] | None = None,
        model_type: tuple[str, ...] = ("Chat", "Completions"),
        model_input: ModelInput = ModelInput.TOKENS,
        worker_type: WorkerType | None = WorkerType.AGGREGATED,
        kv_cache_block_size: int = 16,
        lora_name: str | None = None,
        instance_transport: str | None = None,
        self_host_metadata: bool | None = None,
    ) -> PublishedModel:
        """Build the card for ``model`` (a local dir or a cached HF repo id), self-host its
        files when enabled, and publish it create-if-absent under the lease.

        ``self_host_metadata`` opts this one model in or out of self-hosting, as the
        reference's ``register_model(..., self_host_metadata=False)`` does; ``None`` (the
        default) uses the ``Worker``'s setting. ``instance_transport`` (e.g.
        ``tcp://host:port/path``) also publishes the Dynamo endpoint-instance record on the
        same lease, so a Dynamo frontend routes to it.
        """
        began = time.monotonic()
        if instance_transport is not None:
            parse_instance_transport(instance_transport)  # bad input fails before any work
        endpoint_id = (namespace, component, endpoint)
        prepared = await self._build(
            os.fspath(model),
            endpoint_id,
            self_host=self._self_host if self_host_metadata is None else self_host_metadata,
            display_name=model_name,
            custom_template=custom_template,
            lora_name=lora_name,
            model_type=model_type,
            model_input=model_input,
            worker_type=worker_type,
            kv_cache_block_size=kv_cache_block_size,
        )
        published = await self._publish(prepared, endpoint_id, instance_transport)
        self._registered(published, began)
        return published

    async def _build(
        self, model: str, endpoint_id: tuple[str, str, str], *, self_host: bool, **options: Any
    ) -> PreparedCard:
        """The card to publish and the files to serve for it; registers nothing (a bad model
        dir fails before the status server or etcd is touched)."""
        base_url = running_base_url(self.server)
        namespace, component, endpoint = endpoint_id
        # Hashing a large file can take seconds: cancelling this call (SIGTERM) stops it
        # within one chunk, and nothing waits for the thread.
        return await run_cancellable(
            lambda stop: build_worker_card(
                model,
                base_url=base_url,
                self_host=self_host,
                namespace=namespace,
                component=component,
                endpoint=endpoint,
                cancel=stop,
                hf=self._hf,
                **options,
            ),
            name="build-card",
        )

    async def _publish(
        self,
        prepared: PreparedCard,
        endpoint_id: tuple[str, str, str],
        instance_transport: str | None,
    ) -> PublishedModel:
        """Serve the card's files, then put the endpoint record (if new) and the card under
        the lease. On any failure, undo what this call added and re-raise."""
        card, owner = prepared.card, prepared.owner
        # One lock from the endpoint-record lookup to the last create, so concurrent calls on
        # one endpoint cannot both create its record.
        async with self._publish_lock:
            shared, new_record = self._endpoint_record(endpoint_id, instance_transport)
            added: KeyHandle | None = None
            try:
                prepared.register(self.registry)
                await self._ensure_lease()
                if new_record is not None:
                    added = await self.session.add(new_record)
                handle = await self.session.add(partial(_card_entry, card, *endpoint_id))
            except BaseException:
                if added is not None:
                    try:
                        await self.session.remove(added)
                    except Exception as exc:  # keep the original error; the lease ends it
                        log.warning("could not remove endpoint record %s: %s", added.key, exc)
                # Stop serving files of a card that was never published, unless a
                # published card (same model on the same endpoint) holds them too.
                if not any(self._ref(p) == owner for p in self._published):
                    self.registry.unregister_model(owner)
                raise
            record = shared if shared is not None else added
            published = PublishedModel(card, *endpoint_id, handle, record, instance_transport)
            self._published.append(published)
        return published

    def _endpoint_record(
        self, endpoint_id: tuple[str, str, str], transport: str | None
    ) -> tuple[KeyHandle | None, EtcdRegistration | None]:
        """``(shared, new)``: the endpoint record already published for ``endpoint_id`` that
        a card with ``transport`` shares, or else the record to create (both None without
        ``transport``).

        One endpoint record per endpoint and lease: cards on the same endpoint (a base model
        and its LoRAs) share it, since its key has no model in it. Raises ``ValueError`` if
        it advertises a different transport.
        """
        if transport is None:
            return None, None
        for p in self._published:
            if p.instance_handle is not None and p.endpoint_id == endpoint_id:
                if p.instance_transport != transport:
                    raise ValueError(
                        f"endpoint {'/'.join(endpoint_id)} already advertises transport "
                        f"{p.instance_transport!r}; cannot also advertise {transport!r} "
                        "under the same lease"
                    )
                return p.instance_handle, None
        return None, partial(_endpoint_entry, *endpoint_id, parse_instance_transport(transport))

    def _registered(self, published: PublishedModel, began: float) -> None:
        """Log the registration and time it (once the card is in etcd)."""
        card, key = published.card, published.key
        if key is None:
            log.info(
                "model %r will be registered once etcd grants a new lease (lease %x lost)",
                card.display_name,
                self.session.lease_id,
            )
            return
        if self._registration_seconds is not None:
            self._registration_seconds.observe(time.monotonic() - began)
        log.info(
            "registered model %r at %s (lease %x)",
            card.display_name,
            key,
            self.session.lease_id,
            extra={
                "model": card.display_name,
                "key": key,
                "lease": f"{self.session.lease_id:x}",
                "namespace": published.namespace,
                "endpoint": "/".join(published.endpoint_id),
            },
        )

    @staticmethod
    def _ref(published: PublishedModel) -> ModelRef:
        return model_ref(
            published.card,
            namespace=published.namespace,
            component=published.component,
            endpoint=published.endpoint,
        )

    async def unregister(self, published: PublishedModel) -> None:
        """Delete the card's key (and instance record) and stop serving its files."""
        if published not in self._published:
            return
        # Delete first: if etcd fails, everything stays as it was and the call can be retried.
        await self.session.remove(published.handle)
        record = published.instance_handle
        others = [p for p in self._published if p is not published]
        if record is not None and not any(p.instance_handle is record for p in others):
            await self.session.remove(record)
        self._published.remove(published)
        self.registry.unregister_model(self._ref(published))
        log.info(
            "unregistered model %r",
            published.card.display_name,
            extra={"model": published.card.display_name, "namespace": published.namespace},
        )
