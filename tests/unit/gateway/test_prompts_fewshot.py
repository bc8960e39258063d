"""A prompt's few-shot pool: the examples a request gets are the nearest ones (BM25), or a draw the
same request always gets, or the first k; never more than the context window holds beside the
question; the pool lines used are what the response header reports."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kubetune.gateway.config import PromptConfig
from kubetune.gateway.errors import GatewayError
from kubetune.gateway.fewshot import FewShotPoolError, PoolCache, header_value, upper_bound_tokens
from kubetune.gateway.prompts import render_chat_with_few_shot, render_completion_with_few_shot
from kubetune_contract.deployment import FewShotSelection

POOL = [
    {"user": "How do I reset my password?", "assistant": "Settings, then Security, then Reset."},
    {"user": "I was charged twice on my invoice", "assistant": "queue: billing"},
    {"user": "The app crashes when I open it", "assistant": "queue: technical"},
    {"user": "Please refund the duplicate invoice charge", "assistant": "queue: billing"},
    {"user": "Can I change my username?", "assistant": "queue: account"},
    {"user": "Upload fails with error 500", "assistant": "queue: technical"},
]
PROMPT = PromptConfig(name="triage", system="Route the ticket.")
WIDE = 100_000


@pytest.fixture
def pool_uri(tmp_path: Path) -> str:
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in POOL), encoding="utf-8")
    return f"file://{path}"


def few_shot(uri: str, select: str = "similar", k: int = 2) -> FewShotSelection:
    return FewShotSelection.model_validate({"uri": uri, "k": k, "select": select})


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_similar_picks_the_nearest_examples_and_reports_their_lines(pool_uri: str) -> None:
    messages, used = render_chat_with_few_shot(
        ask("my invoice has a duplicate charge, refund it"),
        PROMPT,
        "v1",
        None,
        few_shot(pool_uri),
        PoolCache(),
        WIDE,
    )
    assert header_value(used) == "4,2"  # both billing tickets, the closer first
    assert messages == [
        {"role": "system", "content": "Route the ticket."},
        {"role": "user", "content": POOL[3]["user"]},
        {"role": "assistant", "content": POOL[3]["assistant"]},
        {"role": "user", "content": POOL[1]["user"]},
        {"role": "assistant", "content": POOL[1]["assistant"]},
        {"role": "user", "content": "my invoice has a duplicate charge, refund it"},
    ]


def test_random_is_one_draw_per_request_and_fixed_is_the_first_k(pool_uri: str) -> None:
    pools = PoolCache()

    def lines(text: str, select: str) -> str:
        _, used = render_chat_with_few_shot(
            ask(text), PROMPT, "v1", None, few_shot(pool_uri, select, 3), pools, WIDE
        )
        return header_value(used)

    draws = {text: lines(text, "random") for text in ("a", "b", "c", "d", "e")}
    assert all(lines(text, "random") == drawn for text, drawn in draws.items())
    assert len(set(draws.values())) > 1
    assert lines("anything", "fixed") == "1,2,3"


def test_examples_that_would_not_fit_are_left_out_never_the_question(pool_uri: str) -> None:
    question = "my invoice has a duplicate charge, refund it"
    selection = few_shot(pool_uri, k=3)
    _, all_three = render_chat_with_few_shot(ask(question), PROMPT, "v1", None, selection, PoolCache(), WIDE)
    assert len(all_three) == 3
    base = upper_bound_tokens(question) + upper_bound_tokens("Route the ticket.") + 2 * 8
    first_cost = upper_bound_tokens(POOL[3]["user"]) + upper_bound_tokens(POOL[3]["assistant"]) + 2 * 8
    messages, used = render_chat_with_few_shot(
        ask(question), PROMPT, "v1", None, selection, PoolCache(), base + first_cost
    )
    assert header_value(used) == "4"
    assert messages[-1] == {"role": "user", "content": question}
    _, none = render_chat_with_few_shot(ask(question), PROMPT, "v1", None, selection, PoolCache(), base)
    assert none == []


def test_completions_get_the_examples_as_text_blocks(pool_uri: str) -> None:
    text, used = render_completion_with_few_shot(
        "app crashes on open", PROMPT, "v1", None, few_shot(pool_uri, k=1), PoolCache(), WIDE
    )
    assert header_value(used) == "3"
    assert text == f"Route the ticket.\n\n{POOL[2]['user']}\n{POOL[2]['assistant']}\n\napp crashes on open"


def test_an_edited_pool_is_read_again(pool_uri: str) -> None:
    pools = PoolCache()
    path = Path(pool_uri.removeprefix("file://"))
    _, before = render_chat_with_few_shot(
        ask("x"), PROMPT, "v1", None, few_shot(pool_uri, "fixed", 1), pools, WIDE
    )
    path.write_text(json.dumps({"user": "new", "assistant": "one"}) + "\n", encoding="utf-8")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _, after = render_chat_with_few_shot(
        ask("x"), PROMPT, "v1", None, few_shot(pool_uri, "fixed", 1), pools, WIDE
    )
    assert (before[0].user, after[0].user) == (POOL[0]["user"], "new")


@pytest.mark.parametrize(
    ("content", "wording"),
    [
        ('{"user": "a", "assistant": "b"}\nnot json\n', "pool.jsonl:2: not JSON"),
        ('{"user": "a"}\n', 'pool.jsonl:1: must be an object with "user" and "assistant" strings'),
        ("\n\n", "needs at least one example"),
    ],
)
def test_a_broken_pool_names_its_line(tmp_path: Path, content: str, wording: str) -> None:
    (tmp_path / "pool.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(FewShotPoolError, match=wording):
        PoolCache().get(str(tmp_path / "pool.jsonl"))


def test_a_missing_pool_is_a_server_error_naming_the_uri(tmp_path: Path) -> None:
    selection = few_shot(str(tmp_path / "absent.jsonl"))
    with pytest.raises(GatewayError) as failed:
        render_chat_with_few_shot(ask("x"), PROMPT, "v1", None, selection, PoolCache(), WIDE)
    assert failed.value.status_code == 500
    assert "absent.jsonl" in failed.value.message
    with pytest.raises(FewShotPoolError, match="file:// URI"):
        PoolCache().get("s3://bucket/pool.jsonl")
