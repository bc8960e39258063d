"""Passing a version's stream on to the client: SSE events re-framed one by one, and a response that
always lets go of the upstream.

A stream that breaks after it started ends with an SSE ``error`` event, which OpenAI clients raise
as an error (a cut connection would look like a complete answer to some of them). A stream silent
for longer than ``timeouts.streamIdleSeconds`` is given up on the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kubetune.gateway.errors import openai_error
from kubetune.gateway.responses import json_bytes
from kubetune.gateway.upstream import Attempt, WaitLimit, describe

log = logging.getLogger(__name__)

StreamFinished = Callable[[int, float, "float | None"], None]
"""(status code to record, when the stream finished, when its first text arrived) — called once."""


class ChunkGuard(Protocol):
    """Output guards on a stream (kubetune.gateway.guards.StreamGuard): rewrites each JSON chunk,
    returns the chunks with held-back text at the end, and sets ``refusal`` (an OpenAI error body)
    when the rest of the stream must not reach the client."""

    refusal: dict[str, Any] | None

    def chunk(self, chunk: dict[str, Any]) -> dict[str, Any] | None: ...

    def done(self) -> list[dict[str, Any]]: ...


class StreamRefused(Exception):
    """A guard refused the rest of the stream; the relay ends it with this error event."""

    def __init__(self, error: dict[str, Any], sent: bytes) -> None:
        super().__init__("a guard refused the stream")
        self.error = error
        self.sent = sent


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
        guard: ChunkGuard | None = None,
        on_sent: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._guard = guard
        self._on_sent = on_sent
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
            if self._guard is not None and self._guard.refusal is not None:
                raise StreamRefused(self._guard.refusal, b"".join(out))
            if rewritten is not None:
                out.append(rewritten + b"\n\n")
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        held = self._held_back()
        if not rest.strip():
            return held
        rewritten = self._event(rest.rstrip(b"\n"))
        return held + (b"" if rewritten is None else rewritten + b"\n\n")

    def _held_back(self) -> bytes:
        """The guards' held-back text as chunks (once), before the stream's end."""
        if self._guard is None:
            return b""
        chunks = self._guard.done()
        if self._guard.refusal is not None:
            raise StreamRefused(self._guard.refusal, b"")
        self._guard = None
        if self._on_sent is not None:
            for chunk in chunks:
                self._on_sent(chunk)
        return b"".join(
            b"data: " + json_bytes({**chunk, "id": self._request_id}) + b"\n\n" for chunk in chunks
        )

    def _event(self, event: bytes) -> bytes | None:
        lines = event.split(b"\n")
        data_lines = [line for line in lines if line.startswith(b"data:")]
        if not data_lines:
            return event
        data = b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in data_lines)
        if data.strip() == b"[DONE]":
            return self._held_back() + event
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
        if self._guard is not None and chunk.get("choices"):
            guarded = self._guard.chunk(chunk)
            if guarded is None:
                return None
            chunk = guarded
        if not self._seen_text and _has_generated_text(chunk):
            self._seen_text = True
            self._on_first_text()
        if "id" in chunk:
            chunk["id"] = self._request_id
        if self._on_sent is not None:
            self._on_sent(chunk)
        other_lines = [line for line in lines if not line.startswith(b"data:")]
        return b"\n".join([*other_lines, b"data: " + json_bytes(chunk)])


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


def relay_stream(
    attempt: Attempt,
    request_id: str,
    drop_usage_chunks: bool,
    headers: dict[str, str],
    idle: WaitLimit,
    on_usage: Callable[[Any], None],
    on_finished: StreamFinished,
    settle: Callable[[], Awaitable[None]] | None = None,
    guard: ChunkGuard | None = None,
    on_sent: Callable[[dict[str, Any]], None] | None = None,
) -> RelayedStream:
    """The client's response for a stream ``attempt`` opened (its first chunk already read); each
    later chunk must come within ``idle``.

    The upstream is released and ``on_finished`` called once: when the upstream is done (before the
    client sees the end of the response, so the metrics are there when it asks), or when the client
    goes away first. ``settle`` (when given) is awaited after each chunk that reported usage and
    before that chunk is passed on, so what it records is in place before the client reads the end.
    ``guard`` (when given) rewrites the answer's text; when it refuses, the client gets what was
    already sent, then an error event with the guard's code, and the upstream is let go. ``on_sent``
    (when given) sees each JSON chunk as the client gets it."""
    response, chunks = attempt.stream, attempt.chunks
    if response is None or chunks is None:
        raise ValueError(f"the attempt on version {attempt.version!r} holds no open stream")
    version = attempt.version
    code = attempt.code
    first_text_at: float | None = None
    finished = False

    def on_first_text() -> None:
        nonlocal first_text_at
        first_text_at = time.perf_counter()

    usage_seen = False

    def note_usage(usage: Any) -> None:
        nonlocal usage_seen
        usage_seen = True
        on_usage(usage)

    async def settled(out: bytes) -> bytes:
        nonlocal usage_seen
        if usage_seen and settle is not None:
            usage_seen = False
            await settle()
        return out

    relay = SseRelay(
        request_id,
        drop_usage_chunks,
        on_usage=note_usage,
        on_first_text=on_first_text,
        guard=guard,
        on_sent=on_sent,
    )
    is_sse = attempt.content_type.startswith("text/event-stream")

    def finish() -> None:
        nonlocal finished
        if finished:
            return
        finished = True
        response.release()  # back to the pool when read to the end, closed when cut short
        on_finished(code, time.perf_counter(), first_text_at)

    async def body() -> AsyncIterator[bytes]:
        nonlocal code
        try:
            out = await settled(relay.feed(attempt.first_chunk) if is_sse else attempt.first_chunk)
            if out:
                yield out
            while True:
                async with asyncio.timeout(idle.seconds):
                    chunk = await anext(chunks, None)
                if chunk is None:
                    break
                out = await settled(relay.feed(chunk) if is_sse else chunk)
                if out:
                    yield out
            tail = await settled(relay.flush() if is_sse else b"")
            finish()
            if tail:
                yield tail
        except StreamRefused as refused:
            finish()
            if refused.sent:
                yield refused.sent
            yield b"data: " + json_bytes(refused.error) + b"\n\n"
        except Exception as exc:  # whatever broke, the client gets an error event, not a cut stream
            timed_out = isinstance(exc, TimeoutError)
            code = 504 if timed_out else 502
            if timed_out:
                reason = f"no bytes within {idle}"
            elif isinstance(exc, aiohttp.ClientError):
                reason = "the connection to it broke"
            else:
                reason = "the gateway failed relaying it; see its log"
            if isinstance(exc, aiohttp.ClientError | TimeoutError):
                log.warning("stream %s from version %s broke: %s", request_id, version, describe(exc))
            else:
                log.exception("relaying stream %s from version %s failed", request_id, version)
            error = openai_error(
                f"version {version!r} stopped answering mid-stream: {reason}",
                error_type="server_error",
                code="upstream_timeout" if timed_out else "upstream_error",
            )
            finish()
            yield b"data: " + json_bytes(error) + b"\n\n"

    async def on_close() -> None:
        finish()

    return RelayedStream(body(), on_close, headers=headers, media_type=attempt.content_type)
