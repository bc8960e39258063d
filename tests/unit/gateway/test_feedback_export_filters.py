"""`kubetune feedback export --version NAME --min-rows N`: the feedback a canary's answers received, and
no dataset too small to train on.

Through the real gateway (served over HTTP) with two versions on the scripted model server of
test_gateway_guardrails.py; requests are pinned to a version with the override header."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_gateway_guardrails
from gateway_doubles import GatewayServer
from test_gateway_content_capture import export, rate, read_jsonl
from test_gateway_guardrails import SYSTEM_PROMPT, ScriptedModelServer, client_for

model_server = test_gateway_guardrails.model_server
scripted = test_gateway_guardrails.scripted


def two_versions(server: ScriptedModelServer, store: Path) -> dict[str, Any]:
    return {
        "deployment": "support-bot",
        "versions": [
            {"name": version, "url": server.url, "weight": 50, "prompt": "billing"}  # type: ignore[attr-defined]
            for version in ("v1", "v2")
        ],
        "prompts": [{"name": "billing", "system": SYSTEM_PROMPT}],
        "timeouts": {"firstByteSeconds": 10, "responseSeconds": 10, "streamIdleSeconds": 10},
        "feedback": {"capture": True, "path": str(store)},
    }


@pytest.fixture
def url(scripted: ScriptedModelServer, gateway_server: GatewayServer, tmp_path: Path) -> Iterator[str]:
    """The URL of a gateway capturing feedback, with versions v1 and v2 that both answer "billing"."""
    scripted.answer = "billing"
    with gateway_server(two_versions(scripted, tmp_path / "feedback.jsonl")) as (url, _):
        yield url


def answered_by(url: str, version: str, text: str) -> str:
    """The response id of ``text`` answered by ``version``."""
    raw = client_for(url).chat.completions.with_raw_response.create(
        model="support-bot",
        messages=[{"role": "user", "content": text}],
        extra_headers={"x-kubetune-version": version},
    )
    assert raw.headers["x-kubetune-version"] == version
    return str(raw.parse().id)


def test_version_keeps_only_the_completions_that_version_answered(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rate(url, answered_by(url, "v1", "first question"), 1.0)
    rate(url, answered_by(url, "v2", "second question"), 0.0)
    rate(url, answered_by(url, "v2", "third question"), 1.0)
    assert len(httpx.get(f"{url}/v1/feedback/records").json()["data"]) == 3
    only_v2, both = tmp_path / "v2.jsonl", tmp_path / "both.jsonl"
    assert export(url, only_v2, "--version", "v2") == 0
    assert "wrote 2 kto row(s) from 2 rated completion(s) of version(s) v2 of mdep/support-bot" in (
        capsys.readouterr().out
    )
    assert export(url, both, "--version", "v1", "--version", "v2") == 0
    assert [(row["prompt"][-1]["content"], row["label"]) for row in read_jsonl(only_v2)] == [
        ("second question", False),
        ("third question", True),
    ]
    assert len(read_jsonl(both)) == 3


def test_fewer_rows_than_min_rows_fails_and_writes_nothing(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kto.jsonl"
    # Nothing rated yet: the default minimum (1) refuses an empty dataset.
    assert export(url, out) == 1
    assert "--min-rows: 0 kto row(s) from 0 rated completion(s) of mdep/support-bot, fewer than 1" in (
        capsys.readouterr().err
    )
    rate(url, answered_by(url, "v1", "a question"), 1.0)
    assert export(url, out, "--min-rows", "2") == 1
    assert "fewer than 2; " in capsys.readouterr().err
    assert not out.exists()
    assert export(url, out, "--version", "v2") == 1  # v1's answer is not v2's
    assert not out.exists()
    assert export(url, out, "--min-rows", "1") == 0
    assert len(read_jsonl(out)) == 1


def test_min_rows_must_be_a_whole_number(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert export("http://127.0.0.1:9", tmp_path / "kto.jsonl", "--min-rows", "-1") == 2
    assert "--min-rows: must be a whole number >= 0, not '-1'" in capsys.readouterr().err
