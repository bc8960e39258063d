"""The gateway's HTTP plumbing shared by its routes: headers every response carries, JSON bodies,
OpenAI-format errors for anything Starlette would answer in plain text, and the size-capped body
reader."""

from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubetune.gateway.errors import GatewayError, invalid_request

VERSION_HEADER = "x-kubetune-version"
REQUEST_ID_HEADER = "x-request-id"
NO_VERSION = "-"
MAX_BODY_BYTES = 16 * 1024 * 1024


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def json_bytes(document: Any) -> bytes:
    try:
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # a lone surrogate (a JSON escape UTF-8 cannot carry) came in a request: pass it on escaped
        return json.dumps(document, separators=(",", ":")).encode()


def tracing_headers(request_id: str, version: str) -> dict[str, str]:
    return {REQUEST_ID_HEADER: request_id, VERSION_HEADER: version}


def json_response(document: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(json_bytes(document), media_type="application/json", headers=headers)


def error_response(error: GatewayError, request_id: str, version: str) -> Response:
    headers = tracing_headers(request_id, version)
    if error.retry_after is not None:
        headers["retry-after"] = str(error.retry_after)
    return Response(
        json_bytes(error.to_openai()),
        status_code=error.status_code,
        media_type="application/json",
        headers=headers,
    )


def nested_too_deeply() -> GatewayError:
    return invalid_request("the request body nests arrays or objects too deeply", None)


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object (UTF-8, -16 or -32); 413 past MAX_BODY_BYTES, 400 when it
    is not one."""
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
    except UnicodeDecodeError as exc:
        raise invalid_request(
            f"the request body is not UTF-8 (nor UTF-16 or UTF-32) text: {exc.reason} at byte {exc.start}",
            None,
        ) from exc
    except ValueError as exc:
        raise invalid_request(f"the request body is not valid JSON: {exc}", None) from exc
    except RecursionError as exc:
        raise nested_too_deeply() from exc
    if not isinstance(body, dict):
        raise invalid_request("the request body must be a JSON object", None)
    return body


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
                    headers.append((REQUEST_ID_HEADER.encode(), new_request_id().encode()))
                if VERSION_HEADER.encode() not in names:
                    headers.append((VERSION_HEADER.encode(), NO_VERSION.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def http_error(request: Request, exc: Exception) -> Response:
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
        json_bytes(error.to_openai()), status_code=status, media_type="application/json", headers=headers
    )
