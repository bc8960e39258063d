"""The gateway's HTTP surface: OpenAI-compatible endpoints in front of a deployment's versions.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming passes SSE through),
``GET /v1/models`` and ``GET /v1/models/{model}`` (the deployment is the one model),
``POST /v1/feedback``, ``GET /v1/experiments``, ``GET /healthz`` and ``GET /metrics``. Other paths and
methods get 404 / 405 errors in the OpenAI format.

Every response carries ``x-request-id`` and ``x-kubetune-version``. On a completion ``x-request-id``
is the response's ``id`` (the gateway assigns ids, rewriting the upstream's in the body and in every
stream chunk, so ids are unique even for cache hits) and ``x-kubetune-version`` names the version
that answered (the fallback when it stepped in, the producer of a cache entry on a hit; the chosen
version when the gateway refused the request itself or no version could answer). Responses that
concern no version (health, metrics, a body that is not JSON, an unknown override) say ``-``, which
no version can be named.

Requests must name the deployment as ``model``. The gateway reads ``metadata`` for template
variables and does not forward it. For streams it asks the upstream for a final usage chunk
(``stream_options.include_usage``) when the client did not set ``stream_options`` — so token metrics
cover streams — and drops that chunk before it reaches such a client.

Feedback: ``POST /v1/feedback {"requestId" (or "request_id"): <a completion's id>, "score": 0..1}``.
The score is in [0, 1] (1 = good) so that its mean reads like the rollout analysis' ``feedback``
threshold; a completion can be rated once (409 after that), and ids are remembered for the last
100,000 completions of this process (404 for others).

Failures: a connect error, a timeout or a 5xx from the chosen version is retried once on the
fallback version (never once a stream has sent its first byte); when that fails too, or there is no
fallback, the client gets a 502 (504 for a timeout) in the OpenAI error format. A stream that breaks
after it started ends with an SSE ``error`` event, which OpenAI clients raise as an error. Until a
stream's first chunk arrives it can still fall back: the fallback timeout covers the time to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from yarl import URL

from kubetune.gateway.cache import ResponseCache, cache_key, is_deterministic
from kubetune.gateway.config import ConfigReloader, GatewayConfig, PromptConfig
from kubetune.gateway.errors import GatewayError, invalid_request, openai_error
from kubetune.gateway.experiments import ExperimentTracker
from kubetune.gateway.generation import (
    CHAT_ENDPOINT,
    COMPLETIONS_ENDPOINT,
    apply_generation,
    check_request_shape,
)
from kubetune.gateway.metrics import GatewayMetrics
from kubetune.gateway.prompts import render_chat_messages, render_completion_prompt
from kubetune.gateway.routing import Router, UnknownVersionError

log = logging.getLogger(__name__)

VERSION_HEADER = "x-kubetune-version"
REQUEST_ID_HEADER = "x-request-id"
NO_VERSION = "-"
RECENT_REQUESTS = 100_000  # request ids remembered for feedback
MAX_BODY_BYTES = 16 * 1024 * 1024
# Connections to the versions, pooled and kept alive. The limit bounds what one gateway opens to all
# versions together; keep-alive stays below uvicorn's default 5 s (the BentoML servers run on it) so
# the gateway never sends on a connection the server is closing as idle.
UPSTREAM_CONNECTION_LIMIT = 512
UPSTREAM_KEEPALIVE_SECONDS = 4.0
ConfigSource = GatewayConfig | ConfigReloader | str | os.PathLike[str]


@dataclass(frozen=True)
class GatewayState:
    """Everything derived from one config; swapped whole on reload, so a request sees one config."""

    config: GatewayConfig
    router: Router
    prompts: dict[str, PromptConfig | None]
    urls: dict[str, str]
    endpoint_urls: dict[tuple[str, str], URL]  # (version, endpoint) -> parsed once, not per request

    @classmethod
    def build(cls, config: GatewayConfig) -> GatewayState:
        return cls(
            config=config,
            router=Router((version.name, version.weight) for version in config.versions),
            prompts={version.name: config.prompt_for(version.name) for version in config.versions},
            urls={version.name: version.url for version in config.versions},
            endpoint_urls={
                (version.name, endpoint): URL(version.url + endpoint)
                for version in config.versions
                for endpoint in (CHAT_ENDPOINT, COMPLETIONS_ENDPOINT)
            },
        )


@dataclass(frozen=True)
class UpstreamBody:
    """The body sent to ``version`` and whether the gateway added the usage chunk to a stream."""

    version: str
    body: dict[str, Any]
    added_usage: bool


@dataclass
class Attempt:
    """The outcome of one upstream attempt (non-streaming, or a stream before its first chunk)."""

    version: str
    code: int  # upstream status, or 502 / 504 when it failed / timed out
    failure: str | None  # why it counts as failed (connect error, timeout, 5xx, bad body); None if not
    body: Any = None  # parsed JSON of a 2xx answer
    raw: bytes = b""  # the upstream's bytes of a non-2xx answer
    content_type: str = "application/json"
    stream: aiohttp.ClientResponse | None = None
    chunks: AsyncIterator[bytes] | None = None
    first_chunk: bytes = b""
    started: float = 0.0

    @property
    def timed_out(self) -> bool:
        return self.code == 504 and self.failure is not None


@dataclass
class _StreamOutcome:
    code: int
    first_text_at: float | None = None
    finished_at: float | None = None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc or 'request failed'}"


def _preview(raw: bytes) -> str:
    return raw[:200].decode(errors="replace")


def _json_bytes(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _headers(request_id: str, version: str) -> dict[str, str]:
    return {REQUEST_ID_HEADER: request_id, VERSION_HEADER: version}


def error_response(error: GatewayError, request_id: str, version: str) -> Response:
    return Response(
        _json_bytes(error.to_openai()),
        status_code=error.status_code,
        media_type="application/json",
        headers=_headers(request_id, version),
    )


def _has_generated_text(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")):
            return True
        if choice.get("text"):
            return True
    return False


class SseRelay:
    """Re-frames an upstream SSE stream event by event: sets the gateway's response id on each JSON
    chunk, reports usage and the first generated text, and drops usage-only chunks the client did not
    ask for. Anything that is not a JSON ``data:`` event passes through unchanged."""

    def __init__(
        self,
        request_id: str,
        drop_usage_chunks: bool,
        on_usage: Callable[[Any], None],
        on_first_text: Callable[[], None],
    ) -> None:
        self._request_id = request_id
        self._drop_usage_chunks = drop_usage_chunks
        self._on_usage = on_usage
        self._on_first_text = on_first_text
        self._seen_text = False
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        self._buffer = (self._buffer + chunk).replace(b"\r\n", b"\n")
        out: list[bytes] = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                break
            event, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            rewritten = self._event(event)
            if rewritten is not None:
                out.append(rewritten + b"\n\n")
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        if not rest.strip():
            return b""
        rewritten = self._event(rest.rstrip(b"\n"))
        return b"" if rewritten is None else rewritten + b"\n\n"

    def _event(self, event: bytes) -> bytes | None:
        lines = event.split(b"\n")
        data_lines = [line for line in lines if line.startswith(b"data:")]
        if not data_lines:
            return event
        data = b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in data_lines)
        if data.strip() == b"[DONE]":
            return event
        try:
            chunk = json.loads(data)
        except ValueError:
            return event
        if not isinstance(chunk, dict):
            return event
        if "usage" in chunk and chunk["usage"] is not None:
            self._on_usage(chunk["usage"])
            if self._drop_usage_chunks and not chunk.get("choices"):
                return None
        if not self._seen_text and _has_generated_text(chunk):
            self._seen_text = True
            self._on_first_text()
        if "id" in chunk:
            chunk["id"] = self._request_id
        other_lines = [line for line in lines if not line.startswith(b"data:")]
        return b"\n".join([*other_lines, b"data: " + _json_bytes(chunk)])


class RelayedStream(StreamingResponse):
    """A streaming response that always closes its source, even when the client goes away."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None]],
        headers: dict[str, str],
        media_type: str,
    ) -> None:
        super().__init__(content, headers=headers, media_type=media_type)
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._content, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._on_close()


class DefaultHeadersMiddleware:
    """Adds x-request-id and x-kubetune-version to responses whose handler did not set them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                if REQUEST_ID_HEADER.encode() not in names:
                    headers.append((REQUEST_ID_HEADER.encode(), f"req-{uuid.uuid4().hex}".encode()))
                if VERSION_HEADER.encode() not in names:
                    headers.append((VERSION_HEADER.encode(), NO_VERSION.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Gateway:
    """State shared by the requests of one gateway process."""

    def __init__(self, config_source: ConfigSource, reload_interval_seconds: float = 1.0) -> None:
        self.reloader: ConfigReloader | None
        if isinstance(config_source, GatewayConfig):
            self.reloader = None
            config = config_source
        else:
            if isinstance(config_source, ConfigReloader):
                self.reloader = config_source
            else:
                self.reloader = ConfigReloader(config_source, reload_interval_seconds)
            config = self.reloader.current
            self.reloader.subscribe(self.apply_config)
        self.state = GatewayState.build(config)
        self.metrics = GatewayMetrics()
        self.experiments = ExperimentTracker()
        self.cache = ResponseCache(config.cache.max_entries, config.cache.ttl_seconds)
        self.recent_requests: OrderedDict[str, str] = OrderedDict()
        self.rated_requests: set[str] = set()
        self.started_at = int(time.time())
        self._session: aiohttp.ClientSession | None = None

    def apply_config(self, config: GatewayConfig) -> None:
        self.state = GatewayState.build(config)
        if config.cache.enabled:
            self.cache.configure(config.cache.max_entries, config.cache.ttl_seconds)
        else:
            self.cache.clear()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(
                "the gateway's upstream session is opened by the app's lifespan: serve the app with "
                "lifespan events on"
            )
        return self._session

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=UPSTREAM_CONNECTION_LIMIT, keepalive_timeout=UPSTREAM_KEEPALIVE_SECONDS
            ),
            # every request sets its own timeouts; none here, so a long stream is never cut at 5 min
            timeout=aiohttp.ClientTimeout(),
            # a proxy must not keep one client's cookies and send them with another's requests
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        reload_task = asyncio.create_task(self.reloader.run()) if self.reloader is not None else None
        try:
            yield
        finally:
            if reload_task is not None:
                reload_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reload_task
            await self._session.close()
            self._session = None

    # -- completions -------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._completion(request, CHAT_ENDPOINT, "chatcmpl")

    async def completions(self, request: Request) -> Response:
        return await self._completion(request, COMPLETIONS_ENDPOINT, "cmpl")

    async def _completion(self, request: Request, endpoint: str, id_prefix: str) -> Response:
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        state = self.state
        version = NO_VERSION
        try:
            body = await _read_json_object(request)
            check_request_shape(endpoint, body)
            _check_model(body, state.config.deployment)
            version = _route(state, request, body)
            apply_generation(endpoint, body, state.config.generation)
            if body.get("stream"):
                return await self._stream(state, endpoint, request_id, version, body)
            return await self._complete(state, endpoint, request_id, version, body)
        except GatewayError as error:
            return error_response(error, request_id, version)
        except Exception:
            log.exception("gateway failed on request %s", request_id)
            internal = GatewayError(
                500, "the gateway failed on this request; see its log", error_type="server_error"
            )
            return error_response(internal, request_id, version)

    def _upstream_body(
        self, state: GatewayState, endpoint: str, version: str, body: dict[str, Any]
    ) -> UpstreamBody:
        upstream = dict(body)
        metadata = upstream.pop("metadata", None)
        prompt = state.prompts[version]
        if prompt is not None:
            if endpoint == CHAT_ENDPOINT:
                upstream["messages"] = render_chat_messages(upstream["messages"], prompt, version, metadata)
            else:
                upstream["prompt"] = render_completion_prompt(upstream["prompt"], prompt, version, metadata)
        added_usage = False
        if upstream.get("stream") and upstream.get("stream_options") is None:
            upstream["stream_options"] = {"include_usage": True}
            added_usage = True
        return UpstreamBody(version, upstream, added_usage)

    def _deadline(self, state: GatewayState, version: str) -> float:
        config = state.config
        if config.fallback is not None and config.fallback.version != version:
            return min(config.fallback.timeout_seconds, config.upstream_timeout_seconds)
        return config.upstream_timeout_seconds

    def _fallback_for(self, state: GatewayState, attempt: Attempt) -> str | None:
        fallback = state.config.fallback
        if attempt.failure is None or fallback is None or fallback.version == attempt.version:
            return None
        return fallback.version

    def _record_attempt(
        self, state: GatewayState, endpoint: str, version: str, code: int, duration: float
    ) -> None:
        self.metrics.record_attempt(state.config.deployment, version, endpoint, code, duration)
        self.experiments.record_request(version, duration, error=code >= 500)

    def _remember(self, request_id: str, version: str) -> None:
        self.recent_requests[request_id] = version
        if len(self.recent_requests) > RECENT_REQUESTS:
            forgotten, _ = self.recent_requests.popitem(last=False)
            self.rated_requests.discard(forgotten)

    async def _complete(
        self, state: GatewayState, endpoint: str, request_id: str, version: str, body: dict[str, Any]
    ) -> Response:
        deployment = state.config.deployment
        upstream = self._upstream_body(state, endpoint, version, body)
        key: str | None = None
        if state.config.cache.enabled and is_deterministic(upstream.body):
            key = cache_key(endpoint, version, state.urls[version], upstream.body)
            started = time.perf_counter()
            hit = self.cache.get(key)
            if hit is not None:
                self.metrics.child(self.metrics.cache_hits, deployment).inc()
                self._record_attempt(state, endpoint, hit.version, 200, time.perf_counter() - started)
                return self._answer(request_id, hit.version, dict(hit.body))
            self.metrics.child(self.metrics.cache_misses, deployment).inc()

        attempt, sent = await self._send_with_fallback(
            state, endpoint, body, upstream, functools.partial(self._post, state, endpoint, request_id)
        )
        if attempt.code == 200:
            if attempt.version == version:
                if key is not None:
                    self.cache.put(key, version, dict(attempt.body))
            elif state.config.cache.enabled and is_deterministic(sent.body):
                fallback_key = cache_key(endpoint, attempt.version, state.urls[attempt.version], sent.body)
                self.cache.put(fallback_key, attempt.version, dict(attempt.body))

        if not 200 <= attempt.code < 300:
            return Response(
                attempt.raw,
                status_code=attempt.code,
                media_type=attempt.content_type,
                headers=_headers(request_id, attempt.version),
            )
        self.metrics.record_usage(deployment, attempt.version, attempt.body.get("usage"))
        return self._answer(request_id, attempt.version, attempt.body)

    async def _send_with_fallback(
        self,
        state: GatewayState,
        endpoint: str,
        body: dict[str, Any],
        upstream: UpstreamBody,
        send: Callable[[str, dict[str, Any], float], Awaitable[Attempt]],
    ) -> tuple[Attempt, UpstreamBody]:
        """Send ``upstream`` to its version, and when that fails, ``body`` to the fallback version.

        Returns the attempt that answered and what was sent to it; raises the 502/504 GatewayError
        when no version could answer."""
        first = await send(upstream.version, upstream.body, self._deadline(state, upstream.version))
        fallback = self._fallback_for(state, first)
        if fallback is None:
            if first.failure is not None:
                raise _failed(first, None)
            return first, upstream
        try:
            fallback_upstream = self._upstream_body(state, endpoint, fallback, body)
        except GatewayError as error:
            raise _failed(first, None, extra=f"the fallback {fallback!r} cannot take it: {error}") from error
        # counted once the fallback is really asked, so the series is the number of retries
        self.metrics.fallbacks.labels(state.config.deployment, first.version, fallback).inc()
        log.warning("version %s failed (%s); retrying on %s", first.version, first.failure, fallback)
        second = await send(fallback, fallback_upstream.body, state.config.upstream_timeout_seconds)
        if second.failure is not None:
            raise _failed(first, second)
        return second, fallback_upstream

    def _answer(self, request_id: str, version: str, body: dict[str, Any]) -> Response:
        body["id"] = request_id
        self._remember(request_id, version)
        return Response(
            _json_bytes(body), media_type="application/json", headers=_headers(request_id, version)
        )

    async def _post(
        self,
        state: GatewayState,
        endpoint: str,
        request_id: str,
        version: str,
        body: dict[str, Any],
        deadline: float,
    ) -> Attempt:
        started = time.perf_counter()
        attempt = Attempt(version=version, code=502, failure=None)
        try:
            async with self.session.post(
                state.endpoint_urls[version, endpoint],
                data=_json_bytes(body),
                headers={"content-type": "application/json", REQUEST_ID_HEADER: request_id},
                timeout=aiohttp.ClientTimeout(total=deadline),  # connecting and reading the whole answer
            ) as response:
                raw = await response.read()
        except TimeoutError:
            attempt.code, attempt.failure = 504, f"no answer within {deadline:g}s"
        except aiohttp.ClientError as exc:
            attempt.code, attempt.failure = 502, _describe(exc)
        else:
            attempt.code = response.status
            attempt.content_type = response.headers.get("content-type", "application/json")
            if response.status >= 500:
                attempt.failure = f"HTTP {response.status}: {_preview(raw)}"
            elif 200 <= response.status < 300:
                try:
                    attempt.body = json.loads(raw)
                except ValueError:
                    attempt.body = None
                if not isinstance(attempt.body, dict):
                    attempt.code, attempt.failure = 502, "the answer is not a JSON object"
            else:
                attempt.raw = raw
        duration = time.perf_counter() - started
        self._record_attempt(state, endpoint, version, attempt.code, duration)
        if attempt.failure is None and 200 <= attempt.code < 300:
            self.metrics.child(self.metrics.time_to_first_token, state.config.deployment, version).observe(
                duration
            )
        return attempt

    # -- streaming ---------------------------------------------------------------------------

    async def _stream(
        self, state: GatewayState, endpoint: str, request_id: str, version: str, body: dict[str, Any]
    ) -> Response:
        attempt, sent = await self._send_with_fallback(
            state,
            endpoint,
            body,
            self._upstream_body(state, endpoint, version, body),
            functools.partial(self._open_stream, state, endpoint, request_id),
        )
        headers = _headers(request_id, attempt.version)
        if attempt.stream is None:  # the upstream refused (4xx): pass its answer on
            return Response(
                attempt.raw, status_code=attempt.code, media_type=attempt.content_type, headers=headers
            )
        return self._relay(state, endpoint, request_id, attempt, sent.added_usage, headers)

    async def _open_stream(
        self,
        state: GatewayState,
        endpoint: str,
        request_id: str,
        version: str,
        body: dict[str, Any],
        deadline: float,
    ) -> Attempt:
        """Send the request and wait for the first chunk; until then a failure can still fall back.

        ``deadline`` bounds the time to the first chunk; after it, each read may wait up to the
        upstream timeout (a stream may run long, but not stall)."""
        started = time.perf_counter()
        attempt = Attempt(version=version, code=502, failure=None, started=started)
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(deadline):
                response = await self.session.post(
                    state.endpoint_urls[version, endpoint],
                    data=_json_bytes(body),
                    headers={
                        "content-type": "application/json",
                        "accept": "text/event-stream",
                        REQUEST_ID_HEADER: request_id,
                    },
                    timeout=aiohttp.ClientTimeout(
                        sock_connect=deadline, sock_read=state.config.upstream_timeout_seconds
                    ),
                )
                attempt.code = response.status
                attempt.content_type = response.headers.get("content-type", "text/event-stream")
                if response.status >= 500:
                    attempt.failure = f"HTTP {response.status}: {_preview(await response.read())}"
                elif not 200 <= response.status < 300:
                    attempt.raw = await response.read()
                else:
                    chunks = response.content.iter_any()
                    attempt.first_chunk = await anext(chunks)  # iter_any yields no empty chunks
                    attempt.stream, attempt.chunks = response, chunks
        except StopAsyncIteration:
            attempt.code, attempt.failure = 502, "the stream ended before its first chunk"
        except TimeoutError:
            attempt.code, attempt.failure = 504, f"no first chunk within {deadline:g}s"
        except aiohttp.ClientError as exc:
            attempt.code, attempt.failure = 502, _describe(exc)
        if attempt.stream is None:
            if response is not None:
                response.release()
            self._record_attempt(state, endpoint, version, attempt.code, time.perf_counter() - started)
        return attempt

    def _relay(
        self,
        state: GatewayState,
        endpoint: str,
        request_id: str,
        attempt: Attempt,
        drop_usage_chunks: bool,
        headers: dict[str, str],
    ) -> Response:
        deployment = state.config.deployment
        version = attempt.version
        response, chunks = attempt.stream, attempt.chunks
        assert response is not None and chunks is not None
        outcome = _StreamOutcome(code=attempt.code)

        def on_first_text() -> None:
            outcome.first_text_at = time.perf_counter()

        relay = SseRelay(
            request_id,
            drop_usage_chunks,
            on_usage=lambda usage: self.metrics.record_usage(deployment, version, usage),
            on_first_text=on_first_text,
        )
        is_sse = attempt.content_type.startswith("text/event-stream")

        def finish() -> None:
            """Release the upstream and record the attempt, once: when the upstream is done (before
            the client sees the end of the response, so its metrics are there when it asks), or when
            the client goes away first."""
            if outcome.finished_at is not None:
                return
            outcome.finished_at = finished = time.perf_counter()
            response.release()  # back to the pool when read to the end, closed when cut short
            self._record_attempt(state, endpoint, version, outcome.code, finished - attempt.started)
            ttft_end = outcome.first_text_at if outcome.first_text_at is not None else finished
            self.metrics.child(self.metrics.time_to_first_token, deployment, version).observe(
                ttft_end - attempt.started
            )

        async def body() -> AsyncIterator[bytes]:
            try:
                out = relay.feed(attempt.first_chunk) if is_sse else attempt.first_chunk
                if out:
                    yield out
                async for chunk in chunks:
                    out = relay.feed(chunk) if is_sse else chunk
                    if out:
                        yield out
                tail = relay.flush() if is_sse else b""
                finish()
                if tail:
                    yield tail
            except Exception as exc:  # whatever broke, the client gets an error event, not a cut stream
                timed_out = isinstance(exc, TimeoutError)
                outcome.code = 504 if timed_out else 502
                if isinstance(exc, aiohttp.ClientError | TimeoutError):
                    log.warning("stream %s from version %s broke: %s", request_id, version, _describe(exc))
                else:
                    log.exception("relaying stream %s from version %s failed", request_id, version)
                error = openai_error(
                    f"version {version!r} stopped answering mid-stream ({type(exc).__name__})",
                    error_type="server_error",
                    code="upstream_timeout" if timed_out else "upstream_error",
                )
                finish()
                yield b"data: " + _json_bytes(error) + b"\n\n"

        async def on_close() -> None:
            finish()

        self._remember(request_id, version)
        return RelayedStream(body(), on_close, headers=headers, media_type=attempt.content_type)

    # -- other endpoints ---------------------------------------------------------------------

    def _model_document(self, deployment: str) -> dict[str, Any]:
        return {"id": deployment, "object": "model", "created": self.started_at, "owned_by": "kubetune"}

    async def models(self, request: Request) -> Response:
        document = {"object": "list", "data": [self._model_document(self.state.config.deployment)]}
        return Response(_json_bytes(document), media_type="application/json")

    async def model(self, request: Request) -> Response:
        """``GET /v1/models/{model}`` (the OpenAI client's ``models.retrieve``)."""
        deployment = self.state.config.deployment
        try:
            _check_model({"model": request.path_params["model"]}, deployment)
        except GatewayError as error:
            return error_response(error, f"req-{uuid.uuid4().hex}", NO_VERSION)
        return Response(_json_bytes(self._model_document(deployment)), media_type="application/json")

    async def feedback(self, request: Request) -> Response:
        request_id = f"req-{uuid.uuid4().hex}"
        try:
            body = await _read_json_object(request)
            rated_id, score = _parse_feedback(body)
            version = self.recent_requests.get(rated_id)
            if version is None:
                raise GatewayError(
                    404,
                    f"no recent completion has the id {rated_id!r} (the gateway remembers the last "
                    f"{RECENT_REQUESTS} response ids of this process)",
                    param="requestId",
                    error_type="not_found_error",
                )
            if rated_id in self.rated_requests:
                raise GatewayError(
                    409,
                    f"the completion {rated_id!r} already has feedback",
                    param="requestId",
                    error_type="conflict",
                )
        except GatewayError as error:
            return error_response(error, request_id, NO_VERSION)
        self.rated_requests.add(rated_id)
        deployment = self.state.config.deployment
        self.metrics.feedback_score.labels(deployment, version).observe(score)
        self.experiments.record_feedback(version, score)
        document = {"requestId": rated_id, "version": version, "score": score}
        return Response(
            _json_bytes(document), media_type="application/json", headers=_headers(request_id, version)
        )

    async def experiments_report(self, request: Request) -> Response:
        return Response(
            _json_bytes(self.experiments.report(self.state.config)), media_type="application/json"
        )

    async def healthz(self, request: Request) -> Response:
        config = self.state.config
        document = {
            "status": "ok",
            "deployment": config.deployment,
            "versions": {version.name: version.weight for version in config.versions},
            "configError": self.reloader.last_error if self.reloader is not None else None,
        }
        return Response(_json_bytes(document), media_type="application/json")

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _failed(first: Attempt, fallback: Attempt | None, extra: str | None = None) -> GatewayError:
    final = fallback if fallback is not None else first
    message = f"version {first.version!r} failed: {first.failure}"
    if fallback is not None:
        message += f"; the fallback version {fallback.version!r} failed too: {fallback.failure}"
    if extra is not None:
        message += f"; {extra}"
    if final.timed_out:
        return GatewayError(504, message, error_type="server_error", code="upstream_timeout")
    return GatewayError(502, message, error_type="server_error", code="upstream_error")


async def _read_json_object(request: Request) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise GatewayError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", param=None)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise invalid_request(f"the request body is not valid JSON: {exc}", None) from exc
    if not isinstance(body, dict):
        raise invalid_request("the request body must be a JSON object", None)
    return body


def _check_model(body: dict[str, Any], deployment: str) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request(f"model is required (this gateway serves the model {deployment!r})", "model")
    if model != deployment:
        raise GatewayError(
            404,
            f"the model {model!r} does not exist here; this gateway serves {deployment!r}",
            param="model",
            error_type="invalid_request_error",
            code="model_not_found",
        )


def _route(state: GatewayState, request: Request, body: dict[str, Any]) -> str:
    routing = state.config.routing
    override = request.headers.get(routing.override_header)
    if routing.sticky_by == "user":
        key = body.get("user")
    else:
        assert routing.header is not None
        key = request.headers.get(routing.header)
    try:
        return state.router.choose(key, override, routing.override_header)
    except UnknownVersionError as exc:
        raise invalid_request(str(exc), routing.override_header) from exc


_FEEDBACK_FIELDS = frozenset({"requestId", "request_id", "score"})


def _parse_feedback(body: dict[str, Any]) -> tuple[str, float]:
    unknown = sorted(set(body) - _FEEDBACK_FIELDS)
    if unknown:
        raise invalid_request(
            f"unknown field(s) {', '.join(unknown)}; feedback takes requestId (or request_id) and score",
            unknown[0],
        )
    ids = {body[name] for name in ("requestId", "request_id") if name in body}
    if not ids:
        raise invalid_request("requestId is required: the id of the completion being rated", "requestId")
    if len(ids) > 1:
        raise invalid_request("requestId and request_id name different completions", "requestId")
    rated_id = ids.pop()
    if not isinstance(rated_id, str) or not rated_id:
        raise invalid_request("requestId must be a non-empty string", "requestId")
    score = body.get("score")
    if (
        not isinstance(score, int | float)
        or isinstance(score, bool)
        or not math.isfinite(score)
        or not 0 <= score <= 1
    ):
        raise invalid_request("score must be a number between 0 (bad) and 1 (good)", "score")
    return rated_id, float(score)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and wrong methods in the OpenAI error format (Starlette answers plain text)."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
    if status == 404:
        error = GatewayError(404, f"Invalid URL ({request.method} {request.url.path})", code="not_found")
    elif status == 405:
        allowed = headers.get("Allow") or headers.get("allow") or ""
        error = GatewayError(
            405,
            f"{request.method} is not allowed on {request.url.path}; use {allowed}",
            code="method_not_allowed",
        )
    else:
        detail = exc.detail if isinstance(exc, HTTPException) else "the gateway failed on this request"
        error = GatewayError(
            status, str(detail), error_type="invalid_request_error" if status < 500 else "server_error"
        )
    return Response(
        _json_bytes(error.to_openai()), status_code=status, media_type="application/json", headers=headers
    )


def create_app(config_source: ConfigSource, reload_interval_seconds: float = 1.0) -> Starlette:
    """The gateway app. A path (or a ConfigReloader) is watched for changes while the app runs;
    a GatewayConfig is used as it is. ``app.state.gateway`` is the Gateway behind it."""
    gateway = Gateway(config_source, reload_interval_seconds)
    app = Starlette(
        routes=[
            Route(CHAT_ENDPOINT, gateway.chat_completions, methods=["POST"]),
            Route(COMPLETIONS_ENDPOINT, gateway.completions, methods=["POST"]),
            Route("/v1/models", gateway.models, methods=["GET"]),
            Route("/v1/models/{model:path}", gateway.model, methods=["GET"]),
            Route("/v1/feedback", gateway.feedback, methods=["POST"]),
            Route("/v1/experiments", gateway.experiments_report, methods=["GET"]),
            Route("/healthz", gateway.healthz, methods=["GET"]),
            Route("/metrics", gateway.metrics_endpoint, methods=["GET"]),
        ],
        middleware=[Middleware(DefaultHeadersMiddleware)],
        exception_handlers={HTTPException: _http_error},
        lifespan=gateway.lifespan,
    )
    app.state.gateway = gateway
    return app
