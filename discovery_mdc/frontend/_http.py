"""The frontend's HTTP API: ``/v1/models``, ``/v1/models/{id}``, ``/health``, ``/metrics``."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from discovery_mdc.frontend._state import ModelInfo
from discovery_mdc.frontend._watcher import ModelWatcher

__all__ = ["build_app", "model_details", "models_list"]

OWNED_BY = "discovery-mdc"


def models_list(models: list[ModelInfo]) -> dict[str, Any]:
    """The OpenAI list shape."""
    return {
        "object": "list",
        "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": OWNED_BY}
            for m in models
        ],
    }


def model_details(m: ModelInfo) -> dict[str, Any]:
    return {
        "id": m.name,
        "object": "model",
        "created": m.created,
        "owned_by": OWNED_BY,
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
    }


def build_app(watcher: ModelWatcher) -> web.Application:
    async def list_models(_: web.Request) -> web.Response:
        return web.json_response(models_list(watcher.models()))

    async def get_model(request: web.Request) -> web.Response:
        name = request.match_info["id"]
        info = watcher.model(name)
        if info is None:
            return web.json_response(
                {"error": {"message": f"model {name!r} not found", "type": "not_found"}},
                status=404,
            )
        return web.json_response(model_details(info))

    async def health(_: web.Request) -> web.Response:
        body = {
            "status": "ready" if watcher.connected else "notready",
            "watch_connected": watcher.connected,
            "revision": watcher.revision,
            "models": len(watcher.models()),
        }
        return web.json_response(body, status=200 if watcher.connected else 503)

    async def metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=watcher.metrics.render())
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{id:.+}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/live", health)
    app.router.add_get("/metrics", metrics)
    return app
