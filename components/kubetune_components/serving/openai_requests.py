"""What this model server takes of an OpenAI request, and the errors it answers with.

A body is validated with the shared protocol models (``kubetune_contract.openai``, the gateway uses
the same ones); this module adds what one version can honour. Arguments it cannot honour (n > 1,
logprobs, penalties, ...) are refused with a 400 rather than ignored, and arguments OpenAI
does not know are refused like OpenAI refuses them. Every error names the offending field.

``response_format`` and ``tools`` become an output constraint (``constrained``): the reply is
decoded inside the JSON schema they give, and a schema that cannot be enforced is refused up front.
The tools are described to the model in a system message; a call is the JSON object
``{"name": ..., "arguments": {...}}`` (``ToolUse.read_call`` turns it into OpenAI's ``tool_calls``),
an assistant turn that called tools is shown to the model the same way, and a ``tool`` turn as a
user message holding the result.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, replace
from typing import Any, Literal

from starlette.responses import JSONResponse

from kubetune_components.serving.constrained import (
    ANY_JSON_OBJECT,
    JsonConstraint,
    OutputConstraint,
    ToolCallOrText,
    enforceable_schema,
    tool_call_schema,
)
from kubetune_components.serving.requests import ROLES, ChatMessage, SamplingParams
from kubetune_contract import openai
from kubetune_contract.openai import (
    HIDDEN_REASONING_FIELD,
    ChatCompletionRequest,
    CompletionRequest,
    RequestFieldError,
    parse_request,
)

DEFAULT_COMPLETION_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions; chat completions default to what the context leaves."""
EMPTY_MESSAGE_FIELDS = frozenset({"refusal", "annotations", "audio", "function_call", "reasoning_content"})
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


FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
"""OpenAI's rule for a function's (and a json_schema's) name."""
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
"""A function declared without parameters takes an empty object."""
ToolMode = Literal["none", "auto", "required"]


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str | None
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """JSON text, as OpenAI sends it."""

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class ToolUse:
    """The tools a chat request offers and whether (and which) the model must call."""

    tools: tuple[FunctionTool, ...] = ()
    mode: ToolMode = "none"

    @property
    def offered(self) -> bool:
        return bool(self.tools) and self.mode != "none"

    def opens_call(self, text: str) -> bool | None:
        """Whether a reply starting with ``text`` is a call; None while only whitespace says nothing."""
        if not self.offered:
            return False
        if self.mode == "required":
            return True
        start = text.lstrip()
        return None if not start else start.startswith("{")

    def read_call(self, text: str) -> ToolCall | None:
        """The call a finished reply makes, or None (a text reply, or a call max_tokens cut short)."""
        if self.opens_call(text) is not True:
            return None
        try:
            call = json.loads(text)
        except ValueError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = json.dumps(call.get("arguments", {}), ensure_ascii=False)
        return ToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"], arguments)

    def system_message(self) -> ChatMessage | None:
        """How the tools are described to the model."""
        if not self.offered:
            return None
        listed = "\n".join(
            json.dumps(
                {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
                ensure_ascii=False,
            )
            for tool in self.tools
        )
        how = (
            "You must call one of these tools"
            if self.mode == "required"
            else "You can call these tools; to call one"
        )
        return ChatMessage(
            role="system",
            content=f'{how}, reply with only a JSON object {{"name": <tool name>, "arguments": '
            f"<its arguments>}}.\nTools:\n{listed}",
        )


@dataclass(frozen=True)
class GenerationRequest:
    """A validated completion or chat request and the generation settings it asks for."""

    request: ChatCompletionRequest | CompletionRequest
    params: SamplingParams
    stream: bool
    include_usage: bool
    tool_use: ToolUse = ToolUse()


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


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{where} must be an object, got {openai.json_type(value)}", where)
    return value


def response_format_constraint(response_format: dict[str, Any] | None) -> JsonConstraint | None:
    """The constraint ``response_format`` asks for; None for text."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonConstraint.of(ANY_JSON_OBJECT)
    if kind != "json_schema":
        raise _bad(
            f"response_format.type must be text, json_object or json_schema, got {json.dumps(kind)}",
            "response_format.type",
        )
    where = "response_format.json_schema"
    spec = _object(response_format.get("json_schema"), where)
    name = spec.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.match(name):
        raise _bad(f"{where}.name must be 1 to 64 letters, digits, _ or -", f"{where}.name")
    if spec.get("schema") is None:
        return JsonConstraint.of(ANY_JSON_OBJECT)
    return JsonConstraint.of(enforceable_schema(spec["schema"], f"{where}.schema"))


def _function_tool(tool: Any, where: str) -> FunctionTool:
    tool = _object(tool, where)
    if tool.get("type") != "function":
        raise _bad(f"{where}.type must be function, got {json.dumps(tool.get('type'))}", f"{where}.type")
    function = _object(tool.get("function"), f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.match(name):
        raise _bad(f"{where}.function.name must be 1 to 64 letters, digits, _ or -", f"{where}.function.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise _bad(f"{where}.function.description must be a string", f"{where}.function.description")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = NO_PARAMETERS
    else:
        parameters = enforceable_schema(parameters, f"{where}.function.parameters")
        if parameters.get("type") != "object":
            raise _bad(
                f"{where}.function.parameters must be a schema of type object", f"{where}.function.parameters"
            )
    return FunctionTool(name, description, parameters)


def tool_use(request: ChatCompletionRequest) -> ToolUse:
    """The request's tools and tool_choice, checked."""
    tools = tuple(_function_tool(tool, f"tools[{index}]") for index, tool in enumerate(request.tools or []))
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        repeated = next(name for name in names if names.count(name) > 1)
        raise _bad(f"tools names must be unique; {repeated!r} is repeated", "tools")
    choice = request.tool_choice
    if choice is None:
        return ToolUse(tools, "auto" if tools else "none")
    if not tools and choice != "none":
        raise _bad("tool_choice needs tools to choose from", "tool_choice")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _bad(
                f"tool_choice must be none, auto, required or a function, got {choice!r}", "tool_choice"
            )
        return ToolUse(tools, "none" if choice == "none" else choice)  # type: ignore[arg-type]
    function = _object(choice.get("function"), "tool_choice.function")
    if choice.get("type") != "function" or function.get("name") not in names:
        raise _bad(
            f"tool_choice.function.name must name one of the tools ({', '.join(names)})",
            "tool_choice.function.name",
        )
    return ToolUse(tuple(tool for tool in tools if tool.name == function["name"]), "required")


def output_constraint(request: ChatCompletionRequest, tools: ToolUse) -> OutputConstraint | None:
    """What the reply must look like: a call of the tools, a call or free text, or ``response_format``."""
    reply_format = response_format_constraint(request.response_format)
    if not tools.offered:
        return reply_format
    calls = JsonConstraint.of(tool_call_schema([(tool.name, tool.parameters) for tool in tools.tools]))
    if tools.mode == "required":
        return calls
    if reply_format is not None:
        raise _bad(
            "response_format cannot be combined with tools under tool_choice auto (a reply that opens "
            "with { is a tool call); set tool_choice to none or required",
            "response_format",
        )
    return ToolCallOrText(calls)


def hidden_reasoning(value: Any) -> tuple[str, str] | None:
    """The markers of kubetune's hidden-reasoning extension (``HIDDEN_REASONING_FIELD``)."""
    if value is None:
        return None
    markers = _object(value, HIDDEN_REASONING_FIELD)
    for name in ("open", "close"):
        if not isinstance(markers.get(name), str) or not markers[name]:
            where = f"{HIDDEN_REASONING_FIELD}.{name}"
            raise _bad(f"{where} must be a non-empty string", where)
    return markers["open"], markers["close"]


def parse_generation_request(body: dict[str, Any], *, chat: bool) -> GenerationRequest:
    """The request in ``body`` as this server can serve it; ApiError (400) naming the field otherwise."""
    model: type[ChatCompletionRequest | CompletionRequest] = (
        ChatCompletionRequest if chat else CompletionRequest
    )
    body = dict(body)
    reasoning = hidden_reasoning(body.pop(HIDDEN_REASONING_FIELD, None))
    _refuse_unknown(body, frozenset(model.model_fields))
    try:
        request = parse_request(model, body)
    except RequestFieldError as error:
        raise ApiError(400, error.message, param=error.param) from error
    _refuse_unsupported(request)
    params = replace(
        sampling_params(request, None if chat else DEFAULT_COMPLETION_MAX_TOKENS), hidden_reasoning=reasoning
    )
    tools = ToolUse()
    if isinstance(request, ChatCompletionRequest):
        tools = tool_use(request)
        params = replace(params, constraint=output_constraint(request, tools))
    return GenerationRequest(
        request=request,
        params=params,
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        tool_use=tools,
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


def _calls_text(calls: list[dict[str, Any]], where: str, names_by_id: dict[str, str]) -> str:
    """An assistant turn's tool calls, written the way this server asks the model to call."""
    written: list[str] = []
    for index, call in enumerate(calls):
        at = f"{where}.tool_calls[{index}]"
        function = _object(call.get("function"), f"{at}.function") if isinstance(call, dict) else None
        if function is None or call.get("type") != "function" or not isinstance(call.get("id"), str):
            raise _bad(f'{at} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}', at)
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise _bad(f"{at}.function needs a name and arguments (a JSON string)", f"{at}.function")
        try:
            parsed = json.loads(arguments)
        except ValueError as error:
            raise _bad(f"{at}.function.arguments is not JSON: {error}", f"{at}.function.arguments") from error
        names_by_id[call["id"]] = name
        written.append(json.dumps({"name": name, "arguments": parsed}, ensure_ascii=False))
    return "\n".join(written)


def chat_messages(request: ChatCompletionRequest, tools: ToolUse | None = None) -> list[ChatMessage]:
    """The conversation as text messages in the roles this server renders (the tools' description
    after the leading system messages)."""
    messages: list[ChatMessage] = []
    names_by_id: dict[str, str] = {}
    for index, message in enumerate(request.messages):
        where = f"messages[{index}]"
        unknown = sorted(
            name
            for name, value in (message.model_extra or {}).items()
            if not (name in EMPTY_MESSAGE_FIELDS and value in (None, []))
        )
        if unknown:
            raise _bad(f"{where}.{unknown[0]} is not supported by this model server", f"{where}.{unknown[0]}")
        if message.role == "tool":
            call_id = message.tool_call_id
            if call_id is None or call_id not in names_by_id:
                raise _bad(
                    f"{where}.tool_call_id must name a call of an earlier assistant message",
                    f"{where}.tool_call_id",
                )
            result = _message_text(message, where)
            messages.append(ChatMessage("user", f"Result of {names_by_id[call_id]} ({call_id}): {result}"))
            continue
        if message.role not in ROLES:
            raise _bad(
                f"{where}.role {message.role!r} is not one of {', '.join(ROLES)}, tool", f"{where}.role"
            )
        if message.tool_call_id is not None:
            raise _bad(f"{where}.tool_call_id is only for tool messages", f"{where}.tool_call_id")
        if message.tool_calls:
            if message.role != "assistant":
                raise _bad(f"{where}.tool_calls is only for assistant messages", f"{where}.tool_calls")
            calls = _calls_text(message.tool_calls, where, names_by_id)
            text = calls if message.content in (None, "", []) else f"{_message_text(message, where)}\n{calls}"
            messages.append(ChatMessage("assistant", text))
            continue
        messages.append(ChatMessage(role=message.role, content=_message_text(message, where)))
    described = tools.system_message() if tools is not None else None
    if described is not None:
        leading = next((i for i, m in enumerate(messages) if m.role not in ("system", "developer")), 0)
        messages.insert(leading, described)
    return messages
