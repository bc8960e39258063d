"""The gateway's HTTP surface: OpenAI-compatible endpoints in front of a deployment's versions.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming passes SSE through),
``GET /v1/models`` and ``GET /v1/models/{model}`` (the deployment is the one model),
``POST /v1/feedback``, ``GET /v1/experiments``, ``GET /healthz``, ``GET /readyz`` and ``GET /metrics``.
Other paths and methods get 404 / 405 errors in the OpenAI format.

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

Feedback rates a completion by its id, once (``feedback``); the id is signed and names its version.

Access (``access.control``): every endpoint but ``/healthz`` and ``/metrics`` checks the caller's key
(401 ``invalid_api_key``, 403 ``insufficient_permissions``: ``inference`` for completions and models,
``feedback``, ``experiments``) when authentication is on, then the key's and tenant's limits (429
``rate_limit_exceeded`` / ``insufficient_quota`` with Retry-After; 503 when the limit store is down
and the config says failClosed). Tokens are charged from the answer's usage (a stream's before its
end reaches the client), and each request is counted per key and written to the audit log.

Readiness: requests go only to versions that are ready (the config's ``ready``, less versions the
gateway could not connect to within the last ``health.markDownSeconds``); a sticky user whose
version is not ready is served by another meanwhile. A request pinned to a version that is not
ready, or one arriving while no weighted version is, goes to the fallback version when that is
ready; otherwise the client gets a 503 with ``Retry-After`` (type ``service_unavailable``).

Prompts: a version's prompt (``prompts``) is applied before the request goes upstream; examples a
prompt's pool (``fewShot``) gives the request follow its fixed ones, as many as fit
``generation.maxPromptTokens``, and ``x-kubetune-few-shot`` names their pool lines. For a prompt with
``reasoning`` the version is asked to hide what the model writes between its markers.

Failures: a request whose version could not be connected to (nothing of it reached the version) is
re-sent once to another ready version by weight, unless the override header pinned it; the answer
then names the first version in ``x-kubetune-retried-from`` and
``kubetune_gateway_connect_retries_total`` counts it. A connect error, a timeout or a 5xx from the
version is then retried once on the fallback version (never once a stream has sent its first byte);
when that fails too, or there is no fallback, the client gets an OpenAI-format error: 503 with
Retry-After when the version could not be connected to, 504 naming the timeout setting that ran out,
else 502. Every wait is bounded by the config's ``timeouts`` (and ``fallback.timeoutSeconds``, for
the chosen version and the fallback alike). A stream that breaks or stays silent after it started
ends with an SSE ``error`` event, which OpenAI clients raise as an error. No client-facing message
quotes an exception; the log does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from yarl import URL

from kubetune.gateway.access.control import AccessControl, Exchange
from kubetune.gateway.access.keys import Scope
from kubetune.gateway.access.limits import LimitStoreUnavailable
from kubetune.gateway.cache import ResponseCache, cache_key, is_deterministic
from kubetune.gateway.config import ConfigReloader, GatewayConfig, PromptConfig
from kubetune.gateway.errors import GatewayError, invalid_request
from kubetune.gateway.experiments import ExperimentsUnavailable, ExperimentTracker
from kubetune.gateway.feedback import (
    RATED_TTL_SECONDS,
    ResponseIds,
    already_rated,
    parse_feedback,
    unknown_completion,
)
from kubetune.gateway.fewshot import FEW_SHOT_HEADER, PoolCache, header_value
from kubetune.gateway.generation import (
    CHAT_ENDPOINT,
    COMPLETIONS_ENDPOINT,
    apply_generation,
    parse_openai_request,
)
from kubetune.gateway.health import UpstreamHealth
from kubetune.gateway.metrics import GatewayMetrics
from kubetune.gateway.prompts import render_chat_with_few_shot, render_completion_with_few_shot
from kubetune.gateway.relay import RelayedStream, relay_stream
from kubetune.gateway.responses import (
    NO_VERSION,
    DefaultHeadersMiddleware,
    error_response,
    http_error,
    json_bytes,
    json_response,
    nested_too_deeply,
    new_request_id,
    read_json_object,
    tracing_headers,
)
from kubetune.gateway.routing import NoVersionAvailable, Router, UnknownVersionError
from kubetune.gateway.upstream import (
    RETRIED_FROM_HEADER,
    Attempt,
    AttemptLimits,
    RetryElsewhere,
    UpstreamBody,
    UpstreamClient,
    WaitLimit,
    send_with_fallback,
)
from kubetune_contract.openai import HIDDEN_REASONING_FIELD

log = logging.getLogger(__name__)

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


class Gateway:
    """State shared by the requests of one gateway process, and its route handlers."""

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
        self.access = AccessControl(config, self.metrics)
        self.experiments = ExperimentTracker(self.access.shared_statistics())
        self.cache = ResponseCache(config.cache.max_entries, config.cache.ttl_seconds)
        self.response_ids = ResponseIds(_signing_key(config))
        self.upstream = UpstreamClient()
        self.health = UpstreamHealth()
        self.few_shot_pools = PoolCache()
        self.started_at = int(time.time())

    def apply_config(self, config: GatewayConfig) -> None:
        previous = self.state.config
        self.state = GatewayState.build(config)
        self.access.configure(config)
        self.experiments.shared = self.access.shared_statistics()
        if config.access.signing_key_file != previous.access.signing_key_file:
            self.response_ids = ResponseIds(_signing_key(config))
        if config.cache.enabled:
            self.cache.configure(config.cache.max_entries, config.cache.ttl_seconds)
        else:
            self.cache.clear()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.upstream.open()
        reload_task = asyncio.create_task(self.reloader.run()) if self.reloader is not None else None
        try:
            yield
        finally:
            if reload_task is not None:
                reload_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reload_task
            await self.upstream.close()
            await self.access.close()

    # -- completions -------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._completion(request, CHAT_ENDPOINT, "chatcmpl")

    async def completions(self, request: Request) -> Response:
        return await self._completion(request, COMPLETIONS_ENDPOINT, "cmpl")

    async def _completion(self, request: Request, endpoint: str, id_prefix: str) -> Response:
        request_id = new_request_id(id_prefix)
        exchange = Exchange(request_id, endpoint)
        response = await self._completion_response(request, endpoint, exchange)
        if not isinstance(response, RelayedStream):  # a stream is finished when it ends
            self.access.finish(exchange, response.status_code)
        return response

    async def _completion_response(self, request: Request, endpoint: str, exchange: Exchange) -> Response:
        request_id = exchange.request_id
        state = self.state
        version = NO_VERSION
        try:
            self.access.authenticate(exchange, request.headers.get("authorization"), Scope.INFERENCE)
            body = await read_json_object(request)
            parsed = parse_openai_request(endpoint, body)
            _check_model(parsed.model, state.config.deployment)
            await self.access.admit(exchange)
            unavailable = self.health.unavailable(state.config)
            chosen = _route(state, request, parsed.user, unavailable)
            if chosen is not None:
                version = chosen
            apply_generation(endpoint, body, state.config.generation)
            version = self._ready_version(state, chosen, unavailable)
            upstream = self._upstream_body(state, endpoint, version, body)
            if chosen is not None and version != chosen:  # the fallback stands in for a version not ready
                self._count_fallback(state, chosen, version)
            exchange.version = version
            # a client that pinned its version asked for that one, not for any other
            pinned = request.headers.get(state.config.routing.override_header) is not None
            retry = None if pinned else self._retry_elsewhere(state)
            if parsed.stream:
                return await self._stream(state, endpoint, exchange, upstream, body, retry)
            return await self._complete(state, endpoint, exchange, upstream, body, retry)
        except GatewayError as error:
            exchange.refused(error)
            return error_response(error, request_id, version)
        except RecursionError:
            # a body just shallow enough to decode can still be too deep to encode again upstream
            exchange.decision = "rejected"
            return error_response(nested_too_deeply(), request_id, version)
        except Exception:
            log.exception("gateway failed on request %s", request_id)
            internal = GatewayError(
                500, "the gateway failed on this request; see its log", error_type="server_error"
            )
            exchange.decision = "failed"
            return error_response(internal, request_id, version)

    def _ready_version(self, state: GatewayState, chosen: str | None, unavailable: frozenset[str]) -> str:
        """``chosen`` when it is ready, else the fallback when that is; else the 503 to answer.

        ``chosen`` is None when no version with a weight is ready."""
        if chosen is not None and chosen not in unavailable:
            return chosen
        config = state.config
        if config.fallback is not None and config.fallback.version not in unavailable:
            return config.fallback.version
        retry_after = self.health.retry_after(config)
        if chosen is None:
            message = f"no version of {config.deployment!r} is ready to answer; retry in {retry_after}s"
            code = "no_version_ready"
        else:
            message = f"version {chosen!r} is not ready to answer; retry in {retry_after}s"
            code = "version_not_ready"
        raise GatewayError(503, message, error_type="service_unavailable", code=code, retry_after=retry_after)

    def _unavailable_now(self, state: GatewayState) -> frozenset[str]:
        return self.health.unavailable(state.config)

    def _upstream_body(
        self, state: GatewayState, endpoint: str, version: str, body: dict[str, Any]
    ) -> UpstreamBody:
        upstream = dict(body)
        metadata = upstream.pop("metadata", None)
        prompt = state.prompts[version]
        few_shot_lines: str | None = None
        if prompt is not None:
            max_prompt_tokens = state.config.generation.max_prompt_tokens
            if endpoint == CHAT_ENDPOINT:
                upstream["messages"], selected = render_chat_with_few_shot(
                    upstream["messages"],
                    prompt,
                    version,
                    metadata,
                    prompt.few_shot,
                    self.few_shot_pools,
                    max_prompt_tokens,
                )
            else:
                upstream["prompt"], selected = render_completion_with_few_shot(
                    upstream["prompt"],
                    prompt,
                    version,
                    metadata,
                    prompt.few_shot,
                    self.few_shot_pools,
                    max_prompt_tokens,
                )
            if prompt.few_shot is not None:
                few_shot_lines = header_value(selected)
            if prompt.reasoning is not None:
                # the model server drops what the model writes between the markers
                upstream[HIDDEN_REASONING_FIELD] = {
                    "open": prompt.reasoning.open,
                    "close": prompt.reasoning.close,
                }
        added_usage = False
        if upstream.get("stream"):
            # usage is always asked for, so that limits and budgets count streamed tokens too
            options = upstream.get("stream_options")
            if options is None:
                upstream["stream_options"] = {"include_usage": True}
                added_usage = True
            elif isinstance(options, dict) and not options.get("include_usage"):
                upstream["stream_options"] = {**options, "include_usage": True}
                added_usage = True
        return UpstreamBody(version, upstream, added_usage, few_shot_lines)

    def _retry_elsewhere(self, state: GatewayState) -> RetryElsewhere:
        deployment = state.config.deployment

        def count_retry(unreachable: str, other: str) -> None:
            self.metrics.child(self.metrics.connect_retries, deployment, unreachable, other).inc()

        return RetryElsewhere(choose=state.router.another_by_weight, on_retry=count_retry)

    def _record_attempt(
        self, state: GatewayState, endpoint: str, version: str, code: int, duration: float
    ) -> None:
        self.metrics.record_attempt(state.config.deployment, version, endpoint, code, duration)
        self.experiments.record_request(version, duration, error=code >= 500)

    def _count_fallback(self, state: GatewayState, failed_version: str, fallback: str) -> None:
        # counted once the fallback is really asked, so the series is the number of retries
        self.metrics.fallbacks.labels(state.config.deployment, failed_version, fallback).inc()

    async def _complete(
        self,
        state: GatewayState,
        endpoint: str,
        exchange: Exchange,
        upstream: UpstreamBody,
        body: dict[str, Any],
        retry: RetryElsewhere | None,
    ) -> Response:
        request_id = exchange.request_id
        deployment, version = state.config.deployment, upstream.version
        key: str | None = None
        if state.config.cache.enabled and is_deterministic(upstream.body):
            key = cache_key(endpoint, version, state.urls[version], upstream.body)
            started = time.perf_counter()
            hit = self.cache.get(key)
            if hit is not None:
                self.metrics.child(self.metrics.cache_hits, deployment).inc()
                self._record_attempt(state, endpoint, hit.version, 200, time.perf_counter() - started)
                exchange.version = hit.version
                await self.access.charge(exchange, hit.body.get("usage"))
                # the key covers the body with its examples, so they are the ones this request has
                return self._answer(exchange, hit.version, dict(hit.body), _answer_headers(upstream, None))
            self.metrics.child(self.metrics.cache_misses, deployment).inc()

        attempt, sent = await send_with_fallback(
            state.config,
            upstream,
            functools.partial(self._upstream_body, state, endpoint, body=body),
            functools.partial(self._post, state, endpoint, request_id),
            functools.partial(self._count_fallback, state),
            functools.partial(self._unavailable_now, state),
            retry,
        )
        if attempt.code == 200:
            if attempt.version == version:
                if key is not None:
                    self.cache.put(key, version, dict(attempt.body))
            elif state.config.cache.enabled and is_deterministic(sent.body):
                fallback_key = cache_key(endpoint, attempt.version, state.urls[attempt.version], sent.body)
                self.cache.put(fallback_key, attempt.version, dict(attempt.body))

        exchange.version = attempt.version
        extra_headers = _answer_headers(sent, attempt.retried_from)
        if not 200 <= attempt.code < 300:
            exchange.decision = "rejected"
            return Response(
                attempt.raw,
                status_code=attempt.code,
                media_type=attempt.content_type,
                headers={**tracing_headers(request_id, attempt.version), **extra_headers},
            )
        self.metrics.record_usage(deployment, attempt.version, attempt.body.get("usage"))
        await self.access.charge(exchange, attempt.body.get("usage"))
        return self._answer(exchange, attempt.version, attempt.body, extra_headers)

    def _answer(
        self, exchange: Exchange, version: str, body: dict[str, Any], extra_headers: dict[str, str]
    ) -> Response:
        response_id = self.response_ids.sign(exchange.request_id, version)
        exchange.request_id = response_id
        body["id"] = response_id
        return json_response(body, {**tracing_headers(response_id, version), **extra_headers})

    async def _post(
        self,
        state: GatewayState,
        endpoint: str,
        request_id: str,
        version: str,
        body: dict[str, Any],
        limits: AttemptLimits,
    ) -> Attempt:
        url = state.endpoint_urls[version, endpoint]
        attempt = await self.upstream.post(url, request_id, version, body, limits)
        self._note_reachability(state, attempt)
        self._record_attempt(state, endpoint, version, attempt.code, attempt.duration)
        if attempt.succeeded:
            self.metrics.child(self.metrics.time_to_first_token, state.config.deployment, version).observe(
                attempt.duration
            )
        return attempt

    def _note_reachability(self, state: GatewayState, attempt: Attempt) -> None:
        if attempt.unreachable:
            seconds = state.config.health.mark_down_seconds
            log.warning("version %s is unreachable; no traffic goes to it for %gs", attempt.version, seconds)
            self.health.mark_down(attempt.version, seconds)

    # -- streaming ---------------------------------------------------------------------------

    async def _stream(
        self,
        state: GatewayState,
        endpoint: str,
        exchange: Exchange,
        upstream: UpstreamBody,
        body: dict[str, Any],
        retry: RetryElsewhere | None,
    ) -> Response:
        request_id = exchange.request_id
        attempt, sent = await send_with_fallback(
            state.config,
            upstream,
            functools.partial(self._upstream_body, state, endpoint, body=body),
            functools.partial(self._open_stream, state, endpoint, request_id),
            functools.partial(self._count_fallback, state),
            functools.partial(self._unavailable_now, state),
            retry,
        )
        exchange.version = attempt.version
        extra_headers = _answer_headers(sent, attempt.retried_from)
        headers = {**tracing_headers(request_id, attempt.version), **extra_headers}
        if attempt.stream is None:  # the upstream refused (4xx): pass its answer on
            exchange.decision = "rejected"
            return Response(
                attempt.raw, status_code=attempt.code, media_type=attempt.content_type, headers=headers
            )
        deployment, answering = state.config.deployment, attempt.version
        response_id = self.response_ids.sign(request_id, answering)
        exchange.request_id = response_id
        headers = {**tracing_headers(response_id, answering), **extra_headers}
        reported: list[Any] = []

        def on_usage(usage: Any) -> None:
            self.metrics.record_usage(deployment, answering, usage)
            reported.append(usage)

        async def charge_usage() -> None:
            # awaited before the client reads the end of the stream: its next request sees the charge
            while reported:
                await self.access.charge(exchange, reported.pop(0))

        def on_finished(code: int, finished: float, first_text_at: float | None) -> None:
            self._record_attempt(state, endpoint, answering, code, finished - attempt.started)
            ttft_end = first_text_at if first_text_at is not None else finished
            self.metrics.child(self.metrics.time_to_first_token, deployment, answering).observe(
                ttft_end - attempt.started
            )
            if code >= 500:
                exchange.decision = "failed"
            self.access.finish(exchange, code)

        return relay_stream(
            attempt,
            response_id,
            sent.added_usage,
            headers,
            idle=WaitLimit(state.config.timeouts.stream_idle_seconds, "timeouts.streamIdleSeconds"),
            on_usage=on_usage,
            on_finished=on_finished,
            settle=charge_usage,
        )

    async def _open_stream(
        self,
        state: GatewayState,
        endpoint: str,
        request_id: str,
        version: str,
        body: dict[str, Any],
        limits: AttemptLimits,
    ) -> Attempt:
        url = state.endpoint_urls[version, endpoint]
        attempt = await self.upstream.open_stream(url, request_id, version, body, limits)
        self._note_reachability(state, attempt)
        if attempt.stream is None:  # an open stream is recorded when it ends
            self._record_attempt(state, endpoint, version, attempt.code, attempt.duration)
        return attempt

    # -- other endpoints ---------------------------------------------------------------------

    async def _guarded(
        self, request: Request, scope: Scope, answer: Callable[[Exchange], Awaitable[Response]]
    ) -> Response:
        """``answer`` behind the key check and the limits, counted and audited."""
        exchange = Exchange(new_request_id(), request.url.path)
        try:
            self.access.authenticate(exchange, request.headers.get("authorization"), scope)
            await self.access.admit(exchange)
            response = await answer(exchange)
        except GatewayError as error:
            exchange.refused(error)
            response = error_response(error, exchange.request_id, exchange.version)
        self.access.finish(exchange, response.status_code)
        return response

    def _model_document(self, deployment: str) -> dict[str, Any]:
        return {"id": deployment, "object": "model", "created": self.started_at, "owned_by": "kubetune"}

    async def models(self, request: Request) -> Response:
        async def answer(exchange: Exchange) -> Response:
            document = {"object": "list", "data": [self._model_document(self.state.config.deployment)]}
            return json_response(document)

        return await self._guarded(request, Scope.INFERENCE, answer)

    async def model(self, request: Request) -> Response:
        """``GET /v1/models/{model}`` (the OpenAI client's ``models.retrieve``)."""

        async def answer(exchange: Exchange) -> Response:
            deployment = self.state.config.deployment
            _check_model(request.path_params["model"], deployment)
            return json_response(self._model_document(deployment))

        return await self._guarded(request, Scope.INFERENCE, answer)

    async def feedback(self, request: Request) -> Response:
        async def answer(exchange: Exchange) -> Response:
            rated_id, score = parse_feedback(await read_json_object(request))
            version = self.response_ids.version_of(rated_id)
            if version is None:
                raise unknown_completion(rated_id)
            exchange.version = version
            try:
                first = await self.access.store.first_time(f"rated:{rated_id}", RATED_TTL_SECONDS)
            except LimitStoreUnavailable as exc:
                log.error("%s; feedback on %s refused", exc, rated_id)
                raise GatewayError(
                    503,
                    "feedback cannot be recorded now (the shared store is unreachable); retry shortly",
                    error_type="service_unavailable",
                    code="limit_store_unavailable",
                    retry_after=1,
                ) from exc
            if not first:
                raise already_rated(rated_id)
            self.metrics.feedback_score.labels(self.state.config.deployment, version).observe(score)
            try:
                await self.experiments.record_feedback(version, score)
            except ExperimentsUnavailable as exc:
                log.error("%s", exc)
                raise GatewayError(
                    503, "feedback cannot be recorded now; retry shortly", error_type="service_unavailable"
                ) from exc
            document = {"requestId": rated_id, "version": version, "score": score}
            return json_response(document, tracing_headers(exchange.request_id, version))

        return await self._guarded(request, Scope.FEEDBACK, answer)

    async def experiments_report(self, request: Request) -> Response:
        async def answer(exchange: Exchange) -> Response:
            try:
                return json_response(await self.experiments.report(self.state.config))
            except ExperimentsUnavailable as exc:
                log.error("%s", exc)
                raise GatewayError(
                    503,
                    "the experiment statistics cannot be read now; retry shortly",
                    error_type="service_unavailable",
                    retry_after=1,
                ) from exc

        return await self._guarded(request, Scope.EXPERIMENTS, answer)

    async def healthz(self, request: Request) -> Response:
        return json_response(self._health_document())

    def _health_document(self) -> dict[str, Any]:
        config = self.state.config
        return {
            "status": "ok",
            "deployment": config.deployment,
            "versions": {version.name: version.weight for version in config.versions},
            "notRouted": sorted(self.health.unavailable(config)),
            "configError": self.reloader.last_error if self.reloader is not None else None,
            "auth": "on" if self.access.auth_on else "off",
            "limitStoreError": self.access.store_problem,
            "keysError": self.access.keyring.error,
        }

    async def readyz(self, request: Request) -> Response:
        """``/healthz``'s document, answered 503 while the gateway refuses every limited request
        because its limit store is unreachable (failClosed): a readiness probe then shows it in the
        gateway's rollout, and so in the ModelDeployment's Ready condition."""
        refusing = await self.access.limit_store_refuses()
        document = self._health_document()
        if refusing is None:
            return json_response(document)
        return Response(
            json_bytes({**document, "status": "refusing", "refusing": refusing}),
            status_code=503,
            media_type="application/json",
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _signing_key(config: GatewayConfig) -> bytes | None:
    """The configured signing key; None (a key of this process) when there is none or it is unreadable,
    said in the log: then only this replica accepts feedback on its answers."""
    path = config.access.signing_key_file
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        log.warning(
            "cannot read the signing key %s (%s): response ids are signed with a key of this process, "
            "so other replicas refuse feedback on them",
            path,
            exc.strerror or exc,
        )
        return None


def _answer_headers(sent: UpstreamBody, retried_from: str | None) -> dict[str, str]:
    """What the gateway says about how it answered: the pool lines of the few-shot examples it
    added, and the version it could not connect to before this one answered."""
    headers: dict[str, str] = {}
    if sent.few_shot is not None:
        headers[FEW_SHOT_HEADER] = sent.few_shot
    if retried_from is not None:
        headers[RETRIED_FROM_HEADER] = retried_from
    return headers


def _check_model(model: str | None, deployment: str) -> None:
    if not model:
        raise invalid_request(f"model is required (this gateway serves the model {deployment!r})", "model")
    if model != deployment:
        raise GatewayError(
            404,
            f"the model {model!r} does not exist here; this gateway serves {deployment!r}",
            param="model",
            error_type="invalid_request_error",
            code="model_not_found",
        )


def _route(
    state: GatewayState, request: Request, user: str | None, unavailable: frozenset[str]
) -> str | None:
    """The version the request is for (pinned, sticky or by weight among the ready), None when no
    version with a weight is ready; a pinned version is returned even when it is not ready."""
    routing = state.config.routing
    override = request.headers.get(routing.override_header)
    if routing.sticky_by == "user":
        key = user
    else:
        assert routing.header is not None
        key = request.headers.get(routing.header)
    try:
        return state.router.choose(key, override, routing.override_header, unavailable)
    except UnknownVersionError as exc:
        raise invalid_request(str(exc), routing.override_header) from exc
    except NoVersionAvailable:
        return None


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
            Route("/readyz", gateway.readyz, methods=["GET"]),
            Route("/metrics", gateway.metrics_endpoint, methods=["GET"]),
        ],
        middleware=[Middleware(DefaultHeadersMiddleware)],
        exception_handlers={HTTPException: http_error},
        lifespan=gateway.lifespan,
    )
    app.state.gateway = gateway
    return app
