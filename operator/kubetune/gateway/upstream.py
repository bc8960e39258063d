"""The gateway's side of the versions: one pooled HTTP client, and the retry on the fallback version.

A connect error, a timeout or a 5xx from the chosen version is retried once on the fallback version
(a stream only until its first chunk: after that bytes have reached the client); when that fails
too, or there is no fallback, ``send_with_fallback`` raises the 502 (504 for a timeout) GatewayError.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
    duration: float = 0.0  # until the answer was read, or the stream's first chunk arrived

    @property
    def timed_out(self) -> bool:
        return self.code == 504 and self.failure is not None

    @property
    def succeeded(self) -> bool:
        return self.failure is None and 200 <= self.code < 300


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc or 'request failed'}"


def _preview(raw: bytes) -> str:
    return raw[:200].decode(errors="replace")


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

    async def post(
        self, url: URL, request_id: str, version: str, body: dict[str, Any], deadline: float
    ) -> Attempt:
        """One non-streaming request; ``deadline`` covers connecting and reading the whole answer."""
        started = time.perf_counter()
        attempt = Attempt(version=version, code=502, failure=None, started=started)
        try:
            async with self.session.post(
                url,
                data=json_bytes(body),
                headers={"content-type": "application/json", REQUEST_ID_HEADER: request_id},
                timeout=aiohttp.ClientTimeout(total=deadline),
            ) as response:
                raw = await response.read()
        except TimeoutError:
            attempt.code, attempt.failure = 504, f"no answer within {deadline:g}s"
        except aiohttp.ClientError as exc:
            attempt.code, attempt.failure = 502, describe(exc)
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
        attempt.duration = time.perf_counter() - started
        return attempt

    async def open_stream(
        self,
        url: URL,
        request_id: str,
        version: str,
        body: dict[str, Any],
        deadline: float,
        read_timeout: float,
    ) -> Attempt:
        """Send the request and wait for the first chunk; until then a failure can still fall back.

        ``deadline`` bounds the time to the first chunk; after it, each read may wait up to
        ``read_timeout`` (a stream may run long, but not stall). The attempt holds the open stream
        when it started (``stream`` is then not None); its caller releases it."""
        started = time.perf_counter()
        attempt = Attempt(version=version, code=502, failure=None, started=started)
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(deadline):
                response = await self.session.post(
                    url,
                    data=json_bytes(body),
                    headers={
                        "content-type": "application/json",
                        "accept": "text/event-stream",
                        REQUEST_ID_HEADER: request_id,
                    },
                    timeout=aiohttp.ClientTimeout(sock_connect=deadline, sock_read=read_timeout),
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
            attempt.code, attempt.failure = 502, describe(exc)
        if attempt.stream is None and response is not None:
            response.release()
        attempt.duration = time.perf_counter() - started
        return attempt


def first_deadline(config: GatewayConfig, version: str) -> float:
    """How long the chosen version gets: the fallback's timeout when a fallback can still step in."""
    if config.fallback is not None and config.fallback.version != version:
        return min(config.fallback.timeout_seconds, config.upstream_timeout_seconds)
    return config.upstream_timeout_seconds


def failed(first: Attempt, fallback: Attempt | None, extra: str | None = None) -> GatewayError:
    """The 502 (504 when the last attempt timed out) that tells the client no version could answer."""
    final = fallback if fallback is not None else first
    message = f"version {first.version!r} failed: {first.failure}"
    if fallback is not None:
        message += f"; the fallback version {fallback.version!r} failed too: {fallback.failure}"
    if extra is not None:
        message += f"; {extra}"
    if final.timed_out:
        return GatewayError(504, message, error_type="server_error", code="upstream_timeout")
    return GatewayError(502, message, error_type="server_error", code="upstream_error")


SendAttempt = Callable[[str, dict[str, Any], float], Awaitable[Attempt]]
"""(version, body, deadline) -> the attempt."""


async def send_with_fallback(
    config: GatewayConfig,
    upstream: UpstreamBody,
    body_for: Callable[[str], UpstreamBody],
    send: SendAttempt,
    on_fallback: Callable[[str, str], None],
) -> tuple[Attempt, UpstreamBody]:
    """Send ``upstream`` to its version, and when that fails, ``body_for(fallback)`` to the fallback.

    ``on_fallback(failed_version, fallback_version)`` is called once the fallback is really asked.
    Returns the attempt that answered and what was sent to it; raises the 502/504 GatewayError when
    no version could answer."""
    first = await send(upstream.version, upstream.body, first_deadline(config, upstream.version))
    fallback = config.fallback.version if config.fallback is not None else None
    if first.failure is None or fallback is None or fallback == first.version:
        if first.failure is not None:
            raise failed(first, None)
        return first, upstream
    try:
        fallback_upstream = body_for(fallback)
    except GatewayError as error:
        raise failed(first, None, extra=f"the fallback {fallback!r} cannot take it: {error}") from error
    on_fallback(first.version, fallback)
    log.warning("version %s failed (%s); retrying on %s", first.version, first.failure, fallback)
    second = await send(fallback, fallback_upstream.body, config.upstream_timeout_seconds)
    if second.failure is not None:
        raise failed(first, second)
    return second, fallback_upstream
