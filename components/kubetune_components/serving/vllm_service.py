"""The BentoML service of a version served by vLLM's engine (``spec.serving.engine: vllm``, GPU only).

    KUBETUNE_MODEL_DIR=/models/router/v3 KUBETUNE_DEPLOYMENT=support-bot KUBETUNE_VERSION=tuned \\
        bentoml serve kubetune_components.serving.vllm_service:VLLMService --port 3001

or from a Bento built with ``bento build --engine vllm``. It follows BentoML's vLLM pattern (BentoVLLM):
vLLM's OpenAI endpoints (``vllm.entrypoints.openai.api_server``: create_chat_completion,
create_completion, show_available_models) on a FastAPI app whose state ``init_app_state`` fills
with the engine client of ``build_async_engine_client``, the engine's arguments parsed by vLLM's
own parser (:func:`vllm_engine.engine_cli_args`). vllm is imported when the engine starts, never at
import: this module imports (and a Bento builds) where vllm is not installed.

In front of vLLM's app sits :class:`EngineFront`, which speaks to the gateway as the transformers
engine does: ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``, or on a server of
several LoRA versions (KUBETUNE_ADAPTERS) ``/adapters/<version>/v1/...``; the request's ``model`` is
replaced by the version's LoRA name, answers carry ``x-kubetune-version``, streams pass through
unbuffered, errors are OpenAI error objects. The engine starts on a background task: /livez
answers at once (and fails once the engine has failed or died), /readyz once vLLM answers.
vLLM's own Prometheus series are not exposed; BentoML's /metrics (requests in progress, the HPA's
metric) is.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
from argparse import Namespace
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml

from kubetune_components.common.errors import ComponentError
from kubetune_components.serving import vllm_engine
from kubetune_components.serving.openai_api import VERSION_HEADER
from kubetune_components.serving.service import GENERATION_TIMEOUT_S, resolve_model

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class EngineSlot:
    """vLLM's app once the engine runs, or why it does not."""

    def __init__(self) -> None:
        self.version = "unknown"
        self.plan: vllm_engine.EnginePlan | None = None
        self.app: ASGIApp | None = None
        self.engine: Any = None
        self.error: str | None = None

    def set_error(self, message: str) -> None:
        self.error = message


async def _error(send: Send, status: int, message: str, code: str) -> None:
    error_type = "invalid_request_error" if status < 500 else "server_error"
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class EngineFront:
    """The gateway's API on vLLM's app (see the module docstring)."""

    def __init__(self, slot: EngineSlot) -> None:
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        routed = vllm_engine.route(scope["path"])
        if routed is None:
            await _error(send, 404, f"Invalid URL ({scope['method']} {scope['path']})", "not_found")
            return
        slot = self.slot
        if slot.app is None or slot.plan is None:
            if slot.error is not None:
                await _error(send, 503, f"this model server cannot serve: {slot.error}", "model_unavailable")
            else:
                await _error(send, 503, "vLLM's engine is still starting; retry shortly", "model_not_ready")
            return
        version, path = routed
        try:
            model = slot.plan.model_for(version)
        except vllm_engine.VersionNotLoaded as error:
            await _error(send, 404, error.message, "model_not_found")
            return
        headers = [(key, value) for key, value in scope["headers"] if key.lower() != b"content-length"]
        if scope["method"] == "POST":
            try:
                body = vllm_engine.rewrite_body(await _read_body(receive), model)
            except ComponentError as error:
                await _error(send, 400, error.message, "invalid_request")
                return
            headers.append((b"content-length", str(len(body)).encode()))
            receive = _replay(body, receive)
        inner = {**scope, "path": path, "raw_path": path.encode(), "headers": headers}
        await slot.app(inner, receive, _with_version_header(send, version or slot.version))


def _replay(body: bytes, receive: Receive) -> Receive:
    """The rewritten body first; then the client's own messages (its disconnect ends a stream)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _with_version_header(send: Send, version: str) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {
                **message,
                "headers": [*message.get("headers", []), (VERSION_HEADER.encode(), version.encode())],
            }
        await send(message)

    return sending


def _vllm_args(cli_args: list[str]) -> Namespace:
    """vLLM's OpenAI server arguments, parsed by its own parser (its module moved across releases)."""
    from vllm.entrypoints.openai.cli_args import make_arg_parser

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser  # type: ignore[attr-defined,no-redef]
    parser = make_arg_parser(FlexibleArgumentParser())
    parsed: Namespace = parser.parse_args(cli_args)
    return parsed


slot = EngineSlot()
app = EngineFront(slot)


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="kubetune-vllm", workers=1, traffic={"timeout": GENERATION_TIMEOUT_S})
class VLLMService:
    """An OpenAI-compatible endpoint for one version (or one base's LoRA versions) on vLLM."""

    def __init__(self) -> None:
        self.stack = contextlib.AsyncExitStack()
        self.cli_args: list[str] | None = None
        try:
            model_dir, settings = resolve_model()
            slot.version = settings.version
            slot.plan = _plan(model_dir, settings.version, dict(os.environ))
            self.cli_args = vllm_engine.engine_cli_args(slot.plan, vllm_engine.options_from_env(os.environ))
        except ComponentError as error:
            logger.error("cannot serve: %s", error.message)
            slot.set_error(error.message)

    @bentoml.on_startup
    async def start_engine(self) -> None:
        if self.cli_args is not None:
            self.starting = asyncio.get_running_loop().create_task(self._start(self.cli_args))

    async def _start(self, cli_args: list[str]) -> None:
        logger.info("starting vLLM: %s", " ".join(cli_args))
        try:
            import fastapi
            import vllm.entrypoints.openai.api_server as vllm_api_server

            args = _vllm_args(cli_args)
            engine = await self.stack.enter_async_context(vllm_api_server.build_async_engine_client(args))
            engine_app = fastapi.FastAPI()
            router = fastapi.APIRouter()
            for path, endpoint, methods in (
                ("/v1/chat/completions", vllm_api_server.create_chat_completion, ["POST"]),
                ("/v1/completions", vllm_api_server.create_completion, ["POST"]),
                ("/v1/models", vllm_api_server.show_available_models, ["GET"]),
            ):
                router.add_api_route(path=path, endpoint=endpoint, methods=methods)
            engine_app.include_router(router)
            # init_app_state(engine, vllm_config, state, args) until vLLM 0.11; (engine, state, args) since
            if len(inspect.signature(vllm_api_server.init_app_state).parameters) == 4:
                config = await engine.get_vllm_config()
                await vllm_api_server.init_app_state(engine, config, engine_app.state, args)
            else:
                await vllm_api_server.init_app_state(engine, engine_app.state, args)
        except Exception as error:
            logger.exception("vLLM's engine did not start")
            slot.set_error(f"vLLM's engine did not start: {type(error).__name__}: {error}")
            return
        slot.engine, slot.app = engine, engine_app
        logger.info("vLLM serves %s", slot.plan)

    async def __is_ready__(self) -> bool:
        return slot.app is not None and await self._healthy()

    async def __is_alive__(self) -> bool:
        return slot.error is None and (slot.engine is None or await self._healthy())

    async def _healthy(self) -> bool:
        try:
            await slot.engine.check_health()
        except Exception as error:
            slot.set_error(f"vLLM's engine died: {type(error).__name__}: {error}")
            return False
        return True

    @bentoml.on_shutdown
    async def stop_engine(self) -> None:
        await self.stack.aclose()


def _plan(model_dir: Path, version: str, env: dict[str, str]) -> vllm_engine.EnginePlan:
    """The engine plan of the model being served (artifacts imports torch: read here, not at import)."""
    from kubetune_components.serving.artifacts import inspect_model_dir, quantization_format

    artifact = inspect_model_dir(model_dir)
    return vllm_engine.plan_engine(
        model_dir,
        version,
        vllm_engine.adapters_from_env(env),
        kind=artifact.kind,
        base_uri=artifact.base_uri,
        quantization_format=quantization_format(artifact),
    )
