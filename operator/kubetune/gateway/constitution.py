"""Critique and revise: a prompt's ``constitution`` checks each chat answer against principles.

After the draft answer, the gateway asks the same version's model server (a second generation) to
judge the draft against every principle. The critique is a JSON object, one ``"complies"`` or
``"violates"`` per principle name, produced under ``response_format`` json_schema, so constrained
decoding makes it parseable whatever the model. When a principle is violated and ``revise`` is on,
a third generation gets the conversation, the draft and the violated principles, and its answer is
what the client receives. The critique and the revision use the request's sampling parameters
(temperature, top_p, seed), so a seeded request is reproducible.

Usage adds up the tokens of every pass. The principles found violated are listed in the
``x-kubetune-violated-principles`` response header (empty: none). Only text answers are critiqued:
a tool call passes as it is. A streamed request is answered as a stream once the critique (and the
revision) are done. Completions requests and ``n`` above 1 are refused (400): they would go unchecked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kubetune.gateway.config import ConstitutionConfig, PrincipleConfig
from kubetune.gateway.errors import invalid_request
from kubetune.gateway.generation import CHAT_ENDPOINT
from kubetune.gateway.prompts import last_user_text

VIOLATED_HEADER = "x-kubetune-violated-principles"
COMPLIES, VIOLATES = "complies", "violates"
CRITIC_SYSTEM = (
    "You review an assistant's answer. For each principle, say whether the answer complies with it "
    f'or violates it: reply with a JSON object mapping each principle\'s name to "{COMPLIES}" or '
    f'"{VIOLATES}".'
)
SAMPLING_FIELDS = ("temperature", "top_p", "seed")
"""What the critique and the revision take over from the request."""
PASS_OMITS = ("stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls", "n")
"""What the revision leaves out of the request: it is one text answer, not streamed."""


class CritiqueUnreadable(ValueError):
    """The critique pass answered, but not with one verdict per principle."""


def check_request(endpoint: str, body: Mapping[str, Any], version: str) -> None:
    """Refuse what a constitution cannot check rather than answer it unchecked: a completions request
    (no conversation to critique or revise) or more than one choice."""
    if endpoint != CHAT_ENDPOINT:
        raise invalid_request(
            f"version {version!r} critiques and revises its answers (its prompt has a constitution), "
            f"which needs a chat conversation: use {CHAT_ENDPOINT}",
            None,
        )
    n = body.get("n")
    if n is not None and n != 1:
        raise invalid_request(
            f"version {version!r} critiques and revises its answers (its prompt has a constitution), one "
            "choice at a time: n must be 1",
            "n",
        )


def critique_schema(principles: Sequence[PrincipleConfig]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {principle.name: {"enum": [COMPLIES, VIOLATES]} for principle in principles},
        "required": [principle.name for principle in principles],
        "additionalProperties": False,
    }


def _principles_text(principles: Sequence[PrincipleConfig]) -> str:
    return "\n".join(f"- {principle.name}: {principle.text}" for principle in principles)


def critique_budget(principles: Sequence[PrincipleConfig]) -> int:
    """Enough tokens for the longest critique: no token is shorter than one character, and at most
    one whitespace may follow each."""
    longest = json.dumps({principle.name: VIOLATES for principle in principles})
    return 2 * len(longest) + 16


def _sampling(sent: Mapping[str, Any]) -> dict[str, Any]:
    return {field: sent[field] for field in SAMPLING_FIELDS if field in sent}


def draft_text(answer: Mapping[str, Any]) -> str | None:
    """The text of a chat answer's first choice; None for a tool call or an answer without text."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    if not isinstance(message, dict) or message.get("tool_calls"):
        return None
    content = message.get("content")
    return content if isinstance(content, str) and content else None


def critique_request(sent: Mapping[str, Any], draft: str, constitution: ConstitutionConfig) -> dict[str, Any]:
    """The chat request judging ``draft``, the answer to ``sent`` (the body the version got)."""
    question = last_user_text(sent.get("messages", []))
    return {
        "model": sent.get("model"),
        "messages": [
            {"role": "system", "content": CRITIC_SYSTEM},
            {
                "role": "user",
                "content": f"The request:\n{question}\n\nThe answer:\n{draft}\n\n"
                f"The principles:\n{_principles_text(constitution.principles)}",
            },
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "critique", "schema": critique_schema(constitution.principles)},
        },
        "max_tokens": critique_budget(constitution.principles),
        **_sampling(sent),
    }


def violated_principles(critique: Mapping[str, Any], constitution: ConstitutionConfig) -> list[str]:
    """The names of the principles the critique pass found violated, in the constitution's order."""
    text = draft_text(critique)
    try:
        verdicts = json.loads(text or "")
    except ValueError as error:
        raise CritiqueUnreadable(f"the critique is not JSON: {text!r}") from error
    names = [principle.name for principle in constitution.principles]
    if not isinstance(verdicts, dict) or any(
        verdicts.get(name) not in (COMPLIES, VIOLATES) for name in names
    ):
        raise CritiqueUnreadable(f"the critique has no verdict for every principle: {text!r}")
    return [name for name in names if verdicts[name] == VIOLATES]


def revision_request(
    sent: Mapping[str, Any], draft: str, violated: Sequence[str], constitution: ConstitutionConfig
) -> dict[str, Any]:
    """The chat request rewriting ``draft``: the conversation the version got, its draft, and what
    the draft violates. ``response_format`` and hidden reasoning stay as the request had them."""
    principles = [principle for principle in constitution.principles if principle.name in violated]
    revision = {key: value for key, value in sent.items() if key not in PASS_OMITS}
    revision["messages"] = [
        *sent.get("messages", []),
        {"role": "assistant", "content": draft},
        {
            "role": "user",
            "content": "Your answer violates these principles:\n"
            f"{_principles_text(principles)}\n"
            "Rewrite your answer so that it follows them. Reply with the rewritten answer only.",
        },
    ]
    return revision


def revised_answer(draft: dict[str, Any], revision: Mapping[str, Any]) -> dict[str, Any]:
    """``draft`` (the chat answer) with the revision's message and finish reason."""
    choice = dict(draft["choices"][0])
    revised_choice = revision["choices"][0]
    choice["message"] = revised_choice["message"]
    choice["finish_reason"] = revised_choice.get("finish_reason")
    return {**draft, "choices": [choice, *draft["choices"][1:]]}


def _add_counts(total: dict[str, Any], usage: Mapping[str, Any]) -> None:
    for field, value in usage.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            previous = total.get(field, 0)
            total[field] = (previous if isinstance(previous, int) else 0) + value
        elif isinstance(value, dict):
            nested = total.get(field)
            if not isinstance(nested, dict):
                nested = total[field] = {}
            _add_counts(nested, value)


def total_usage(usages: Sequence[Any]) -> dict[str, Any]:
    """The usage of several passes added up, field by field (nested details included)."""
    total: dict[str, Any] = {}
    for usage in usages:
        if isinstance(usage, dict):
            _add_counts(total, usage)
    return total


def as_event_stream(answer: Mapping[str, Any], include_usage: bool) -> bytes:
    """A finished chat answer as the SSE chunks a streamed request expects (content in one chunk)."""
    choice = answer["choices"][0]
    message = choice.get("message") or {}
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        delta = {
            "role": "assistant",
            "tool_calls": [{"index": index, **call} for index, call in enumerate(message["tool_calls"])],
        }
    head = {
        "id": answer.get("id"),
        "object": "chat.completion.chunk",
        "created": answer.get("created", int(time.time())),
        "model": answer.get("model"),
    }
    chunks: list[dict[str, Any]] = [
        {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]},
        {
            **head,
            "choices": [
                {"index": 0, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}
            ],
        },
    ]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": answer.get("usage")})
    events = [f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n" for chunk in chunks]
    events.append("data: [DONE]\n\n")
    return "".join(events).encode()
