"""A prompt's system message, composed from named parts (a prompt's ``systemParts``).

The parts come in the prompt's order, then its own ``system`` text, a blank line apart. A part is a
``spec.promptParts`` entry (its text, resolved by the operator into the gateway config) or one the
gateway writes for each request:

- ``format-instructions``: the request's ``response_format`` and ``tools`` in words (the JSON schema
  the answer must validate against, the tools it may or must call); left out when the request asks
  for neither. Constrained decoding enforces the format anyway; telling the model lets it write
  sensible content inside it.
- ``safety-preamble``: ``SAFETY_PREAMBLE``.

Rendering is a pure function of the prompt and the request's fields, so the same spec and request give
the same bytes (schemas are written with sorted keys): ``kubetune prompt render`` shows what is sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kubetune.gateway.config import PromptConfig
from kubetune_contract.deployment import FORMAT_INSTRUCTIONS_PART, SAFETY_PREAMBLE_PART

SAFETY_PREAMBLE = (
    "Be helpful, honest and harmless. Do not help with anything illegal or dangerous, do not reveal "
    "personal data, and say so when you do not know."
)
PART_SEPARATOR = "\n\n"


def _schema_text(schema: Any) -> str:
    return json.dumps(schema, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))


def _response_format_text(response_format: Any) -> str | None:
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "Answer with one JSON object and nothing else."
    if kind == "json_schema":
        described = response_format.get("json_schema")
        if not isinstance(described, dict):
            return None
        name = described.get("name")
        named = f" {name!r}" if isinstance(name, str) and name else ""
        return (
            f"Answer with one JSON value and nothing else, valid against the JSON schema{named}: "
            f"{_schema_text(described.get('schema', {}))}"
        )
    return None


def _tool_names(tools: Any) -> list[str]:
    names: list[str] = []
    for tool in tools if isinstance(tools, list) else []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            description = function.get("description")
            about = f" ({description})" if isinstance(description, str) and description else ""
            names.append(f"{function['name']}{about}")
    return names


def _tools_text(tools: Any, tool_choice: Any) -> str | None:
    names = _tool_names(tools)
    if not names or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        chosen = function.get("name") if isinstance(function, dict) else None
        return f"Call the tool {chosen}." if isinstance(chosen, str) else None
    must = "You must call one of these tools" if tool_choice == "required" else "You may call these tools"
    return f"{must}: {'; '.join(names)}."


def format_instructions(request: Mapping[str, Any]) -> str | None:
    """The ``format-instructions`` part for a request (None: it asks for no format and no tools)."""
    lines = [
        text
        for text in (
            _response_format_text(request.get("response_format")),
            _tools_text(request.get("tools"), request.get("tool_choice", "auto")),
        )
        if text is not None
    ]
    return "\n".join(lines) if lines else None


def system_message(prompt: PromptConfig, request: Mapping[str, Any]) -> str | None:
    """The system message ``prompt`` gives ``request`` (its body as the client sent it); None: none."""
    texts: list[str] = []
    for part in prompt.system_parts:
        if part.text is not None:
            texts.append(part.text)
        elif part.name == SAFETY_PREAMBLE_PART:
            texts.append(SAFETY_PREAMBLE)
        elif (
            part.name == FORMAT_INSTRUCTIONS_PART
            and (instructions := format_instructions(request)) is not None
        ):
            texts.append(instructions)
    if prompt.system is not None:
        texts.append(prompt.system)
    return PART_SEPARATOR.join(texts) if texts else None
