"""The gateway's side of the versions: one pooled HTTP client, and the retries on other versions.

When the chosen version cannot be connected to (refused, or no connection within
``timeouts.connectSeconds``: nothing of the request reached it), the request is re-sent once to
another ready version chosen by weight (``RetryElsewhere``; the caller leaves it out for a request
pinned to its version by the override header), and the answer names the first version in
``x-kubetune-retried-from``. Then a connect error, a timeout or a 5xx is retried once on the fallback
version (a stream only until its first chunk: after that bytes have reached the client); when that
fails too, or there is no fallback, ``send_with_fallback`` raises the GatewayError the client gets:
503 with Retry-After when the version could not be connected to, 504 when it ran out of time (the
message names the setting), else 502.

Every wait is bounded by a setting (``AttemptLimits``). What the client reads says what failed in
plain words; the exception behind it (aiohttp's class, errno text) goes to the log only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from kubetune.gateway.config import GatewayConfig
from kubetune.gateway.errors import GatewayError
from kubetune.gateway.responses import REQUEST_ID_HEADER, json_bytes

log = logging.getLogger(__name__)

# Connections to the versions, pooled and kept alive. The limit bounds what one gateway opens to all
# versions together; keep-alive stays below uvicorn's default 5 s (the BentoML servers run on it) so
# the gateway never sends on a connection the server is closing as idle.
UPSTREAM_CONNECTION_LIMIT = 512
UPSTREAM_KEEPALIVE_SECONDS = 4.0
RETRIED_FROM_HEADER = "x-kubetune-retried-from"
"""On an answer from a version the request was re-sent to: the version that could not be reached."""


@dataclass(frozen=True)
class UpstreamBody:
    """The body sent to ``version``, whether the gateway added the usage chunk to a stream, and the
    few-shot header naming the pool lines put in the prompt (None: the prompt has no pool)."""

    version: str
    body: dict[str, Any]
    added_usage: bool
    few_shot: str | None = None


@dataclass(frozen=True)
class WaitLimit:
    """A bound on one wait, and the config setting it comes from (named when it runs out)."""

    seconds: float
    setting: str

    def __str__(self) -> str:
        return f"{self.setting} ({self.seconds:g}s)"


@dataclass(frozen=True)
class AttemptLimits:
    """The bounds of one attempt on a version."""

    connect: WaitLimit
    first_byte: WaitLimit  # to the answer's headers; for a stream, to its first chunk
    response: WaitLimit  # a whole non-streaming answer


def _tighter(limit: WaitLimit, other: WaitLimit) -> WaitLimit:
    return limit if limit.seconds <= other.seconds else other


def attempt_limits(config: GatewayConfig, *, fallback_bounds: bool) -> AttemptLimits:
    """The limits from ``config.timeouts``; with ``fallback_bounds``, the answer's waits are cut to
    ``fallback.timeoutSeconds`` too (an attempt a fallback can step in for, or the fallback's own)."""
    timeouts = config.timeouts
    first_byte = WaitLimit(timeouts.first_byte_seconds, "timeouts.firstByteSeconds")
    response = WaitLimit(timeouts.response_seconds, "timeouts.responseSeconds")
    if fallback_bounds and config.fallback is not None:
        fallback = WaitLimit(config.fallback.timeout_seconds, "fallback.timeoutSeconds")
        first_byte, response = _tighter(first_byte, fallback), _tighter(response, fallback)
    return AttemptLimits(WaitLimit(timeouts.connect_seconds, "timeouts.connectSeconds"), first_byte, response)


@dataclass
class Attempt:
    """The outcome of one upstream attempt (non-streaming, or a stream before its first chunk)."""

    version: str
    code: int  # upstream status, or 502 / 504 when it failed / timed out
    failure: str | None  # why it counts as failed, in words a client may read; None if it did not
    unreachable: bool = False  # no connection could be made: nothing reached the version
    body: Any = None  # parsed JSON of a 2xx answer
    raw: bytes = b""  # the upstream's bytes of a non-2xx answer
    content_type: str = "application/json"
    stream: aiohttp.ClientResponse | None = None
    chunks: AsyncIterator[bytes] | None = None
    first_chunk: bytes = b""
    started: float = 0.0
    duration: float = 0.0  # until the answer was read, or the stream's first chunk arrived
    retried_from: str | None = None  # the unreachable version this request was first sent to

    @property
    def timed_out(self) -> bool:
        return self.code == 504 and self.failure is not None

    @property
    def succeeded(self) -> bool:
        return self.failure is None and 200 <= self.code < 300

    def fail(
        self, code: int, failure: str, cause: BaseException | None = None, *, unreachable: bool = False
    ) -> None:
        self.code, self.failure, self.unreachable = code, failure, unreachable
        if cause is not None:
            log.warning("version %s: %s (%s)", self.version, failure, describe(cause))


def describe(exc: BaseException) -> str:
    """An exception for the log (never for a client: it names library classes and errno text)."""
    return f"{type(exc).__name__}: {exc or 'request failed'}"


def _fail_on_error(
    attempt: Attempt, exc: BaseException, limits: AttemptLimits, answer_wait: WaitLimit
) -> None:
    """Record why an attempt failed: ``answer_wait`` is the limit that was running when ``exc`` (a
    TimeoutError of it, or aiohttp's) came."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        attempt.fail(504, f"could not connect within {limits.connect}", exc, unreachable=True)
    elif isinstance(exc, aiohttp.ClientConnectorError):
        attempt.fail(502, "could not connect to it", exc, unreachable=True)
    elif isinstance(exc, TimeoutError):
        attempt.fail(504, f"no answer within {answer_wait}", exc)
    else:
        attempt.fail(502, "the connection to it broke", exc)


def _preview(raw: bytes) -> str:
    return raw[:200].decode(errors="replace")


def _server_error(attempt: Attempt, status: int, raw: bytes) -> None:
    # the version's error body stays in the log: a model server's 500 may carry its traceback
    attempt.fail(status, f"HTTP {status}")
    log.warning("version %s answered HTTP %s: %s", attempt.version, status, _preview(raw))


class UpstreamClient:
    """The pooled aiohttp session to the versions, opened and closed by the app's lifespan."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=UPSTREAM_CONNECTION_LIMIT, keepalive_timeout=UPSTREAM_KEEPALIVE_SECONDS
            ),
            # every request sets its own timeouts; none here, so a long stream is never cut at 5 min
            timeout=aiohttp.ClientTimeout(),
            # a proxy must not keep one client's cookies and send them with another's requests
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(
                "the gateway's upstream session is opened by the app's lifespan: serve the app with "
                "lifespan events on"
            )
        return self._session

    async def _send(
        self, url: URL, headers: dict[str, str], body: dict[str, Any], limits: AttemptLimits
    ) -> aiohttp.ClientResponse:
        return await self.session.post(
            url,
            data=json_bytes(body),
            headers=headers,
            # only the connect is left to aiohttp: the caller bounds the rest with asyncio.timeout
            timeout=aiohttp.ClientTimeout(sock_connect=limits.connect.seconds),
        )

    async def post(
        self, url: URL, request_id: str, version: str, body: dict[str, Any], limits: AttemptLimits
    ) -> Attempt:
        """One non-streaming request, its headers within ``limits.first_byte`` and the whole answer
        within ``limits.response``."""
        started = time.perf_counter()
        attempt = Attempt(version=version, code=502, failure=None, started=started)
        headers = {"content-type": "application/json", REQUEST_ID_HEADER: request_id}
        whole_answer = asyncio.timeout(limits.response.seconds)
        first_byte = asyncio.timeout(limits.first_byte.seconds)
        try:
            async with whole_answer:
                async with first_byte:
                    response = await self._send(url, headers, body, limits)
                try:
                    raw = await response.read()
                finally:
                    response.release()
        except (aiohttp.ClientError, TimeoutError) as exc:
            ran_out = limits.first_byte if first_byte.expired() else limits.response
            _fail_on_error(attempt, exc, limits, ran_out)
        else:
            attempt.code = response.status
            attempt.content_type = response.headers.get("content-type", "application/json")
            if response.status >= 500:
                _server_error(attempt, response.status, raw)
            elif 200 <= response.status < 300:
                try:
                    attempt.body = json.loads(raw)
                except ValueError:
                    attempt.body = None
                if not isinstance(attempt.body, dict):
                    attempt.fail(502, "the answer is not a JSON object")
            else:
                attempt.raw = raw
        attempt.duration = time.perf_counter() - started
        return attempt

    async def open_stream(
        self, url: URL, request_id: str, version: str, body: dict[str, Any], limits: AttemptLimits
    ) -> Attempt:
        """Send the request and wait for the first chunk (within ``limits.first_byte``); until then a
        failure can still fall back. The attempt holds the open stream when it started (``stream``
        is then not None); its caller reads the rest and releases it."""
        started = time.perf_counter()
        attempt = Attempt(version=version, code=502, failure=None, started=started)
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream",
            REQUEST_ID_HEADER: request_id,
        }
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(limits.first_byte.seconds):
                response = await self._send(url, headers, body, limits)
                attempt.code = response.status
                attempt.content_type = response.headers.get("content-type", "text/event-stream")
                if response.status >= 500:
                    _server_error(attempt, response.status, await response.read())
                elif not 200 <= response.status < 300:
                    attempt.raw = await response.read()
                else:
                    chunks = response.content.iter_any()
                    attempt.first_chunk = await anext(chunks)  # iter_any yields no empty chunks
                    attempt.stream, attempt.chunks = response, chunks
        except StopAsyncIteration:
            attempt.fail(502, "the stream ended before its first chunk")
        except (aiohttp.ClientError, TimeoutError) as exc:
            _fail_on_error(attempt, exc, limits, limits.first_byte)
        if attempt.stream is None and response is not None:
            response.release()
        attempt.duration = time.perf_counter() - started
        return attempt


def failed(
    config: GatewayConfig, first: Attempt, fallback: Attempt | None, extra: str | None = None
) -> GatewayError:
    """The error that tells the client no version could answer: 503 with Retry-After when the last
    attempt could not connect (the version is marked down for ``health.markDownSeconds``), 504 when
    it ran out of time, else 502."""
    final = fallback if fallback is not None else first
    message = f"version {first.version!r} failed: {first.failure}"
    if fallback is not None:
        message += f"; the fallback version {fallback.version!r} failed too: {fallback.failure}"
    if extra is not None:
        message += f"; {extra}"
    if final.unreachable:
        return GatewayError(
            503,
            message,
            error_type="service_unavailable",
            code="version_unreachable",
            retry_after=max(1, math.ceil(config.health.mark_down_seconds)),
        )
    if final.timed_out:
        return GatewayError(504, message, error_type="server_error", code="upstream_timeout")
    return GatewayError(502, message, error_type="server_error", code="upstream_error")


SendAttempt = Callable[[str, dict[str, Any], AttemptLimits], Awaitable[Attempt]]
"""(version, body, limits) -> the attempt."""


@dataclass(frozen=True)
class RetryElsewhere:
    """How a request whose version could not be connected to is re-sent once to another version.

    Only when nothing reached the version (``Attempt.unreachable``): a request that reached it may
    have been acted on, and is left to the fallback. Leave it out (None) for a request pinned to its
    version by the override header: that client asked for that version, not for any.
    """

    choose: Callable[[frozenset[str]], str | None]
    """Another version by weight, none of the given ones (the unreachable and the not ready); None
    when there is none (e.g. ``Router.another_by_weight``)."""
    on_retry: Callable[[str, str], None]
    """(unreachable version, version asked instead), called once the other version is really asked:
    count it."""


async def _send_elsewhere(
    retry: RetryElsewhere,
    unreachable: Attempt,
    body_for: Callable[[str], UpstreamBody],
    send: SendAttempt,
    limits: AttemptLimits,
    unavailable: Callable[[], frozenset[str]],
) -> tuple[Attempt, UpstreamBody] | None:
    """The attempt on another version and what was sent to it; None when no other version can take it."""
    other = retry.choose(frozenset({unreachable.version}) | unavailable())
    if other is None:
        return None
    try:
        other_upstream = body_for(other)
    except GatewayError as error:  # e.g. its prompt does not fit: it cannot stand in for this request
        log.warning(
            "version %s is unreachable; %s cannot take its request: %s", unreachable.version, other, error
        )
        return None
    retry.on_retry(unreachable.version, other)
    log.warning("version %s is unreachable; re-sending the request to %s", unreachable.version, other)
    attempt = await send(other, other_upstream.body, limits)
    attempt.retried_from = unreachable.version
    return attempt, other_upstream


async def send_with_fallback(
    config: GatewayConfig,
    upstream: UpstreamBody,
    body_for: Callable[[str], UpstreamBody],
    send: SendAttempt,
    on_fallback: Callable[[str, str], None],
    unavailable: Callable[[], frozenset[str]],
    retry_elsewhere: RetryElsewhere | None = None,
    wake: Callable[[str], Awaitable[bool]] | None = None,
) -> tuple[Attempt, UpstreamBody]:
    """Send ``upstream`` to its version; when it cannot be connected to and ``retry_elsewhere`` is
    given, re-send the request once to another version it chooses; when that fails, send
    ``body_for(fallback)`` to the fallback (unless the fallback is in ``unavailable()`` by then, or
    is the version that failed).

    ``on_fallback(failed_version, fallback_version)`` is called once the fallback is really asked.
    ``wake(version)`` (when given) is first awaited for a version that could not be connected to: True
    when it held the request until the version, found scaled to zero, is ready again (it raises the
    hold's 503 otherwise), and the request is then sent to it once more.
    Attempts are bounded by ``fallback.timeoutSeconds`` as well as the ``timeouts``. Returns the
    attempt that answered and what was sent to it; raises the GatewayError of :func:`failed` when no
    version could answer."""
    fallback = config.fallback.version if config.fallback is not None else None
    can_fall_back = fallback is not None and fallback != upstream.version
    first = await send(upstream.version, upstream.body, attempt_limits(config, fallback_bounds=can_fall_back))
    if first.unreachable and wake is not None and await wake(first.version):
        first = await send(
            upstream.version, upstream.body, attempt_limits(config, fallback_bounds=can_fall_back)
        )
    if first.unreachable and retry_elsewhere is not None:
        elsewhere = await _send_elsewhere(
            retry_elsewhere,
            first,
            body_for,
            send,
            attempt_limits(config, fallback_bounds=fallback is not None),
            unavailable,
        )
        if elsewhere is not None:
            first, upstream = elsewhere
            if first.failure is None:
                return first, upstream
            can_fall_back = fallback is not None and fallback not in (upstream.version, first.retried_from)
    if first.failure is None or fallback is None or not can_fall_back:
        if first.failure is not None:
            raise failed(config, first, None)
        return first, upstream
    if fallback in unavailable():
        raise failed(config, first, None, extra=f"the fallback version {fallback!r} is not ready either")
    try:
        fallback_upstream = body_for(fallback)
    except GatewayError as error:
        raise failed(
            config, first, None, extra=f"the fallback {fallback!r} cannot take it: {error}"
        ) from error
    on_fallback(first.version, fallback)
    log.warning("version %s failed (%s); retrying on %s", first.version, first.failure, fallback)
    second = await send(fallback, fallback_upstream.body, attempt_limits(config, fallback_bounds=True))
    if second.failure is not None:
        raise failed(config, first, second)
    return second, fallback_upstream
