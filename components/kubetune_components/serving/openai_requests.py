"""What this model server takes of an OpenAI request, and the errors it answers with.

A body is validated with the shared protocol models (``kubetune_contract.openai``, the gateway uses
the same ones); this module adds what one version can honour. Arguments it cannot honour (n > 1,
logprobs, penalties, tools, ...) are refused with a 400 rather than ignored, and arguments OpenAI
does not know are refused like OpenAI refuses them. Every error names the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from kubetune_components.serving.requests import ROLES, ChatMessage, SamplingParams
from kubetune_contract import openai
from kubetune_contract.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestFieldError,
    parse_request,
)

DEFAULT_COMPLETION_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions; chat completions default to what the context leaves."""
EMPTY_MESSAGE_FIELDS = frozenset(
    {"refusal", "annotations", "audio", "function_call", "tool_calls", "tool_call_id", "reasoning_content"}
)
"""OpenAI message fields taken when empty (null or []): the official client's `model_dump()` of a
reply writes them all, and an assistant turn sent back that way must not be refused."""


class ApiError(Exception):
    """A request this server answers with an OpenAI error body instead of a completion."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _bad(message: str, param: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated completion or chat request and the generation settings it asks for."""

    request: ChatCompletionRequest | CompletionRequest
    params: SamplingParams
    stream: bool
    include_usage: bool


def _refuse_unknown(body: dict[str, Any], known: frozenset[str]) -> None:
    for name in body:
        if name not in known:
            raise _bad(f"Unrecognized request argument supplied: {name}", name, "unrecognized_argument")


def _refuse_unsupported(request: ChatCompletionRequest | CompletionRequest) -> None:
    unsupported: list[tuple[str, bool]] = [
        ("n", (request.n or 1) != 1),
        ("presence_penalty", (request.presence_penalty or 0.0) != 0.0),
        ("frequency_penalty", (request.frequency_penalty or 0.0) != 0.0),
        ("logit_bias", request.logit_bias not in (None, {})),
        ("logprobs", request.logprobs not in (None, False)),
    ]
    if isinstance(request, ChatCompletionRequest):
        unsupported += [
            ("top_logprobs", request.top_logprobs not in (None, 0)),
            ("response_format", request.response_format not in (None, {"type": "text"})),
        ]
    else:
        unsupported += [
            ("echo", request.echo not in (None, False)),
            ("best_of", request.best_of not in (None, 1)),
            ("suffix", request.suffix not in (None, "")),
        ]
    for name, refused in unsupported:
        if refused:
            raise _bad(f"{name} is not supported by this model server", name, "unsupported_argument")
    if request.stream_options is not None and request.stream_options.model_extra:
        option = sorted(request.stream_options.model_extra)[0]
        raise _bad(f"stream_options.{option} is not supported", f"stream_options.{option}")


def sampling_params(
    request: ChatCompletionRequest | CompletionRequest, default_max_tokens: int | None
) -> SamplingParams:
    max_tokens = request.max_tokens
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != request.max_completion_tokens:
            raise _bad(
                "max_tokens and max_completion_tokens differ; send one of them", "max_completion_tokens"
            )
        max_tokens = request.max_completion_tokens
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        stop=request.stop_sequences,
        seed=request.seed,
    )


def parse_generation_request(body: dict[str, Any], *, chat: bool) -> GenerationRequest:
    """The request in ``body`` as this server can serve it; ApiError (400) naming the field otherwise."""
    model: type[ChatCompletionRequest | CompletionRequest] = (
        ChatCompletionRequest if chat else CompletionRequest
    )
    _refuse_unknown(body, frozenset(model.model_fields))
    try:
        request = parse_request(model, body)
    except RequestFieldError as error:
        raise ApiError(400, error.message, param=error.param) from error
    _refuse_unsupported(request)
    return GenerationRequest(
        request=request,
        params=sampling_params(request, None if chat else DEFAULT_COMPLETION_MAX_TOKENS),
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )


def completion_prompt(request: CompletionRequest) -> str:
    """The one text prompt this server generates from."""
    prompt = request.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise _bad("prompt must be a string (or an array holding exactly one string)", "prompt")
        return prompt[0]
    return prompt


def _message_text(message: openai.ChatMessage, where: str) -> str:
    content = message.content
    if content is None:
        raise _bad(f"{where}.content is required", f"{where}.content")
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for index, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _bad(
                f'{where}.content[{index}] must be a text part ({{"type": "text", "text": ...}})',
                f"{where}.content[{index}]",
            )
        texts.append(part["text"])
    return "".join(texts)


def chat_messages(request: ChatCompletionRequest) -> list[ChatMessage]:
    """The conversation as text messages in the roles this server renders."""
    messages: list[ChatMessage] = []
    for index, message in enumerate(request.messages):
        where = f"messages[{index}]"
        unknown = sorted(
            name
            for name, value in (message.model_extra or {}).items()
            if not (name in EMPTY_MESSAGE_FIELDS and value in (None, []))
        )
        if unknown:
            raise _bad(f"{where}.{unknown[0]} is not supported by this model server", f"{where}.{unknown[0]}")
        if message.role not in ROLES:
            raise _bad(f"{where}.role {message.role!r} is not one of {', '.join(ROLES)}", f"{where}.role")
        messages.append(ChatMessage(role=message.role, content=_message_text(message, where)))
    return messages
