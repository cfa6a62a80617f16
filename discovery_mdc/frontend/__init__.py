"""The frontend half: watch cards, admit worker sets by mdcsum, verify-and-cache, serve.

The registry (``Registry`` and its types) is plain code and imported at once; the asyncio
driver, the HTTP API and the metrics (aiohttp, prometheus_client) are imported on first use,
so the pure half can be used without them.
"""

from __future__ import annotations

import typing

from discovery_mdc._lazy import lazy_attributes as _lazy_attributes
from discovery_mdc.frontend._prepare import check_json_files
from discovery_mdc.frontend._state import (
    EventKind,
    ModelEvent,
    ModelInfo,
    ModelStats,
    NamespaceFilter,
    Registry,
    RejectedInstance,
    WorkerSetInfo,
    diff_json,
    model_id,
    worker_set_key,
)

if typing.TYPE_CHECKING:
    from discovery_mdc.frontend._http import build_app, model_details, models_list
    from discovery_mdc.frontend._metrics import FrontendMetrics
    from discovery_mdc.frontend._watcher import ModelWatcher, PrepareHook, Resolver

__all__ = [
    "EventKind",
    "FrontendMetrics",
    "ModelEvent",
    "ModelInfo",
    "ModelStats",
    "ModelWatcher",
    "NamespaceFilter",
    "PrepareHook",
    "Registry",
    "RejectedInstance",
    "Resolver",
    "WorkerSetInfo",
    "build_app",
    "check_json_files",
    "diff_json",
    "model_details",
    "model_id",
    "models_list",
    "worker_set_key",
]

__getattr__, __dir__ = _lazy_attributes(
    globals(),
    {
        "build_app": "discovery_mdc.frontend._http",
        "model_details": "discovery_mdc.frontend._http",
        "models_list": "discovery_mdc.frontend._http",
        "FrontendMetrics": "discovery_mdc.frontend._metrics",
        "ModelWatcher": "discovery_mdc.frontend._watcher",
        "PrepareHook": "discovery_mdc.frontend._watcher",
        "Resolver": "discovery_mdc.frontend._watcher",
    },
)
