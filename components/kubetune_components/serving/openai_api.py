"""The OpenAI-compatible HTTP API of one model version, as a Starlette ASGI app.

    POST /v1/completions         {"prompt": "...", ...}              -> text_completion
    POST /v1/chat/completions    {"messages": [...], ...}            -> chat.completion
    GET  /v1/models                                                  -> the one model served

`stream: true` answers with server-sent events: `data: {chunk}` lines, then `data: [DONE]`.
Errors are OpenAI error objects, `{"error": {"message", "type", "param", "code"}}`: 400 for a
bad request (naming the field), 404 for unknown paths, 405 for a wrong method, 503 while the
model is loading, 500 when generation fails.

Arguments that this server cannot honour (n > 1, logprobs, penalties, tools, ...) are refused with
a 400 rather than ignored; unknown arguments are refused like OpenAI does. `model` is not checked
against the served model's id: the gateway in front of the versions routes by model. A prompt that
was truncated to fit the context window is answered with the header
`x-kubetune-prompt-tokens-dropped: N`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
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
from kubetune_components.serving.requests import (
    ROLES,
    ChatMessage,
    Completion,
    PreparedPrompt,
    RequestError,
    SamplingParams,
)
from kubetune_components.serving.runtime import ModelRuntime

logger = logging.getLogger(__name__)

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
MODELS = "/v1/models"
ROUTES = {COMPLETIONS: "POST", CHAT_COMPLETIONS: "POST", MODELS: "GET"}
DROPPED_TOKENS_HEADER = "x-kubetune-prompt-tokens-dropped"
VERSION_HEADER = "x-kubetune-version"
DEFAULT_COMPLETION_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions; chat completions default to what the context leaves."""
MAX_STOP_SEQUENCES = 4
CLIENT_CLOSED_REQUEST = 499
"""The code counted for a request or stream whose client went away before it ended (nginx's
convention); its generation is cancelled."""
SEED_RANGE = (-(2**63), 2**64 - 1)

COMMON_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "user",
        "n",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "metadata",
    }
)
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format"}
MESSAGE_FIELDS = frozenset({"role", "content", "name"})
EMPTY_MESSAGE_FIELDS = frozenset(
    {"refusal", "annotations", "audio", "function_call", "tool_calls", "tool_call_id", "reasoning_content"}
)
"""OpenAI message fields taken when empty (null or []): the official client's `model_dump()` of a
reply writes them all, and an assistant turn sent back that way must not be refused."""


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _bad(message: str, param: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


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
# Request parsing: every wrong field is named.


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if isinstance(value, float) else type(value).__name__)


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"{name} must be a number, got {_json_type(value)}", name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer, got {_json_type(value)}", name)
    return value


def _boolean(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"{name} must be a boolean, got {_json_type(value)}", name)
    return value


def _refuse_unsupported(body: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for name in body:
        if name not in allowed:
            raise _bad(f"Unrecognized request argument supplied: {name}", name, "unrecognized_argument")
    unsupported: list[tuple[str, bool]] = [
        ("n", (_integer(body, "n") or 1) != 1),
        ("presence_penalty", (_number(body, "presence_penalty") or 0.0) != 0.0),
        ("frequency_penalty", (_number(body, "frequency_penalty") or 0.0) != 0.0),
        ("logit_bias", body.get("logit_bias") not in (None, {})),
        ("logprobs", body.get("logprobs") not in (None, False)),
        ("top_logprobs", body.get("top_logprobs") not in (None, 0)),
        ("echo", body.get("echo") not in (None, False)),
        ("best_of", body.get("best_of") not in (None, 1)),
        ("suffix", body.get("suffix") not in (None, "")),
        ("response_format", body.get("response_format") not in (None, {"type": "text"})),
    ]
    for name, refused in unsupported:
        if refused:
            raise _bad(f"{name} is not supported by this model server", name, "unsupported_argument")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise _bad(f"model must be a string, got {_json_type(body['model'])}", "model")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad(f"user must be a string, got {_json_type(body['user'])}", "user")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise _bad(f"metadata must be an object, got {_json_type(body['metadata'])}", "metadata")


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise _bad(f"stop must be a string or an array of strings, got {_json_type(value)}", "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise _bad(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", "stop")
    if any(not stop for stop in stops):
        raise _bad("stop sequences must not be empty strings", "stop")
    return tuple(stops)


def sampling_params(body: Mapping[str, Any], default_max_tokens: int | None) -> SamplingParams:
    max_tokens = _integer(body, "max_tokens")
    max_completion_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is not None and max_completion_tokens is not None and max_tokens != max_completion_tokens:
        raise _bad("max_tokens and max_completion_tokens differ; send one of them", "max_completion_tokens")
    if max_tokens is None:
        max_tokens = max_completion_tokens
    if max_tokens is not None and max_tokens < 1:
        name = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
        raise _bad(f"{name} must be at least 1, got {max_tokens}", name)
    temperature = _number(body, "temperature")
    if temperature is not None and not 0 <= temperature <= 2:
        raise _bad(f"temperature must be between 0 and 2, got {body['temperature']}", "temperature")
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise _bad(f"top_p must be greater than 0 and at most 1, got {body['top_p']}", "top_p")
    seed = _integer(body, "seed")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise _bad(f"seed must fit in 64 bits, got {seed}", "seed")
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        stop=_stop(body),
        seed=seed,
    )


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise _bad("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise _bad(f"stream_options must be an object, got {_json_type(options)}", "stream_options")
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise _bad(f"stream_options.{unknown[0]} is not supported", f"stream_options.{unknown[0]}")
    return stream, _boolean(options, "include_usage")


def parse_prompt(body: Mapping[str, Any]) -> str:
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("prompt is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise _bad("prompt must be a string (or an array holding exactly one string)", "prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad(f"prompt must be a string, got {_json_type(prompt)}", "prompt")
    return prompt


def _message_content(message: Mapping[str, Any], where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for index, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise _bad(
                    f'{where}.content[{index}] must be a text part ({{"type": "text", "text": ...}})',
                    f"{where}.content[{index}]",
                )
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        raise _bad(f"{where}.content is required", f"{where}.content")
    raise _bad(f"{where}.content must be a string or an array of text parts", f"{where}.content")


def parse_messages(body: Mapping[str, Any]) -> list[ChatMessage]:
    if "messages" not in body or body["messages"] is None:
        raise _bad("messages is required", "messages")
    raw = body["messages"]
    if not isinstance(raw, list):
        raise _bad(f"messages must be an array, got {_json_type(raw)}", "messages")
    if not raw:
        raise _bad("messages must not be empty", "messages")
    messages: list[ChatMessage] = []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object, got {_json_type(message)}", where)
        unknown = sorted(
            name
            for name, value in message.items()
            if name not in MESSAGE_FIELDS and not (name in EMPTY_MESSAGE_FIELDS and value in (None, []))
        )
        if unknown:
            raise _bad(f"{where}.{unknown[0]} is not supported by this model server", f"{where}.{unknown[0]}")
        role = message.get("role")
        if not isinstance(role, str):
            raise _bad(f"{where}.role is required and must be a string", f"{where}.role")
        if role not in ROLES:
            raise _bad(f"{where}.role {role!r} is not one of {', '.join(ROLES)}", f"{where}.role")
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise _bad(f"{where}.name must be a string", f"{where}.name")
        messages.append(ChatMessage(role=role, content=_message_content(message, where)))
    return messages


# --------------------------------------------------------------------------------------------------
# Responses.


def _usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


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
            body = await _json_body(request)
            _refuse_unsupported(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
            stream, include_usage = _stream_flags(body)
            params = sampling_params(body, None if chat else DEFAULT_COMPLETION_MAX_TOKENS)
            runtime = self.slot.require()
            if chat:
                prompt = runtime.prepare_chat(parse_messages(body))
            else:
                prompt = runtime.prepare_completion(parse_prompt(body))
            if stream:
                return self._stream(runtime, prompt, params, endpoint, started, chat, include_usage)
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
        return JSONResponse(self._body(completion, chat), headers=self._headers(prompt))

    def _body(self, completion: Completion, chat: bool) -> dict[str, Any]:
        model_id = self.slot.identity.model_id
        created = int(time.time())
        if chat:
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": created,
                "model": model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": completion.text},
                        "logprobs": None,
                        "finish_reason": completion.finish_reason,
                    }
                ],
                "usage": _usage(completion),
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
            "usage": _usage(completion),
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
    ) -> StreamingResponse:
        text_stream = runtime.astream(prompt, params)  # refuses what cannot run before the 200 goes out
        model_id = self.slot.identity.model_id
        completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text is not None:
                    delta["content"] = text
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
                async for delta in text_stream:
                    yield _sse(chunk(delta))
                completion = text_stream.result
                assert completion is not None
                yield _sse(chunk(None, completion.finish_reason))
                if include_usage:
                    usage_chunk = chunk(None)
                    usage_chunk["choices"] = []
                    usage_chunk["usage"] = _usage(completion)
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
            400, f"the request body must be a JSON object, got {_json_type(body)}", code="invalid_json"
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
