"""The OpenAI-compatible HTTP API of one model version, as a Starlette ASGI app.

    POST /v1/completions         {"prompt": "...", ...}              -> text_completion
    POST /v1/chat/completions    {"messages": [...], ...}            -> chat.completion
    GET  /v1/models                                                  -> the one model served

`stream: true` answers with server-sent events: `data: {chunk}` lines, then `data: [DONE]`.
Errors are OpenAI error objects, `{"error": {"message", "type", "param", "code"}}`: 400 for a
bad request (naming the field), 404 for unknown paths, 405 for a wrong method, 503 while the
model is loading, 500 when generation fails.

Requests are validated with the OpenAI protocol models shared with the gateway, and what this
server cannot honour is refused (`openai_requests`). `model` is not checked against the served
model's id: the gateway in front of the versions routes by model. A prompt that
was truncated to fit the context window is answered with the header
`x-kubetune-prompt-tokens-dropped: N`.

`response_format` and `tools` are honoured by constrained decoding (`openai_requests`,
`constrained`). A reply that calls a tool comes back as OpenAI's `tool_calls` with finish_reason
`tool_calls`; streamed, the call is sent whole in one chunk once it is complete, while a text
reply streams as it is generated. With kubetune's `kubetune_hidden_reasoning: {"open", "close"}`
(sent by the gateway for a prompt with hidden reasoning) nothing between the markers is returned,
and usage says how many of the completion tokens were reasoning
(`completion_tokens_details.reasoning_tokens`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kubetune_components.serving.config import UNKNOWN
from kubetune_components.serving.metrics import serving_metrics
from kubetune_components.serving.openai_requests import (
    ApiError,
    ToolUse,
    chat_messages,
    completion_prompt,
    parse_generation_request,
)
from kubetune_components.serving.requests import Completion, PreparedPrompt, RequestError, SamplingParams
from kubetune_components.serving.runtime import ModelRuntime
from kubetune_contract.openai import ChatCompletionRequest, json_type

logger = logging.getLogger(__name__)

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
MODELS = "/v1/models"
ROUTES = {COMPLETIONS: "POST", CHAT_COMPLETIONS: "POST", MODELS: "GET"}
DROPPED_TOKENS_HEADER = "x-kubetune-prompt-tokens-dropped"
VERSION_HEADER = "x-kubetune-version"
CLIENT_CLOSED_REQUEST = 499
"""The code counted for a request or stream whose client went away before it ended (nginx's
convention); its generation is cancelled."""


# --------------------------------------------------------------------------------------------------
# Where the runtime comes from.


@dataclass(frozen=True)
class ServingIdentity:
    deployment: str
    version: str
    model_id: str


class RuntimeSlot:
    """The runtime of the app, set once the model has loaded (requests get 503 until then)."""

    def __init__(self, identity: ServingIdentity | None = None) -> None:
        self.identity = identity or ServingIdentity(UNKNOWN, UNKNOWN, UNKNOWN)
        self.runtime: ModelRuntime | None = None
        self.error: str | None = None
        self.created = int(time.time())

    @property
    def ready(self) -> bool:
        return self.runtime is not None

    def set_runtime(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self.error = None

    def set_error(self, message: str) -> None:
        self.error = message

    def require(self) -> ModelRuntime:
        if self.runtime is not None:
            return self.runtime
        if self.error is not None:
            raise ApiError(503, f"this model server cannot serve: {self.error}", code="model_unavailable")
        raise ApiError(503, "the model is still loading; retry shortly", code="model_not_ready")


# --------------------------------------------------------------------------------------------------
# Responses.


def _usage(completion: Completion, params: SamplingParams) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }
    if params.hidden_reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": completion.reasoning_tokens}
    return usage


def _sse(payload: Mapping[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class OpenAIApp:
    """Handlers of the API; `create_app` wraps them in Starlette."""

    def __init__(self, slot: RuntimeSlot) -> None:
        self.slot = slot

    # -- metrics ------------------------------------------------------------------------------------

    def _observe(
        self, endpoint: str, code: int, started: float, completion: Completion | None = None
    ) -> None:
        identity = self.slot.identity
        metrics = serving_metrics()
        metrics.observe_request(
            identity.deployment, identity.version, endpoint, code, time.perf_counter() - started
        )
        if completion is not None:
            metrics.count_tokens(
                identity.deployment, identity.version, completion.prompt_tokens, completion.completion_tokens
            )
            if completion.first_token_at is not None:
                metrics.observe_first_token(
                    identity.deployment, identity.version, max(0.0, completion.first_token_at - started)
                )

    def _headers(self, prompt: PreparedPrompt | None = None) -> dict[str, str]:
        headers = {VERSION_HEADER: self.slot.identity.version}
        if prompt is not None and prompt.truncated:
            headers[DROPPED_TOKENS_HEADER] = str(prompt.original_tokens - len(prompt.token_ids))
        return headers

    # -- endpoints ----------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        started = time.perf_counter()
        identity = self.slot.identity
        model: dict[str, Any] = {
            "id": identity.model_id,
            "object": "model",
            "created": self.slot.created,
            "owned_by": "kubetune",
            "kubetune": {
                "deployment": identity.deployment,
                "version": identity.version,
                "ready": self.slot.ready,
            },
        }
        self._observe(MODELS, 200, started)
        return JSONResponse({"object": "list", "data": [model]}, headers=self._headers())

    async def completions(self, request: Request) -> Response:
        return await self._generation(request, COMPLETIONS, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generation(request, CHAT_COMPLETIONS, chat=True)

    async def _generation(self, request: Request, endpoint: str, *, chat: bool) -> Response:
        started = time.perf_counter()
        try:
            asked = parse_generation_request(await _json_body(request), chat=chat)
            params = asked.params
            runtime = self.slot.require()
            if isinstance(asked.request, ChatCompletionRequest):
                prompt = runtime.prepare_chat(chat_messages(asked.request, asked.tool_use))
            else:
                prompt = runtime.prepare_completion(completion_prompt(asked.request))
            if asked.stream:
                return self._stream(
                    runtime, prompt, params, endpoint, started, chat, asked.include_usage, asked.tool_use
                )
            completion = await _generate_while_connected(request, runtime, prompt, params)
            if completion is None:
                self._observe(endpoint, CLIENT_CLOSED_REQUEST, started)
                return Response(status_code=CLIENT_CLOSED_REQUEST)
        except (ApiError, RequestError) as error:
            api_error = (
                error
                if isinstance(error, ApiError)
                else ApiError(400, error.message, param=error.param, code=error.code)
            )
            self._observe(endpoint, api_error.status, started)
            return api_error.response()
        except Exception as error:
            logger.exception("%s failed", endpoint)
            self._observe(endpoint, 500, started)
            return ApiError(500, f"generation failed: {type(error).__name__}: {error}").response()
        self._observe(endpoint, 200, started, completion)
        return JSONResponse(
            self._body(completion, chat, asked.tool_use, params), headers=self._headers(prompt)
        )

    def _body(
        self, completion: Completion, chat: bool, tool_use: ToolUse, params: SamplingParams
    ) -> dict[str, Any]:
        model_id = self.slot.identity.model_id
        created = int(time.time())
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": completion.text}
            finish_reason: str = completion.finish_reason
            call = tool_use.read_call(completion.text)
            if call is not None:
                message = {"role": "assistant", "content": None, "tool_calls": [call.as_openai()]}
                finish_reason = "tool_calls"
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": created,
                "model": model_id,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
                ],
                "usage": _usage(completion, params),
            }
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": created,
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "text": completion.text,
                    "logprobs": None,
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": _usage(completion, params),
        }

    def _stream(
        self,
        runtime: ModelRuntime,
        prompt: PreparedPrompt,
        params: SamplingParams,
        endpoint: str,
        started: float,
        chat: bool,
        include_usage: bool,
        tool_use: ToolUse,
    ) -> StreamingResponse:
        text_stream = runtime.astream(prompt, params)  # refuses what cannot run before the 200 goes out
        model_id = self.slot.identity.model_id
        completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(
            text: str | None,
            finish_reason: str | None = None,
            role: bool = False,
            tool_calls: list[dict[str, Any]] | None = None,
        ) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text is not None:
                    delta["content"] = text
                if tool_calls is not None:
                    delta["tool_calls"] = tool_calls
                choice["delta"] = delta
            else:
                choice["text"] = text or ""
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": model_id,
                "choices": [choice],
            }
            if include_usage:
                payload["usage"] = None
            return payload

        async def events() -> AsyncIterator[str]:
            completion: Completion | None = None
            code = CLIENT_CLOSED_REQUEST  # unless the stream runs to its end
            try:
                if chat:
                    yield _sse(chunk(None, role=True))
                held = ""  # a reply that may be a tool call is held until it is known (or complete)
                is_call = tool_use.opens_call("")
                async for delta in text_stream:
                    if is_call is False:
                        yield _sse(chunk(delta))
                        continue
                    held += delta
                    is_call = tool_use.opens_call(held)
                    if is_call is False:
                        yield _sse(chunk(held))
                completion = text_stream.result
                assert completion is not None
                finish_reason: str = completion.finish_reason
                if is_call:
                    call = tool_use.read_call(completion.text)
                    if call is None:
                        yield _sse(chunk(held))
                    else:
                        yield _sse(chunk(None, tool_calls=[call.as_openai(index=0)]))
                        finish_reason = "tool_calls"
                elif held and is_call is None:
                    yield _sse(chunk(held))
                yield _sse(chunk(None, finish_reason))
                if include_usage:
                    usage_chunk = chunk(None)
                    usage_chunk["choices"] = []
                    usage_chunk["usage"] = _usage(completion, params)
                    yield _sse(usage_chunk)
                yield _sse("[DONE]")
                code = 200
            except Exception as error:
                logger.exception("%s stream failed", endpoint)
                code = 500
                yield _sse(ApiError(500, f"generation failed: {type(error).__name__}: {error}").body())
            finally:
                text_stream.cancelled.set()  # stops generating when the client went away
                self._observe(endpoint, code, started, completion)

        headers = {**self._headers(prompt), "cache-control": "no-cache"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def _client_disconnected(request: Request) -> bool:
    """Waits for the next ASGI message once the body is read: the server sends http.disconnect
    when the client goes away (or after the response is sent)."""
    message = await request.receive()
    return message.get("type") == "http.disconnect"


async def _generate_while_connected(
    request: Request, runtime: ModelRuntime, prompt: PreparedPrompt, params: SamplingParams
) -> Completion | None:
    """The completion, or None when the client went away first; then the generation is cancelled
    rather than left running to max_tokens for nobody (a gateway that timed out retries elsewhere)."""
    generation = asyncio.ensure_future(runtime.agenerate(prompt, params))
    watcher = asyncio.ensure_future(_client_disconnected(request))
    try:
        done, _ = await asyncio.wait((generation, watcher), return_when=asyncio.FIRST_COMPLETED)
        if generation in done:
            return generation.result()
        if watcher.result():
            generation.cancel()
            return None
        return await generation  # a message other than a disconnect: nothing more to watch for
    finally:
        watcher.cancel()
        if not generation.done():
            generation.cancel()


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from error
    if not isinstance(body, dict):
        raise ApiError(
            400, f"the request body must be a JSON object, got {json_type(body)}", code="invalid_json"
        )
    return body


async def _not_found(request: Request, exc: Exception) -> Response:
    method, path = request.method, request.url.path
    expected = ROUTES.get(path)
    if expected is not None and expected != method:
        return ApiError(
            405, f"{method} is not allowed on {path}; use {expected}", code="method_not_allowed"
        ).response()
    return ApiError(404, f"Invalid URL ({method} {path})", code="not_found").response()


async def _http_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException) and exc.status_code in (404, 405):
        return await _not_found(request, exc)
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else str(exc)
    return ApiError(status, str(detail)).response()


def create_app(slot: RuntimeSlot) -> Starlette:
    """The API app; `slot` receives the runtime once the model is loaded."""
    api = OpenAIApp(slot)

    async def unknown_path(request: Request) -> Response:
        return await _not_found(request, HTTPException(404))

    handlers: dict[str, Callable[[Request], Awaitable[Response]]] = {
        COMPLETIONS: api.completions,
        CHAT_COMPLETIONS: api.chat_completions,
        MODELS: api.models,
    }
    routes = [Route(path, handlers[path], methods=[method]) for path, method in ROUTES.items()]
    # Mounted in BentoML, only paths that match a route reach this app: catch the rest of /v1 here.
    routes.append(Route("/v1/{rest:path}", unknown_path, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]))
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.slot = slot
    return app
