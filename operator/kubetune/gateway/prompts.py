"""A version's prompt applied to a request before it goes upstream.

Chat completions: the version's system message goes first; system (or developer) messages the client
sent are kept right after it, never replaced, so nothing the client wrote is dropped; then the
few-shot examples as user/assistant turns; then the rest of the conversation, whose last user
message is rendered through the template.

Completions (no roles): the template is applied to the prompt (to each prompt of a list); the system
message and the examples, when present, are put before it as plain text blocks separated by a blank
line, each example as its user text, a newline and its assistant text.

Templates: ``{{input}}`` is the user's text; any other ``{{name}}`` comes from the request's
``metadata`` object, and a variable the request does not supply is a 400 naming it. Substitution is
a single pass, so a value that itself contains ``{{...}}`` is inserted literally.
"""

from __future__ import annotations

from typing import Any

from kubetune.gateway.config import INPUT_VARIABLE, TEMPLATE_VARIABLE, PromptConfig
from kubetune.gateway.errors import invalid_request

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


def render_chat_messages(
    messages: list[dict[str, Any]], prompt: PromptConfig, version: str, metadata: Any
) -> list[dict[str, Any]]:
    """The conversation with the version's prompt applied (a new list; ``messages`` is unchanged)."""
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
    if prompt.system is not None:
        prefix.append({"role": "system", "content": prompt.system})
    prefix.extend(rendered[:leading_system])
    for example in prompt.examples:
        prefix.append({"role": "user", "content": example.user})
        prefix.append({"role": "assistant", "content": example.assistant})
    return prefix + rendered[leading_system:]


def render_completion_prompt(prompt_field: Any, prompt: PromptConfig, version: str, metadata: Any) -> Any:
    """The completions ``prompt`` field with the version's prompt applied."""
    values = template_values(prompt, version, metadata) if prompt.template is not None else {}
    blocks = [] if prompt.system is None else [prompt.system]
    blocks.extend(f"{example.user}\n{example.assistant}" for example in prompt.examples)

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
