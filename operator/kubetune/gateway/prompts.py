"""A version's prompt applied to a request before it goes upstream.

Chat completions: the version's system message goes first; system (or developer) messages the client
sent are kept right after it, never replaced, so nothing the client wrote is dropped; then the
few-shot examples as user/assistant turns; then the rest of the conversation, whose last user
message is rendered through the template.

The version's system message is composed from the prompt's parts (``system``), per request.

Completions (no roles): the template is applied to the prompt (to each prompt of a list); the system
message and the examples, when present, are put before it as plain text blocks separated by a blank
line, each example as its user text, a newline and its assistant text.

Few-shot selection (``fewshot``): the examples a prompt's pool gives a request come after the fixed
examples, as many as fit the context window once the rest of the prompt is rendered
(``render_chat_with_few_shot``, ``render_completion_with_few_shot``).

Templates: ``{{input}}`` is the user's text; any other ``{{name}}`` comes from the request's
``metadata`` object, and a variable the request does not supply is a 400 naming it. Substitution is
a single pass, so a value that itself contains ``{{...}}`` is inserted literally.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kubetune.gateway.config import INPUT_VARIABLE, TEMPLATE_VARIABLE, PromptConfig
from kubetune.gateway.errors import GatewayError, invalid_request
from kubetune.gateway.fewshot import (
    MESSAGE_OVERHEAD_TOKENS,
    FewShotPoolError,
    PoolCache,
    PoolExample,
    Selection,
    header_value,
    select_examples,
    upper_bound_tokens,
)
from kubetune.gateway.generation import CHAT_ENDPOINT
from kubetune.gateway.system import system_message
from kubetune_contract.openai import HIDDEN_REASONING_FIELD


class FewShotSpec(Protocol):
    """A prompt's ``fewShot`` (the contract's FewShotSelection, or the gateway config's copy)."""

    @property
    def uri(self) -> str: ...
    @property
    def k(self) -> int: ...
    @property
    def select(self) -> Selection: ...


_SYSTEM_ROLES = ("system", "developer")


def template_values(prompt: PromptConfig, version: str, metadata: Any) -> dict[str, str]:
    """The template's variables other than input, taken from the request's metadata."""
    names = [name for name in prompt.template_variables() if name != INPUT_VARIABLE]
    values: dict[str, str] = {}
    if not names:
        return values
    source = metadata if isinstance(metadata, dict) else {}
    for name in names:
        if name not in source:
            raise invalid_request(
                f"the prompt template {prompt.name!r} of version {version!r} uses {{{{{name}}}}}, "
                f"but the request's metadata has no {name!r}",
                f"metadata.{name}",
            )
        value = source[name]
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise invalid_request(f"metadata.{name} must be a string or a number", f"metadata.{name}")
        values[name] = str(value)
    return values


def render_template(template: str, user_input: str, values: dict[str, str]) -> str:
    substitutions = {**values, INPUT_VARIABLE: user_input}
    return TEMPLATE_VARIABLE.sub(lambda match: substitutions[match.group(1)], template)


def _message_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise invalid_request(
                    "this version applies a prompt template, which needs text content only", param
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid_request("content must be a string or an array of text parts", param)


def _example_turns(prompt: PromptConfig, selected: Sequence[PoolExample]) -> list[tuple[str, str]]:
    """(user, assistant) of the prompt's fixed examples, then of the ones selected from its pool."""
    return [(e.user, e.assistant) for e in prompt.examples] + [(e.user, e.assistant) for e in selected]


def render_chat_messages(
    messages: list[dict[str, Any]],
    prompt: PromptConfig,
    version: str,
    metadata: Any,
    selected: Sequence[PoolExample] = (),
    request: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The conversation with the version's prompt applied (a new list; ``messages`` is unchanged);
    ``selected`` examples follow the prompt's fixed ones; ``request`` (the body) feeds generated
    system-message parts."""
    rendered = list(messages)
    if prompt.template is not None:
        values = template_values(prompt, version, metadata)
        last_user = next(
            (index for index in range(len(rendered) - 1, -1, -1) if rendered[index].get("role") == "user"),
            None,
        )
        if last_user is None:
            raise invalid_request(
                f"version {version!r} applies the prompt template {prompt.name!r} to the last user "
                "message, but the request has none",
                "messages",
            )
        text = _message_text(rendered[last_user].get("content"), f"messages[{last_user}].content")
        rendered[last_user] = {
            **rendered[last_user],
            "content": render_template(prompt.template, text, values),
        }
    leading_system = 0
    while leading_system < len(rendered) and rendered[leading_system].get("role") in _SYSTEM_ROLES:
        leading_system += 1
    prefix: list[dict[str, Any]] = []
    system = system_message(prompt, request or {})
    if system is not None:
        prefix.append({"role": "system", "content": system})
    prefix.extend(rendered[:leading_system])
    for user, assistant in _example_turns(prompt, selected):
        prefix.append({"role": "user", "content": user})
        prefix.append({"role": "assistant", "content": assistant})
    return prefix + rendered[leading_system:]


def render_completion_prompt(
    prompt_field: Any,
    prompt: PromptConfig,
    version: str,
    metadata: Any,
    selected: Sequence[PoolExample] = (),
    request: Mapping[str, Any] | None = None,
) -> Any:
    """The completions ``prompt`` field with the version's prompt applied."""
    values = template_values(prompt, version, metadata) if prompt.template is not None else {}
    system = system_message(prompt, request or {})
    blocks = [] if system is None else [system]
    blocks.extend(f"{user}\n{assistant}" for user, assistant in _example_turns(prompt, selected))

    def render_one(text: str) -> str:
        body = render_template(prompt.template, text, values) if prompt.template is not None else text
        return "\n\n".join([*blocks, body])

    if isinstance(prompt_field, str):
        return render_one(prompt_field)
    if (
        isinstance(prompt_field, list)
        and prompt_field
        and all(isinstance(item, str) for item in prompt_field)
    ):
        return [render_one(item) for item in prompt_field]
    raise invalid_request(
        f"version {version!r} applies the prompt {prompt.name!r}, which needs prompt to be a string "
        "or a non-empty array of strings (not tokens)",
        "prompt",
    )


def _pool_examples(
    few_shot: FewShotSpec, pools: PoolCache, query: str, used_tokens: int, max_prompt_tokens: int
) -> list[PoolExample]:
    try:
        pool = pools.get(few_shot.uri)
    except FewShotPoolError as error:
        # the deployment's pool, not the request, is wrong: a server error, as for a broken upstream
        raise GatewayError(
            500, f"the prompt's few-shot pool cannot be read: {error}", error_type="server_error"
        ) from error
    room = max_prompt_tokens - used_tokens
    return select_examples(pool, few_shot.select, few_shot.k, query, room)


def last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    """The text few-shot examples are chosen for: the last user message's (empty if none)."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user":
            return _message_text(messages[index].get("content"), f"messages[{index}].content")
    return ""


def render_chat_with_few_shot(
    messages: list[dict[str, Any]],
    prompt: PromptConfig,
    version: str,
    metadata: Any,
    few_shot: FewShotSpec | None,
    pools: PoolCache,
    max_prompt_tokens: int,
    request: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[PoolExample]]:
    """The conversation with the prompt and the pool's examples for it, and those examples."""
    rendered = render_chat_messages(messages, prompt, version, metadata, request=request)
    if few_shot is None:
        return rendered, []
    used = sum(
        upper_bound_tokens(content) + MESSAGE_OVERHEAD_TOKENS
        for message in rendered
        if isinstance(content := message.get("content"), str)
    )
    selected = _pool_examples(few_shot, pools, last_user_text(messages), used, max_prompt_tokens)
    return render_chat_messages(messages, prompt, version, metadata, selected, request), selected


def render_completion_with_few_shot(
    prompt_field: Any,
    prompt: PromptConfig,
    version: str,
    metadata: Any,
    few_shot: FewShotSpec | None,
    pools: PoolCache,
    max_prompt_tokens: int,
    request: Mapping[str, Any] | None = None,
) -> tuple[Any, list[PoolExample]]:
    """The completions prompt with the prompt and the pool's examples for it, and those examples."""
    rendered = render_completion_prompt(prompt_field, prompt, version, metadata, request=request)
    if few_shot is None:
        return rendered, []
    texts = [rendered] if isinstance(rendered, str) else list(rendered)
    query = prompt_field if isinstance(prompt_field, str) else prompt_field[0]
    used = max(upper_bound_tokens(text) for text in texts)
    selected = _pool_examples(few_shot, pools, query, used, max_prompt_tokens)
    return render_completion_prompt(prompt_field, prompt, version, metadata, selected, request), selected


@dataclass(frozen=True)
class AppliedPrompt:
    """A request body with a version's prompt applied, and the few-shot header naming the pool
    lines used (None: the prompt has no pool)."""

    body: dict[str, Any]
    few_shot: str | None


def apply_prompt(
    endpoint: str,
    body: Mapping[str, Any],
    prompt: PromptConfig | None,
    version: str,
    pools: PoolCache,
    max_prompt_tokens: int,
) -> AppliedPrompt:
    """What the gateway sends ``version`` for ``body`` (a new dict, without ``metadata``): the
    prompt's system message, examples and template applied, and hidden reasoning asked for. The
    gateway and ``kubetune prompt render`` both call this, so the CLI shows what is sent."""
    upstream = dict(body)
    metadata = upstream.pop("metadata", None)
    if prompt is None:
        return AppliedPrompt(upstream, None)
    if endpoint == CHAT_ENDPOINT:
        upstream["messages"], selected = render_chat_with_few_shot(
            upstream["messages"], prompt, version, metadata, prompt.few_shot, pools, max_prompt_tokens, body
        )
    else:
        upstream["prompt"], selected = render_completion_with_few_shot(
            upstream["prompt"], prompt, version, metadata, prompt.few_shot, pools, max_prompt_tokens, body
        )
    if prompt.reasoning is not None:
        # the model server drops what the model writes between the markers
        upstream[HIDDEN_REASONING_FIELD] = {"open": prompt.reasoning.open, "close": prompt.reasoning.close}
    return AppliedPrompt(upstream, header_value(selected) if prompt.few_shot is not None else None)
