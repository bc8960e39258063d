"""The HTTP API of a model server that holds many LoRA versions of one base (`adapters`).

Each version speaks the same OpenAI API as a server of its own, under its own prefix, so the
gateway reaches it at ``<server>/adapters/<version>`` exactly as it reaches a version's own server
(its upstream URL plus ``/v1/...``; the answers carry ``x-kubetune-version`` and the
kubetune_serving_* series are labelled with the version)::

    POST   /adapters/<version>/v1/completions        the OpenAI API of one version
    POST   /adapters/<version>/v1/chat/completions
    GET    /adapters/<version>/v1/models
    GET    /adapters/<version>/readyz                200 once the version is loaded (the gateway's probe
                                                     of a version waking from zero), else 503
    GET    /adapters                                 {"baseModel", "adapters": [versions]}
    PUT    /adapters/<version>   {"modelDir": DIR}   load (or replace) a version's adapter
    DELETE /adapters/<version>                       unload it

Loading and unloading happen while the other versions serve on; an unknown version is a 404.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kubetune_components.common.errors import ComponentError
from kubetune_components.serving.adapters import SharedAdapters
from kubetune_components.serving.openai_api import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    MODELS,
    OpenAIApp,
    RuntimeSlot,
    ServingIdentity,
    _json_body,
)
from kubetune_components.serving.openai_requests import ApiError

logger = logging.getLogger(__name__)

ADAPTERS_PATH = "/adapters"


def version_url(server_url: str, version: str) -> str:
    """Where the gateway reaches `version` on a shared server at `server_url`."""
    return f"{server_url.rstrip('/')}{ADAPTERS_PATH}/{version}"


class SharedSlot:
    """The shared model of the app, set once the base and the first adapters have loaded."""

    def __init__(self, deployment: str, model_id: str) -> None:
        self.deployment = deployment
        self.model_id = model_id
        self.shared: SharedAdapters | None = None
        self.error: str | None = None
        self._apps: dict[str, OpenAIApp] = {}

    @property
    def ready(self) -> bool:
        return self.shared is not None

    def set_shared(self, shared: SharedAdapters) -> None:
        self.shared = shared
        self.error = None

    def set_error(self, message: str) -> None:
        self.error = message

    def require(self) -> SharedAdapters:
        if self.shared is not None:
            return self.shared
        if self.error is not None:
            raise ApiError(503, f"this model server cannot serve: {self.error}", code="model_unavailable")
        raise ApiError(503, "the base model is still loading; retry shortly", code="model_not_ready")

    def app_of(self, version: str) -> OpenAIApp:
        """The OpenAI API of a loaded version (404 for any other)."""
        shared = self.require()
        runtime = shared.runtime(version)
        if runtime is None:
            raise ApiError(
                404,
                f"version {version!r} is not loaded on this server (loaded: "
                f"{', '.join(shared.versions) or 'none'})",
                code="model_not_found",
            )
        app = self._apps.get(version)
        if app is None or app.slot.runtime is not runtime:
            slot = RuntimeSlot(ServingIdentity(self.deployment, version, self.model_id))
            slot.set_runtime(runtime)
            app = OpenAIApp(slot)
            self._apps[version] = app
        return app


def create_shared_app(slot: SharedSlot) -> Starlette:
    """The API of a shared adapter server; `slot` receives the shared model once it has loaded."""

    def per_version(
        handler: Callable[[OpenAIApp, Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                app = slot.app_of(request.path_params["version"])
            except ApiError as error:
                return error.response()
            return await handler(app, request)

        return endpoint

    async def list_adapters(request: Request) -> Response:
        shared = slot.shared
        body: dict[str, Any] = {
            "baseModel": shared.base_uri if shared is not None else None,
            "adapters": shared.versions if shared is not None else [],
            "ready": slot.ready,
        }
        return JSONResponse(body)

    async def put_adapter(request: Request) -> Response:
        version = request.path_params["version"]
        try:
            shared = slot.require()
            body = await _json_body(request)
            model_dir = body.get("modelDir")
            if not isinstance(model_dir, str) or not model_dir:
                raise ApiError(400, "modelDir must be the adapter's directory", param="modelDir")
            await asyncio.to_thread(shared.add, version, model_dir)
        except ApiError as error:
            return error.response()
        except ComponentError as error:
            return ApiError(400, error.message, param="modelDir", code="invalid_adapter").response()
        return JSONResponse({"loaded": version, "adapters": shared.versions})

    async def delete_adapter(request: Request) -> Response:
        version = request.path_params["version"]
        try:
            shared = slot.require()
        except ApiError as error:
            return error.response()
        if not await asyncio.to_thread(shared.remove, version):
            return ApiError(404, f"version {version!r} is not loaded", code="model_not_found").response()
        return JSONResponse({"unloaded": version, "adapters": shared.versions})

    async def version_ready(request: Request) -> Response:
        shared = slot.shared
        loaded = shared is not None and shared.runtime(request.path_params["version"]) is not None
        return Response(status_code=200 if loaded else 503)

    async def unknown_path(request: Request) -> Response:
        method, path = request.method, request.url.path
        loaded = ", ".join(slot.shared.versions) if slot.shared is not None else "none"
        return ApiError(
            404,
            f"Invalid URL ({method} {path}); this server holds several versions, each under "
            f"{ADAPTERS_PATH}/<version>/v1/... (loaded: {loaded})",
            code="not_found",
        ).response()

    prefix = ADAPTERS_PATH + "/{version}"
    routes = [
        Route(prefix + COMPLETIONS, per_version(lambda app, r: app.completions(r)), methods=["POST"]),
        Route(
            prefix + CHAT_COMPLETIONS, per_version(lambda app, r: app.chat_completions(r)), methods=["POST"]
        ),
        Route(prefix + MODELS, per_version(lambda app, r: app.models(r)), methods=["GET"]),
        Route(ADAPTERS_PATH, list_adapters, methods=["GET"]),
        Route(prefix + "/readyz", version_ready, methods=["GET"]),
        Route(prefix, put_adapter, methods=["PUT"]),
        Route(prefix, delete_adapter, methods=["DELETE"]),
        # Mounted in BentoML, only paths that match a route reach this app: catch the rest of /v1 here.
        *(
            Route(path, unknown_path, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
            for path in ("/v1/{rest:path}", prefix + "/v1/{rest:path}")
        ),
    ]
    app = Starlette(routes=routes)
    app.state.slot = slot
    return app
