"""The worker half: status server, one lease, and the cards published under it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from discovery_mdc.card import (
    ModelDeploymentCard,
    ModelEnvelope,
    ModelInput,
    WorkerType,
    card_key,
    encode_envelope,
    endpoint_key,
)
from discovery_mdc.etcd import KeyHandle, LeaseSession, SessionState, Store
from discovery_mdc.worker._registry import MetadataRegistry
from discovery_mdc.worker._selfhost import build_worker_card, model_ref
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

    @property
    def key(self) -> str | None:
        """The current etcd key (None while the lease is lost)."""
        return self.handle.key


def parse_instance_transport(uri: str) -> dict[str, Any]:
    """``tcp://host:port[/path]`` -> the Dynamo endpoint record's ``transport`` object."""
    parts = urlsplit(uri)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise ValueError(f"instance transport {uri!r} must look like tcp://host:port[/path]")
    return {"tcp": uri[len("tcp://") :]}


class Worker:
    """Publishes model deployment cards for one worker process.

    ``async with Worker(store, system_port=0) as w: await w.register_model(path)``. Leaving the
    block revokes the lease (keys vanish at once) and stops the status server.
    ``system_port``/``system_host`` default to ``DYN_SYSTEM_PORT``/``DYN_SYSTEM_HOST``; with
    neither there is no status server and cards keep local (or ``hf://``) paths.
    """

    def __init__(
        self,
        store: Store,
        *,
        lease_ttl: int | None = None,
        system_port: int | None = None,
        system_host: str | None = None,
        self_host_metadata: bool | None = None,
        session: LeaseSession | None = None,
    ) -> None:
        self._store = store
        self.registry = MetadataRegistry()
        self.server = StatusServer.from_env(
            registry=self.registry, health=self._healthy, port=system_port, host=system_host
        )
        self.session = session or LeaseSession(store, ttl=lease_ttl)
        self._self_host = self_host_metadata
        self._published: list[PublishedModel] = []

    def _healthy(self) -> bool:
        return self.session.state is SessionState.REGISTERED

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the status server (if configured) and grant the lease."""
        if self.server is not None:
            await self.server.start()
            log.info(
                "status server on %s:%d, advertising %s",
                self.server.host,
                self.server.port,
                self.server.base_url,
            )
        try:
            await self.session.start()
        except BaseException:
            if self.server is not None:
                await self.server.stop()
            raise

    async def close(self) -> None:
        """Revoke the lease (every key vanishes at once), then stop the server."""
        await self.session.close()
        if self.server is not None:
            await self.server.stop()

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
    ) -> PublishedModel:
        """Build the card for ``model`` (a local dir or a cached HF repo id), self-host its
        files when enabled, and publish it create-if-absent under the lease.

        ``instance_transport`` (e.g. ``tcp://host:port/path``) also publishes the Dynamo
        endpoint-instance record on the same lease, so a Dynamo frontend routes to it.
        """
        server = self.server if self.server is not None and self.server.is_running else None
        card = await asyncio.to_thread(
            build_worker_card,
            os.fspath(model),
            server=server,
            self_host=self._self_host,
            namespace=namespace,
            component=component,
            endpoint=endpoint,
            display_name=model_name,
            custom_template=custom_template,
            lora_name=lora_name,
            model_type=model_type,
            model_input=model_input,
            worker_type=worker_type,
            kv_cache_block_size=kv_cache_block_size,
        )
        suffix = card.lora_slug

        def registration(lease_id: int) -> tuple[str, bytes]:
            env = ModelEnvelope(
                namespace=namespace,
                component=component,
                endpoint=endpoint,
                instance_id=lease_id,
                card=card,
                model_suffix=suffix,
            )
            return card_key(namespace, component, endpoint, lease_id, suffix), encode_envelope(env)

        instance_handle = None
        if instance_transport is not None:
            transport = parse_instance_transport(instance_transport)

            def instance_record(lease_id: int) -> tuple[str, bytes]:
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

            instance_handle = await self.session.add(instance_record)
        try:
            handle = await self.session.add(registration)
        except BaseException:
            if instance_handle is not None:
                await self.session.remove(instance_handle)
            raise
        published = PublishedModel(card, namespace, component, endpoint, handle, instance_handle)
        self._published.append(published)
        log.info(
            "registered model %r at %s (lease %x)",
            card.display_name,
            handle.key,
            self.session.lease_id,
        )
        return published

    async def unregister(self, published: PublishedModel) -> None:
        """Delete the card's key (and instance record) and stop serving its files."""
        if published not in self._published:
            return
        self._published.remove(published)
        await self.session.remove(published.handle)
        if published.instance_handle is not None:
            await self.session.remove(published.instance_handle)
        self.registry.unregister_model(
            model_ref(
                published.card,
                namespace=published.namespace,
                component=published.component,
                endpoint=published.endpoint,
            )
        )
        log.info("unregistered model %r", published.card.display_name)
