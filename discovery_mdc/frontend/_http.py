"""The frontend's HTTP API: ``/v1/models``, ``/v1/models/{id}``, ``/v1/models/{id}/ready``,
``/health``, ``/live``, ``/metrics``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from discovery_mdc._metrics import metrics_response
from discovery_mdc.frontend._state import ModelInfo, ModelStats, RejectedInstance, diff_json
from discovery_mdc.frontend._watcher import ModelWatcher

__all__ = ["build_app", "model_details", "model_not_found", "models_list", "readiness"]

OWNED_BY = "discovery-mdc"


def _model_entry(m: ModelInfo) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": m.name,
        "object": "model",
        "created": m.created,
        "owned_by": OWNED_BY,
    }
    if m.context_window is not None:
        entry["context_window"] = m.context_window
    return entry


def models_list(models: list[ModelInfo]) -> dict[str, Any]:
    """The OpenAI list shape, plus ``context_window`` as Dynamo adds it."""
    return {"object": "list", "data": [_model_entry(m) for m in models]}


def _rejected(r: RejectedInstance) -> dict[str, Any]:
    return {
        "key": r.key,
        "mdcsum": r.mdcsum,
        "worker_set": r.worker_set,
        "worker_set_mdcsum": r.worker_set_mdcsum,
        "reason": r.reason,
        "diff": diff_json(r.diff),
    }


def model_details(m: ModelInfo) -> dict[str, Any]:
    """One model: its worker sets, and the instances the mdcsum gate rejected, with why."""
    return {
        **_model_entry(m),
        "worker_sets": [
            {
                "key": ws.key,
                "mdcsum": ws.mdcsum,
                "ready": ws.ready,
                "local_dir": str(ws.local_dir) if ws.local_dir else None,
                "instances": list(ws.instances),
                "files": list(ws.files),
            }
            for ws in m.worker_sets
        ],
        "rejected_instances": [_rejected(r) for r in m.rejected],
    }


def model_not_found(name: str) -> dict[str, Any]:
    """OpenAI's 404 body for an unknown model."""
    return {
        "error": {
            "message": f"The model {name!r} does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def readiness(name: str, stats: ModelStats | None, info: ModelInfo | None) -> dict[str, Any]:
    """``{"model": ..., "ready": bool, "namespaces": {ns: {"worker_types": {type:
    {"workers": n}}}}, ...}``, the shape of Dynamo's per-model readiness."""
    if stats is None:
        # The shape of a known model's answer, so a probe parses one kind of body.
        return {"model": name, "ready": False, "status": "unknown", "instances": 0,
                "ready_instances": 0, "rejected_instances": 0, "namespaces": {}}  # fmt: skip
    namespaces: dict[str, Any] = {}
    for ws in info.worker_sets if info is not None else ():
        if ws.ready:
            # The worker-set key is "{namespace}:{model_type}:{worker_type}".
            namespace, worker_type = ws.key.split(":")[0], ws.key.split(":")[-1]
            types = namespaces.setdefault(namespace, {"worker_types": {}})["worker_types"]
            entry = types.setdefault(worker_type, {"workers": 0})
            entry["workers"] += len(ws.instances)
    return {
        "model": name,
        "ready": stats.ready,
        "status": "ready" if stats.ready else "not_ready",
        "instances": stats.instances,
        "ready_instances": stats.ready_instances,
        "rejected_instances": stats.rejected,
        "namespaces": namespaces,
    }


def build_app(watcher: ModelWatcher) -> web.Application:
    async def list_models(_: web.Request) -> web.Response:
        return web.json_response(models_list(watcher.models()))

    async def get_model(request: web.Request) -> web.Response:
        name = request.match_info["id"]
        info = watcher.model(name)
        if info is None:
            return web.json_response(model_not_found(name), status=404)
        return web.json_response(model_details(info))

    async def model_ready(request: web.Request) -> web.Response:
        name = request.match_info["id"]
        stats = next((s for s in watcher.model_stats() if s.name == name), None)
        body = readiness(name, stats, watcher.model(name))
        return web.json_response(body, status=200 if body["ready"] else 503)

    async def health(_: web.Request) -> web.Response:
        body = {
            "status": "ready" if watcher.connected else "notready",
            "watch_connected": watcher.connected,
            "revision": watcher.revision,
            "models": len(watcher.models()),
        }
        return web.json_response(body, status=200 if watcher.connected else 503)

    async def live(_: web.Request) -> web.Response:
        # Liveness follows this process only: an etcd outage must not get the fleet restarted.
        return web.json_response({"status": "live"})

    async def metrics(_: web.Request) -> web.Response:
        return metrics_response(watcher.metrics.registry)

    app = web.Application()
    app.router.add_get("/v1/models", list_models)
    # Registered first: /v1/models/Qwen/Qwen3-0.6B/ready asks about Qwen/Qwen3-0.6B.
    app.router.add_get("/v1/models/{id:.+}/ready", model_ready)
    app.router.add_get("/v1/models/{id:.+}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/live", live)
    app.router.add_get("/metrics", metrics)
    return app
