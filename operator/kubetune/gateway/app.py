"""The gateway's HTTP surface: OpenAI-compatible endpoints in front of a deployment's versions.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming passes SSE through),
``GET /v1/models`` and ``GET /v1/models/{model}`` (the deployment is the one model),
``POST /v1/feedback``, ``GET /v1/feedback/records``, ``GET /v1/experiments``, ``GET /healthz``,
``GET /readyz`` and ``GET /metrics``.
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
With ``feedback.capture`` the rated completions' redacted content is kept (``capture``) and read back
from ``/v1/feedback/records`` (scope ``admin``) by ``kubetune feedback export``.

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

Failures: with ``scaleFromZero`` (minReplicas 0) a request whose version could not be connected to
is held until the version answers again (it was scaled to zero before the config said so; see
kubetune.gateway.cold_start), then sent to it once more. Otherwise a request whose version could not
be connected to (nothing of it reached the version) is re-sent once to another ready version by
weight, unless the override header pinned it; the answer
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
import copy
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
from kubetune.gateway.capture import (
    CaptureUnavailable,
    ContentRedactor,
    FeedbackCapture,
    SentText,
    answer_text,
)
from kubetune.gateway.cold_start import ColdStartHolds
from kubetune.gateway.config import ConfigReloader, ConstitutionConfig, GatewayConfig, PromptConfig
from kubetune.gateway.constitution import (
    VIOLATED_HEADER,
    CritiqueUnreadable,
    as_event_stream,
    check_request,
    critique_request,
    draft_text,
    revised_answer,
    revision_request,
    total_usage,
    violated_principles,
)
from kubetune.gateway.errors import GatewayError, invalid_request
from kubetune.gateway.experiments import ExperimentsUnavailable, ExperimentTracker
from kubetune.gateway.feedback import (
    RATED_TTL_SECONDS,
    ResponseIds,
    already_rated,
    parse_feedback,
    unknown_completion,
)
from kubetune.gateway.fewshot import FEW_SHOT_HEADER, PoolCache
from kubetune.gateway.generation import (
    CHAT_ENDPOINT,
    COMPLETIONS_ENDPOINT,
    apply_generation,
    parse_openai_request,
)
from kubetune.gateway.guards import GuardPipeline, GuardRefusal
from kubetune.gateway.health import UpstreamHealth
from kubetune.gateway.metrics import GatewayMetrics
from kubetune.gateway.prompts import apply_prompt
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
    attempt_limits,
    send_with_fallback,
)
from kubetune_guardrails.decisions import GuardDecision

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
    guards: GuardPipeline | None = None
    content: ContentRedactor | None = None  # set when prompts and completions are kept (redacted)

    @classmethod
    def build(cls, config: GatewayConfig) -> GatewayState:
        return cls(
            guards=GuardPipeline.build(config.guardrails) if config.guardrails is not None else None,
            content=ContentRedactor.for_config(config),
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
        self.capture = FeedbackCapture(config.feedback, self.access.shared_redis())
        self.cache = ResponseCache(config.cache.max_entries, config.cache.ttl_seconds)
        configured_signing_key = _signing_key(config)
        self.response_ids = ResponseIds(configured_signing_key)
        self._signing_key_of_process = configured_signing_key is None
        self.upstream = UpstreamClient()
        self.health = UpstreamHealth()
        self.holds = ColdStartHolds(self.metrics, lambda: self.state.config)
        self.few_shot_pools = PoolCache()
        self.started_at = int(time.time())
        self._background: set[asyncio.Task[None]] = set()

    def apply_config(self, config: GatewayConfig) -> None:
        previous = self.state.config
        self.state = GatewayState.build(config)
        self.access.configure(config)
        self.experiments.shared = self.access.shared_statistics()
        if config.feedback != previous.feedback or self.access.shared_redis() != self.capture.shared:
            self.capture = FeedbackCapture(config.feedback, self.access.shared_redis())
        if config.access.signing_key_file != previous.access.signing_key_file:
            configured_signing_key = _signing_key(config)
            self.response_ids = ResponseIds(configured_signing_key)
            self._signing_key_of_process = configured_signing_key is None
        if config.cache.enabled:
            self.cache.configure(config.cache.max_entries, config.cache.ttl_seconds)
        else:
            self.cache.clear()

    def _adopt_signing_key(self, key: bytes) -> None:
        """A signing key seen in the key Secret replaces this process's own (the Secret was created after
        the pod started, so its mounted copy was missing): from now on every replica's ids agree."""
        if self._signing_key_of_process:
            log.info("signing response ids with the key Secret's signing key from now on")
            self.response_ids = ResponseIds(key)
            self._signing_key_of_process = False

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.upstream.open()
        reload_task = asyncio.create_task(self.reloader.run()) if self.reloader is not None else None
        key_watch = self.access.key_watch(on_signing_key=self._adopt_signing_key)
        watch_task = asyncio.create_task(key_watch.run()) if key_watch is not None else None
        try:
            yield
        finally:
            for task in (reload_task, watch_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await self.holds.close()
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
            if response.status_code == 200:
                await self._hold_for_feedback(exchange, endpoint)
        return response

    async def _hold_for_feedback(self, exchange: Exchange, endpoint: str) -> None:
        if self.capture.on and exchange.prompt is not None and exchange.completion is not None:
            await self.capture.hold(
                exchange.request_id, exchange.version, endpoint, exchange.prompt, exchange.completion
            )

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
            if state.content is not None:  # the client's prompt, before guards and templates change it
                exchange.prompt = state.content.prompt(endpoint == CHAT_ENDPOINT, body)
            unavailable = self.health.unavailable(state.config)
            asleep = self.holds.asleep(state.config) - self.health.down()
            chosen = _route(state, request, parsed.user, unavailable - asleep)
            if chosen is not None:
                version = chosen
            apply_generation(endpoint, body, state.config.generation)
            if state.guards is not None:
                self._guard_input(state, endpoint, exchange, body)
            if chosen in asleep:  # scaling up from zero: wait for it rather than send its share elsewhere
                await self.holds.hold(state.config, chosen)
                unavailable -= {chosen}
            version = self._ready_version(state, chosen, unavailable)
            stream_usage: bool | None = None  # a stream the gateway writes itself: with a usage chunk?
            if _constitution(state, version) is not None:
                check_request(endpoint, body, version)
                if parsed.stream:  # the answer is critiqued whole, then streamed
                    options = body.pop("stream_options", None)
                    body.pop("stream")
                    stream_usage = isinstance(options, dict) and options.get("include_usage") is True
            upstream = self._upstream_body(state, endpoint, version, body)
            if chosen is not None and version != chosen:  # the fallback stands in for a version not ready
                self._count_fallback(state, chosen, version)
            exchange.version = version
            # a client that pinned its version asked for that one, not for any other
            pinned = request.headers.get(state.config.routing.override_header) is not None
            retry = None if pinned else self._retry_elsewhere(state)
            with self.metrics.open_request(state.config.deployment, version):
                if parsed.stream and stream_usage is None:
                    return await self._stream(state, endpoint, exchange, upstream, body, retry)
                return await self._complete(state, endpoint, exchange, upstream, body, retry, stream_usage)
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
        applied = apply_prompt(
            endpoint,
            body,
            state.prompts[version],
            version,
            self.few_shot_pools,
            state.config.generation.max_prompt_tokens,
        )
        upstream, few_shot_lines = applied.body, applied.few_shot
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
        if state.guards is not None:
            state.guards.prepare_upstream(endpoint == CHAT_ENDPOINT, upstream)
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
        stream_usage: bool | None = None,
    ) -> Response:
        """A non-streaming answer; with ``stream_usage`` set, sent as a stream (with a usage chunk
        when it is True) once the constitution's passes are done."""
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
                answer = self._guard_answer(state, endpoint, exchange, upstream, dict(hit.body))
                headers = _answer_headers(upstream, None)
                return self._answer(exchange, hit.version, answer, headers, stream_usage)
            self.metrics.child(self.metrics.cache_misses, deployment).inc()

        attempt, sent = await send_with_fallback(
            state.config,
            upstream,
            functools.partial(self._upstream_body, state, endpoint, body=body),
            functools.partial(self._post, state, endpoint, request_id),
            functools.partial(self._count_fallback, state),
            functools.partial(self._unavailable_now, state),
            retry,
            functools.partial(self.holds.wake, state.config),
        )
        violated: list[str] | None = None
        if attempt.code == 200 and endpoint == CHAT_ENDPOINT:
            violated = await self._critique_and_revise(state, request_id, attempt, sent)
        if attempt.code == 200:
            if attempt.version == version:
                if key is not None:
                    self.cache.put(key, version, dict(attempt.body))
            elif state.config.cache.enabled and is_deterministic(sent.body):
                fallback_key = cache_key(endpoint, attempt.version, state.urls[attempt.version], sent.body)
                self.cache.put(fallback_key, attempt.version, dict(attempt.body))

        exchange.version = attempt.version
        extra_headers = _answer_headers(sent, attempt.retried_from)
        if violated is not None:
            extra_headers[VIOLATED_HEADER] = ",".join(violated)
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
        answer = self._guard_answer(state, endpoint, exchange, sent, attempt.body)
        return self._answer(exchange, attempt.version, answer, extra_headers, stream_usage)

    # -- guards (spec.guardrails) ------------------------------------------------------------

    def _record_guards(
        self, state: GatewayState, exchange: Exchange, stage: str, decisions: list[GuardDecision]
    ) -> None:
        deployment = state.config.deployment
        for decision in decisions:
            self.metrics.child(
                self.metrics.guard_decisions, deployment, decision.guard, decision.action, stage
            ).inc()
            if decision.action != "pass":
                exchange.guards.append({"stage": stage, **decision.audit_record()})

    def _guard_input(
        self, state: GatewayState, endpoint: str, exchange: Exchange, body: dict[str, Any]
    ) -> None:
        if state.guards is None:
            return
        try:
            decisions = state.guards.check_input(endpoint == CHAT_ENDPOINT, body)
        except GuardRefusal as refusal:
            self._record_guards(state, exchange, "input", [refusal.decision])
            raise
        self._record_guards(state, exchange, "input", decisions)

    def _guard_answer(
        self, state: GatewayState, endpoint: str, exchange: Exchange, sent: UpstreamBody, body: dict[str, Any]
    ) -> dict[str, Any]:
        """The answer as the output guards leave it (a copy: a cached body stays as the model wrote it)."""
        if state.guards is None:
            return body
        guarded = copy.deepcopy(body)
        try:
            decisions = state.guards.check_answer(endpoint == CHAT_ENDPOINT, sent.body, guarded)
        except GuardRefusal as refusal:
            self._record_guards(state, exchange, "output", [refusal.decision])
            raise
        self._record_guards(state, exchange, "output", decisions)
        return guarded

    def _answer(
        self,
        exchange: Exchange,
        version: str,
        body: dict[str, Any],
        extra_headers: dict[str, str],
        stream_usage: bool | None = None,
    ) -> Response:
        response_id = self.response_ids.sign(exchange.request_id, version)
        exchange.request_id = response_id
        body["id"] = response_id
        content = self.state.content
        if content is not None and (text := answer_text(body)) is not None:
            exchange.completion = content.text(text)
        headers = {**tracing_headers(response_id, version), **extra_headers}
        if stream_usage is not None:
            return Response(
                as_event_stream(body, stream_usage), media_type="text/event-stream", headers=headers
            )
        return json_response(body, headers)

    async def _critique_and_revise(
        self, state: GatewayState, request_id: str, attempt: Attempt, sent: UpstreamBody
    ) -> list[str] | None:
        """Apply the answering version's constitution to ``attempt``'s answer (its body is replaced
        by the revision, usage by that of every pass); the principles found violated, None when the
        version has no constitution or the answer is no text to critique."""
        version = attempt.version
        constitution = _constitution(state, version)
        draft = draft_text(attempt.body)
        if constitution is None or draft is None:
            return None
        deployment = state.config.deployment
        critique = await self._extra_pass(
            state, request_id, version, critique_request(sent.body, draft, constitution), "critique"
        )
        try:
            violated = violated_principles(critique, constitution)
        except CritiqueUnreadable as error:
            log.error("version %s, request %s: %s", version, request_id, error)
            raise GatewayError(
                502, f"version {version!r} answered, but its critique could not be read; see the gateway log"
            ) from error
        verdict = "violates" if violated else "complies"
        self.metrics.child(self.metrics.constitution_critiques, deployment, version, verdict).inc()
        usages = [attempt.body.get("usage"), critique.get("usage")]
        if violated and constitution.revise:
            revision = await self._extra_pass(
                state,
                request_id,
                version,
                revision_request(sent.body, draft, violated, constitution),
                "revision",
            )
            for principle in violated:
                self.metrics.child(self.metrics.constitution_revisions, deployment, version, principle).inc()
            attempt.body = revised_answer(attempt.body, revision)
            usages.append(revision.get("usage"))
        attempt.body["usage"] = total_usage(usages)
        return violated

    async def _extra_pass(
        self, state: GatewayState, request_id: str, version: str, body: dict[str, Any], purpose: str
    ) -> dict[str, Any]:
        """One more generation on ``version`` for the same request (a critique or a revision)."""
        url = state.endpoint_urls[version, CHAT_ENDPOINT]
        limits = attempt_limits(state.config, fallback_bounds=False)
        attempt = await self.upstream.post(url, request_id, version, body, limits)
        self._note_reachability(state, attempt)
        self.metrics.record_attempt(
            state.config.deployment, version, CHAT_ENDPOINT, attempt.code, attempt.duration
        )
        if not attempt.succeeded or not isinstance(attempt.body, dict):
            log.error(
                "version %s, request %s: the %s pass failed: %s (%s)",
                version,
                request_id,
                purpose,
                attempt.failure or "an error answer",
                attempt.raw[:500],
            )
            raise GatewayError(
                504 if attempt.timed_out else 502,
                f"version {version!r} answered, but its {purpose} pass failed"
                + (f": {attempt.failure}" if attempt.failure else "")
                + "; the answer is not returned unchecked",
            )
        return attempt.body

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
        if attempt.unreachable and state.config.scale_from_zero is not None:
            self.holds.found_asleep(attempt.version)  # scaled to zero before the config says so
        elif attempt.unreachable:
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
            functools.partial(self.holds.wake, state.config),
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
        sent_text = SentText() if state.content is not None else None

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
            if sent_text is not None and state.content is not None:
                exchange.completion = state.content.text(sent_text.text)
            self.access.finish(exchange, code)
            refused = any(guard.get("action") == "block" for guard in exchange.guards)
            if code == 200 and exchange.decision == "served" and not refused:  # a whole answer only
                hold = asyncio.create_task(self._hold_for_feedback(exchange, endpoint))
                self._background.add(hold)
                hold.add_done_callback(self._background.discard)

        return relay_stream(
            attempt,
            response_id,
            sent.added_usage,
            headers,
            idle=WaitLimit(state.config.timeouts.stream_idle_seconds, "timeouts.streamIdleSeconds"),
            on_usage=on_usage,
            on_finished=on_finished,
            settle=charge_usage,
            guard=(
                state.guards.stream_guard(
                    endpoint == CHAT_ENDPOINT,
                    sent.body,
                    functools.partial(self._record_guards, state, exchange, "output"),
                )
                if state.guards is not None
                else None
            ),
            on_sent=sent_text.add if sent_text is not None else None,
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
        """OpenAI's model object; ``model_card`` links the control version's model card, ``model_cards``
        every version's (a version serving a published FineTuneJob or QuantizeJob model has one)."""
        document: dict[str, Any] = {
            "id": deployment,
            "object": "model",
            "created": self.started_at,
            "owned_by": "kubetune",
        }
        config = self.state.config
        cards = {
            version.name: version.model_card.model_dump(by_alias=True)
            for version in config.versions
            if version.model_card is not None
        }
        if cards:
            control = config.control_version
            document["model_card"] = {"version": control, **cards[control]} if control in cards else None
            document["model_cards"] = cards
        return document

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
            await self.capture.rate(rated_id, score)
            document = {"requestId": rated_id, "version": version, "score": score}
            return json_response(document, tracing_headers(exchange.request_id, version))

        return await self._guarded(request, Scope.FEEDBACK, answer)

    async def feedback_records(self, request: Request) -> Response:
        """``GET /v1/feedback/records``: the rated completions' content (spec.feedback.capture)."""

        async def answer(exchange: Exchange) -> Response:
            if not self.capture.on:
                raise GatewayError(
                    404,
                    "this deployment keeps no feedback content: set spec.feedback.capture: true",
                    error_type="not_found_error",
                    code="feedback_capture_off",
                )
            try:
                records = await self.capture.records()
            except CaptureUnavailable as exc:
                log.error("%s", exc)
                raise GatewayError(
                    503,
                    "the feedback records cannot be read now; retry shortly",
                    error_type="service_unavailable",
                    retry_after=1,
                ) from exc
            return json_response({"object": "list", "data": records})

        return await self._guarded(request, Scope.ADMIN, answer)

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
            "keysError": self.access.keyring.error or self.access.keyring.watch_error,
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


def _constitution(state: GatewayState, version: str) -> ConstitutionConfig | None:
    prompt = state.prompts[version]
    return prompt.constitution if prompt is not None else None


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
            Route("/v1/feedback/records", gateway.feedback_records, methods=["GET"]),
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
