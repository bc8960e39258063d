"""OpenAI's request bodies for ``/v1/completions`` and ``/v1/chat/completions``, as pydantic models
shared by the gateway and the model server (the way KServe's ``kserve.protocol.rest.openai`` types are
shared by its servers).

The models hold the protocol: each field's JSON type and the ranges OpenAI documents. What one
server can honour (n > 1, logprobs, penalties, tools, ...) is that server's to refuse, and a
deployment's own limits are the gateway's. Fields the models do not name are kept in
``model_extra`` rather than refused, so the gateway forwards them and the model server decides.

``parse_request`` validates a decoded JSON body and raises ``RequestFieldError`` naming the first
offending field the way OpenAI's ``param`` does (``messages[0].content``), with a message that
starts with it; both sides turn it into an OpenAI error body.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

MAX_STOP_SEQUENCES = 4
SEED_RANGE = (-(2**63), 2**64 - 1)
CUSTOM_ERROR = "openai_value"
"""The error type of the rules written here; pydantic's own types name a JSON type mismatch."""


HIDDEN_REASONING_FIELD = "kubetune_hidden_reasoning"
"""kubetune's extension of a request body, sent by the gateway to a version whose prompt has
``reasoning: {mode: hidden}``: ``{"open": "<think>", "close": "</think>"}``; the model server returns
nothing the model writes between the markers and counts those tokens as reasoning tokens."""


class RequestFieldError(ValueError):
    """A request body that breaks the protocol: ``param`` names the field, ``message`` starts with it."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def json_type(value: Any) -> str:
    """The JSON type of a decoded value, as an error message names it."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if isinstance(value, float) else type(value).__name__)


def _refuse(message: str) -> PydanticCustomError:
    return PydanticCustomError(CUSTOM_ERROR, message)


def _field_error(param: str, message: str) -> PydanticCustomError:
    """A rule that spans fields, raised by a model validator: the message names its field."""
    return PydanticCustomError(CUSTOM_ERROR, "{param} {message}", {"param": param, "message": message})


def _in_range(low: float, high: float, *, low_inclusive: bool, wording: str) -> WrapValidator:
    """A number in [low, high] (or (low, high]); the message quotes the value as the client sent it."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        number = handler(value)
        if number is not None and not ((low <= number if low_inclusive else low < number) and number <= high):
            raise _refuse(f"{wording}, got {json.dumps(value)}")
        return number

    return WrapValidator(check)


def _shape(is_valid: Callable[[Any], bool], wording: str) -> BeforeValidator:
    """A JSON shape pydantic's union errors would describe member by member, described once."""

    def check(value: Any) -> Any:
        if value is not None and not is_valid(value):
            raise _refuse(f"must be {wording}, got {json_type(value)}")
        return value

    return BeforeValidator(check)


def _list_of(item_type: type) -> Callable[[Any], bool]:
    """An array of ``item_type`` (a JSON boolean is not a number here, though Python says it is)."""

    def is_list(value: Any) -> bool:
        return isinstance(value, list) and all(
            isinstance(item, item_type) and not isinstance(item, bool) for item in value
        )

    return is_list


def _is_token_ids(value: Any) -> bool:
    return _list_of(int)(value)


def _is_prompt(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return (
        _list_of(str)(value)
        or _is_token_ids(value)
        or (isinstance(value, list) and all(_is_token_ids(item) for item in value))
    )


def _stop_sequences(value: Any) -> Any:
    stops = [value] if isinstance(value, str) else value
    if value is None:
        return value
    if not _list_of(str)(stops):
        raise _refuse(f"must be a string or an array of strings, got {json_type(value)}")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise _refuse(f"takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}")
    if any(not stop for stop in stops):
        raise _refuse("sequences must not be empty strings")
    return value


def _at_least_one(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise _refuse(f"must be at least 1, got {value}")
    return value


def _fits_64_bits(value: int | None) -> int | None:
    if value is not None and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise _refuse(f"must fit in 64 bits, got {value}")
    return value


Temperature = Annotated[
    float | None,
    Field(allow_inf_nan=False),
    _in_range(0, 2, low_inclusive=True, wording="must be between 0 and 2"),
]
TopP = Annotated[
    float | None,
    Field(allow_inf_nan=False),
    _in_range(0, 1, low_inclusive=False, wording="must be greater than 0 and at most 1"),
]
Penalty = Annotated[
    float | None,
    Field(allow_inf_nan=False),
    _in_range(-2, 2, low_inclusive=True, wording="must be between -2 and 2"),
]
TokenCount = Annotated[int | None, AfterValidator(_at_least_one)]
Stop = Annotated[str | list[str] | None, BeforeValidator(_stop_sequences)]
Prompt = Annotated[
    str | list[str] | list[int] | list[list[int]],
    _shape(_is_prompt, "a string, an array of strings or an array of token ids"),
]
Content = Annotated[
    str | list[dict[str, Any]] | None,
    _shape(
        lambda value: isinstance(value, str) or _list_of(dict)(value), "a string or an array of content parts"
    ),
]
Logprobs = Annotated[
    bool | int | None,
    _shape(lambda value: isinstance(value, bool | int), "a boolean or an integer"),
]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    include_usage: bool | None = None


class ChatMessage(BaseModel):
    """One message of a conversation. ``content`` is text or an array of content parts (objects with
    a ``type``); OpenAI lets an assistant turn that calls tools leave it null."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: Content = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant turn's calls: ``{"id", "type": "function", "function": {"name", "arguments"}}``."""
    tool_call_id: str | None = None
    """A ``tool`` turn: the id of the call it answers."""


class SamplingRequest(BaseModel):
    """The fields both endpoints take: the model, sampling, stopping, streaming and bookkeeping."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    max_tokens: TokenCount = None
    temperature: Temperature = None
    top_p: TopP = None
    stop: Stop = None
    seed: Annotated[int | None, AfterValidator(_fits_64_bits)] = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: TokenCount = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    logit_bias: dict[str, float] | None = None
    logprobs: Logprobs = None
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _stream_options_only_when_streaming(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise _field_error("stream_options", "is only allowed when stream is true")
        return self

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``. ``prompt`` is text, texts, token ids or arrays of token ids."""

    prompt: Prompt
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: TokenCount = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    """``{"type": "text" | "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name",
    "schema", ...}}``."""
    tools: list[dict[str, Any]] | None = None
    """Functions the model may call: ``{"type": "function", "function": {"name", "description",
    "parameters"}}``."""
    tool_choice: str | dict[str, Any] | None = None
    """``none``, ``auto``, ``required`` or ``{"type": "function", "function": {"name"}}``."""
    parallel_tool_calls: bool | None = None


_EXPECTED_TYPES = {
    "int_type": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_type": "a boolean",
    "string_type": "a string",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "an array",
}


def _param(location: tuple[int | str, ...]) -> str:
    param = ""
    for part in location:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else part)
    return param


def _message(error: ErrorDetails, param: str) -> str:
    kind, value = error["type"], error.get("input")
    if kind == CUSTOM_ERROR:
        return str(error["msg"]) if "param" in (error.get("ctx") or {}) else f"{param} {error['msg']}"
    if kind == "missing":
        return f"{param} is required"
    if kind == "too_short":
        return f"{param} must not be empty"
    expected = _EXPECTED_TYPES.get(kind)
    if expected is not None:
        return f"{param} must be {expected}, got {json_type(value)}"
    return f"{param}: {error['msg']}"


RequestModel = TypeVar("RequestModel", bound=SamplingRequest)


def parse_request(model: type[RequestModel], body: dict[str, Any]) -> RequestModel:
    """``body`` validated as ``model``; raises RequestFieldError naming the first offending field."""
    try:
        return model.model_validate(body)
    except ValidationError as invalid:
        error = invalid.errors()[0]
        context = error.get("ctx") or {}
        param = str(context["param"]) if "param" in context else _param(tuple(error["loc"]))
        raise RequestFieldError(_message(error, param), param or None) from None
