"""Real gateway processes for tests, and the stub model server they front.

``start_gateway(stack, config_path, log)`` runs ``python -m kubetune.gateway --config CONFIG`` on a
free port, waits until its ``/healthz`` answers and registers its stop on ``stack``; it returns the
gateway's base URL. ``serve_chat_completions(handler)`` serves a ``/v1/chat/completions`` handler on
127.0.0.1 (by default :func:`answer_chat`: one non-streamed :func:`chat_completion` with 5 prompt and 7
completion tokens).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_server import free_port, serve_app

USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def chat_completion(model: str, content: str) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` body answering ``content``, with :data:`USAGE`."""
    message = {"role": "assistant", "content": content}
    return {
        "id": "upstream",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": USAGE,
    }


async def answer_chat(request: Request) -> JSONResponse:
    """A chat completion answering "an answer" to any request, never streamed."""
    body = await request.json()
    return JSONResponse(chat_completion(body["model"], "an answer"))


@contextmanager
def serve_chat_completions(
    handler: Callable[[Request], Awaitable[Response]] = answer_chat,
) -> Iterator[str]:
    """A model server on 127.0.0.1 with ``handler`` at ``POST /v1/chat/completions``; yields its URL."""
    with serve_app(Starlette(routes=[Route("/v1/chat/completions", handler, methods=["POST"])])) as url:
        yield url


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate ``process``; kill it if it has not exited within 10 seconds."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Poll ``URL/healthz`` until it answers 200; fails (with the log's tail) if the process exits first
    or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"gateway {url} not healthy: {log.read_text()[-3000:]}")


def start_gateway(
    stack: ExitStack,
    config_path: Path,
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    healthy_within_s: float = 60,
) -> str:
    """A healthy ``python -m kubetune.gateway --config CONFIG_PATH`` on a free port, its output in
    ``log`` and its stop on ``stack``; returns its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "kubetune.gateway", "--config", str(config_path), "--port", str(port)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    stack.callback(stop_process, process)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process, log, healthy_within_s)
    return url
