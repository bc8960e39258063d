"""Request validation and generation parameters: the deployment's defaults and limits.

A request that omits temperature, top_p or max_tokens gets the deployment's default; a value above
a limit is refused (400 naming the parameter) rather than clamped, so a client never receives
output generated with settings other than the ones it asked for.
"""

from __future__ import annotations

from typing import Any

from kubetune.gateway.config import GenerationConfig
from kubetune.gateway.errors import invalid_request
from kubetune_contract.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestFieldError,
    parse_request,
)

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_openai_request(endpoint: str, body: dict[str, Any]) -> ChatCompletionRequest | CompletionRequest:
    """``body`` validated with the OpenAI request model of ``endpoint`` (the model server validates
    with the same one); 400 naming the field. Fields the model does not name are kept for the
    version to judge."""
    model: type[ChatCompletionRequest | CompletionRequest] = (
        ChatCompletionRequest if endpoint == CHAT_ENDPOINT else CompletionRequest
    )
    try:
        return parse_request(model, body)
    except RequestFieldError as error:
        raise invalid_request(error.message, error.param) from error


def apply_generation(endpoint: str, body: dict[str, Any], generation: GenerationConfig) -> None:
    """Fill omitted parameters with the defaults and refuse values above the limits (in place)."""
    defaults, limits = generation.defaults, generation.limits
    token_params = ["max_tokens", "max_completion_tokens"] if endpoint == CHAT_ENDPOINT else ["max_tokens"]

    if body.get("temperature") is None and defaults.temperature is not None:
        body["temperature"] = defaults.temperature
    if body.get("top_p") is None and defaults.top_p is not None:
        body["top_p"] = defaults.top_p
    if all(body.get(param) is None for param in token_params) and defaults.max_tokens is not None:
        body["max_tokens"] = defaults.max_tokens

    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature) or temperature < 0:
            raise invalid_request("temperature must be a number of at least 0", "temperature")
        if limits.max_temperature is not None and temperature > limits.max_temperature:
            raise invalid_request(
                f"temperature {temperature} is above this deployment's limit of {limits.max_temperature}",
                "temperature",
            )
    top_p = body.get("top_p")
    if top_p is not None:
        if not _is_number(top_p) or not 0 <= top_p <= 1:
            raise invalid_request("top_p must be a number between 0 and 1", "top_p")
        if limits.max_top_p is not None and top_p > limits.max_top_p:
            raise invalid_request(
                f"top_p {top_p} is above this deployment's limit of {limits.max_top_p}", "top_p"
            )
    for param in token_params:
        value = body.get(param)
        if value is None:
            continue
        if not _is_integer(value) or value < 1:
            raise invalid_request(f"{param} must be an integer of at least 1", param)
        if limits.max_tokens is not None and value > limits.max_tokens:
            raise invalid_request(
                f"{param} {value} is above this deployment's limit of {limits.max_tokens}", param
            )
