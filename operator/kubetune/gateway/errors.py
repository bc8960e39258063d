"""Errors the gateway answers with, in the OpenAI error format."""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """A request the gateway answers with an error instead of a completion.

    ``param`` names the offending request field or header, as OpenAI's API does; ``retry_after``
    (seconds) becomes a ``Retry-After`` header, which OpenAI clients honour when they retry.
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        error_type: str = "invalid_request_error",
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.error_type = error_type
        self.code = code
        self.retry_after = retry_after

    def to_openai(self) -> dict[str, Any]:
        return openai_error(self.message, error_type=self.error_type, param=self.param, code=self.code)


def invalid_request(message: str, param: str | None) -> GatewayError:
    return GatewayError(400, message, param=param)


def openai_error(
    message: str, *, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
