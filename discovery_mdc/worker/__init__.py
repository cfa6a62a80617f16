"""The worker half: build a card, self-host its files, publish it under a kept-alive lease."""

from discovery_mdc.worker._advertise import advertise_host, format_host_for_url, is_wildcard_host
from discovery_mdc.worker._publisher import PublishedModel, Worker, parse_instance_transport
from discovery_mdc.worker._registry import MetadataRegistry, ModelRef, RegisteredFile
from discovery_mdc.worker._selfhost import (
    PreparedCard,
    build_worker_card,
    move_to_self_host,
    prepare_card,
)
from discovery_mdc.worker._server import StatusServer
from discovery_mdc.worker._source import ModelSource, resolve_model_source

__all__ = [
    "MetadataRegistry",
    "ModelRef",
    "ModelSource",
    "PreparedCard",
    "PublishedModel",
    "RegisteredFile",
    "StatusServer",
    "Worker",
    "advertise_host",
    "build_worker_card",
    "format_host_for_url",
    "is_wildcard_host",
    "move_to_self_host",
    "parse_instance_transport",
    "prepare_card",
    "resolve_model_source",
]
