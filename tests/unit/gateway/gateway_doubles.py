"""Model-server doubles and loopback servers for the gateway tests.

``StubModelServer`` is a deterministic OpenAI-compatible server (a test double of the BentoML
serving runtime): it answers ``<name>: <last user text>``, streams that answer word by word, and
records every request body it received. Its ``behavior`` can be switched while it runs:
``echo``, ``reject`` (HTTP 400), ``error`` (HTTP 500), ``garbage`` (200 with HTML), ``slow``
(answers after ``delay_seconds``, or as soon as the behavior changes), ``drip`` (streams a word
every 0.2 s), ``stall-stream`` (a stream that stalls like ``slow`` after its first word) and
``break-stream`` (a stream that dies after its first word). ``hanging_connect_url`` is a version
address whose connects never complete.

Loopback servers come from ``asgi_server.serve_app``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kubetune.gateway.app import Gateway


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


class EscapedJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


class StubModelServer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.behavior = "echo"
        self.delay_seconds = 2.0
        self.received: list[dict[str, Any]] = []
        self.received_headers: list[dict[str, str]] = []
        self.url = ""
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
            ]
        )

    def reset(self) -> None:
        self.behavior = "echo"
        self.delay_seconds = 2.0
        self.received.clear()
        self.received_headers.clear()

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        user_messages = [m for m in body["messages"] if m.get("role") == "user"]
        text = f"{self.name}: {_text_of(user_messages[-1]['content']) if user_messages else ''}"
        prompt_words = sum(len(_text_of(m.get("content")).split()) for m in body["messages"])
        return await self._answer(request, body, "chat", text, prompt_words)

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        prompt = body["prompt"]
        first = prompt if isinstance(prompt, str) else str(prompt[0])
        text = f"{self.name}: {first}"
        return await self._answer(request, body, "text", text, len(first.split()))

    async def _answer(
        self, request: Request, body: dict[str, Any], kind: str, text: str, prompt_words: int
    ) -> Response:
        self.received.append(body)
        self.received_headers.append(dict(request.headers))
        if self.behavior == "reject":
            error = {"message": "prompt too long", "type": "invalid_request_error", "param": "messages"}
            return JSONResponse({"error": error}, status_code=400)
        if self.behavior == "garbage":
            return Response(b"<html>proxy error</html>", media_type="text/html")
        if self.behavior == "error":
            return JSONResponse(
                {"error": {"message": "model crashed", "type": "server_error"}}, status_code=500
            )
        if self.behavior == "slow":
            await self._stall("slow")
        usage = {
            "prompt_tokens": prompt_words,
            "completion_tokens": len(text.split()),
            "total_tokens": prompt_words + len(text.split()),
        }
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._chunks(kind, text, usage if include_usage else None), media_type="text/event-stream"
            )
        if kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            obj = "text_completion"
        # ASCII-escaped JSON, as a model server sends it: the echo may hold lone surrogates
        return EscapedJSONResponse(
            {
                "id": "upstream-id",
                "object": obj,
                "created": 1700000000,
                "model": body.get("model"),
                "choices": [choice],
                "usage": usage,
                "upstream_saw": {
                    k: v for k, v in body.items() if k in ("temperature", "top_p", "max_tokens")
                },
            }
        )

    async def _stall(self, behavior: str) -> None:
        """Wait delay_seconds, or less when the test moves on (behavior changed, reset): a long
        stall never keeps the server busy after its test."""
        deadline = time.monotonic() + self.delay_seconds
        while self.behavior == behavior and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _chunks(self, kind: str, text: str, usage: dict[str, int] | None) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            chunk = {
                "id": "upstream-id",
                "object": obj,
                "created": 1700000000,
                "model": "m",
                "choices": choices,
            }
            return b"data: " + json.dumps({**chunk, **extra}).encode() + b"\n\n"

        if kind == "chat":
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for position, word in enumerate(text.split()):
            piece = word if position == 0 else f" {word}"
            if kind == "chat":
                yield event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
            else:
                yield event([{"index": 0, "text": piece, "finish_reason": None}])
            if self.behavior == "stall-stream":
                await self._stall("stall-stream")
            if self.behavior == "drip":
                await asyncio.sleep(0.2)
            if self.behavior == "break-stream":
                raise RuntimeError("model server died mid-stream")
        if kind == "chat":
            yield event([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        else:
            yield event([{"index": 0, "text": "", "finish_reason": "stop"}])
        if usage is not None:
            yield event([], usage=usage)
        yield b"data: [DONE]\n\n"


@contextmanager
def hanging_connect_url() -> Iterator[str]:
    """A URL whose connects hang: a listening socket that never accepts, its backlog filled, so the
    kernel drops further handshakes (Linux) and only the client's connect timeout ends the wait."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            yield f"http://127.0.0.1:{port}"
        finally:
            for filler in fillers:
                filler.close()


GatewayServer = Callable[..., AbstractContextManager[tuple[str, Gateway]]]
"""The ``gateway_server`` fixture: ``with gateway_server(config) as (url, gateway)``."""


def base_config(stubs: dict[str, StubModelServer], **overrides: Any) -> dict[str, Any]:
    """A gateway config dict: alpha 80 / beta 20, sticky by user, no cache, no fallback."""
    config: dict[str, Any] = {
        "deployment": "support-bot",
        "namespace": "default",
        "versions": [
            {"name": "alpha", "url": stubs["alpha"].url, "weight": 80},
            {"name": "beta", "url": stubs["beta"].url, "weight": 20},
        ],
        "routing": {"stickyBy": "user", "overrideHeader": "x-kubetune-version"},
        "timeouts": {"firstByteSeconds": 10, "responseSeconds": 10, "streamIdleSeconds": 10},
    }
    config.update(overrides)
    return config


def chat_body(text: str = "hello there", **fields: Any) -> dict[str, Any]:
    return {"model": "support-bot", "messages": [{"role": "user", "content": text}], **fields}


def metric_value(metrics_text: str, sample_name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def attempts(metrics_text: str, version: str, code: str, endpoint: str) -> float:
    """The ``kubetune_gateway_requests_total`` sample of one version, status code and endpoint."""
    return metric_value(
        metrics_text, "kubetune_gateway_requests_total", version=version, endpoint=endpoint, code=code
    )


def sse_events(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body, JSON-decoded except for ``[DONE]``."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
