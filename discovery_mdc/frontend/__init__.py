"""The frontend half: watch cards, admit worker sets by mdcsum, verify-and-cache, serve."""

from discovery_mdc.frontend._http import build_app, model_details, models_list
from discovery_mdc.frontend._metrics import FrontendMetrics
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
