"""Prompts and completions the gateway keeps, always PII-redacted: in the audit log with
``access.audit.logContent``, and for the completions that receive feedback with ``feedback.capture``,
exported as KTO or preference datasets by ``kubetune feedback export``.

Through the real gateway (served over HTTP) with the official openai client; the model server is the
scripted double of test_gateway_guardrails.py (its answer streamed a few characters per chunk)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import test_gateway_guardrails
from gateway_doubles import GatewayServer
from test_gateway_guardrails import ScriptedModelServer, ask, client_for, config

from kubetune.cli import main
from kubetune.gateway.access.keys import Scope, create_key
from kubetune.gateway.capture import kto_rows, preference_rows

PROMPT = "Refund my order please, I'm jane.roe@example.org."
REDACTED_PROMPT = "Refund my order please, I'm <EMAIL_ADDRESS>."
ANSWER = "Done; questions to billing@example.com please."
REDACTED_ANSWER = "Done; questions to <EMAIL_ADDRESS> please."

model_server = test_gateway_guardrails.model_server
scripted = test_gateway_guardrails.scripted


def with_audit(
    base: dict[str, Any], audit: Path, log_content: bool | None = None, **extra: Any
) -> dict[str, Any]:
    settings: dict[str, Any] = {"path": str(audit)}
    if log_content is not None:
        settings["logContent"] = log_content
    return {**base, "access": {"audit": settings}, **extra}


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    return int(exited.value.code or 0)


@pytest.mark.parametrize("pii", [{"input": "flag", "output": "off"}, None], ids=["pii-guard", "no-guard"])
def test_logged_content_is_redacted_streams_included_and_the_chain_verifies(
    scripted: ScriptedModelServer,
    gateway_server: GatewayServer,
    tmp_path: Path,
    pii: dict[str, Any] | None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With a PII guard that only flags (the model gets the text unchanged) or with none at all, the
    audit line still carries the prompt and the completion redacted."""
    scripted.answer, scripted.piece = ANSWER, 4
    audit = tmp_path / "audit.jsonl"
    guardrails = {"pii": pii} if pii is not None else None
    with gateway_server(with_audit(config(scripted, guardrails), audit, log_content=True)) as (url, _):
        client = client_for(url)
        assert ask(client, PROMPT) == ANSWER  # the guard flags, the client gets the text as it is
        assert ask(client, PROMPT, stream=True) == ANSWER
    lines = audit_lines(audit)
    assert len(lines) == 2
    for line in lines:
        assert line["prompt"] == [{"role": "user", "content": REDACTED_PROMPT}]
        assert line["completion"] == REDACTED_ANSWER
    raw = audit.read_text()
    assert "jane.roe" not in raw and "billing@" not in raw
    assert cli("audit", "verify", str(audit)) == 0
    assert "OK: 2 lines" in capsys.readouterr().out


def test_the_completion_logged_is_the_one_the_client_got(
    scripted: ScriptedModelServer, gateway_server: GatewayServer, tmp_path: Path
) -> None:
    """An output guard that redacts: the log has the redacted stream, as it was sent."""
    scripted.answer, scripted.piece = ANSWER, 2
    audit = tmp_path / "audit.jsonl"
    guardrails = {"pii": {"input": "redact", "output": "redact"}}
    with gateway_server(with_audit(config(scripted, guardrails), audit, log_content=True)) as (url, _):
        assert ask(client_for(url), PROMPT, stream=True) == REDACTED_ANSWER
    (line,) = audit_lines(audit)
    assert line["completion"] == REDACTED_ANSWER
    assert line["prompt"][-1]["content"] == REDACTED_PROMPT


def test_content_is_not_logged_by_default(
    scripted: ScriptedModelServer, gateway_server: GatewayServer, tmp_path: Path
) -> None:
    scripted.answer = ANSWER
    audit = tmp_path / "audit.jsonl"
    with gateway_server(with_audit(config(scripted, None), audit)) as (url, gateway):
        assert gateway.state.content is None  # no redactor built: nothing is kept
        ask(client_for(url), PROMPT)
        ask(client_for(url), PROMPT, stream=True)
    lines = audit_lines(audit)
    assert len(lines) == 2
    assert all("prompt" not in line and "completion" not in line for line in lines)
    assert "Refund" not in audit.read_text()


def capture(**settings: Any) -> dict[str, Any]:
    return {"feedback": {"capture": True, **settings}}


def rate(url: str, response_id: str, score: float) -> None:
    answer = httpx.post(f"{url}/v1/feedback", json={"requestId": response_id, "score": score})
    assert answer.status_code == 200, answer.text


def chat(url: str, text: str, stream: bool = False) -> str:
    """The response id of a chat completion of ``text``."""
    client = client_for(url)
    messages: Any = [{"role": "user", "content": text}]
    if stream:
        chunks = list(client.chat.completions.create(model="support-bot", messages=messages, stream=True))
        return str(chunks[0].id)
    return str(client.chat.completions.create(model="support-bot", messages=messages).id)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def export(url: str, out: Path, *options: str, fmt: str = "kto") -> int:
    """`kubetune feedback export` of mdep/support-bot from the gateway at ``url``: ``fmt`` rows to ``out``."""
    return cli(
        "feedback", "export", "mdep/support-bot", "--gateway", url, "--format", fmt, "-o", str(out), *options
    )


def test_rated_completions_are_exported_as_kto_and_preference_datasets(
    scripted: ScriptedModelServer, gateway_server: GatewayServer, tmp_path: Path
) -> None:
    store = tmp_path / "feedback.jsonl"
    gateway_config = {**config(scripted, None), **capture(path=str(store))}
    with gateway_server(gateway_config) as (url, _):
        scripted.answer = ANSWER
        good = chat(url, PROMPT)
        scripted.answer = "No."
        bad = chat(url, PROMPT, stream=True)
        unrated = chat(url, "What are your opening hours?")
        rate(url, good, 1.0)
        rate(url, bad, 0.0)
        kto, preference = tmp_path / "kto.jsonl", tmp_path / "preference.jsonl"
        assert export(url, kto) == 0
        assert export(url, preference, fmt="preference") == 0
    prompt = [{"role": "user", "content": REDACTED_PROMPT}]
    assert read_jsonl(kto) == [
        {"prompt": prompt, "completion": [{"role": "assistant", "content": REDACTED_ANSWER}], "label": True},
        {"prompt": prompt, "completion": [{"role": "assistant", "content": "No."}], "label": False},
    ]
    assert read_jsonl(preference) == [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": REDACTED_ANSWER}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
    ]
    kept = store.read_text()
    assert unrated not in kept and "jane.roe" not in kept  # only rated content, redacted
    assert {record["id"] for record in read_jsonl(store)} == {good, bad}


def test_capture_keeps_at_most_max_records_and_survives_a_restart(
    scripted: ScriptedModelServer, gateway_server: GatewayServer, tmp_path: Path
) -> None:
    store = tmp_path / "feedback.jsonl"
    gateway_config = {**config(scripted, None), **capture(path=str(store), maxRecords=2)}
    with gateway_server(gateway_config) as (url, _):
        ids = [chat(url, f"question {n}") for n in range(3)]
        for response_id in ids:
            rate(url, response_id, 1.0)
    with gateway_server(gateway_config) as (url, _):  # a restarted gateway reads its records back
        records = httpx.get(f"{url}/v1/feedback/records").json()["data"]
    assert [record["id"] for record in records] == ids[1:]
    assert [record["prompt"][0]["content"] for record in records] == ["question 1", "question 2"]


def test_without_capture_there_are_no_records_to_export(
    scripted: ScriptedModelServer,
    gateway_server: GatewayServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with gateway_server(config(scripted, None)) as (url, _):
        rate(url, chat(url, PROMPT), 1.0)  # feedback works, nothing is kept
        answer = httpx.get(f"{url}/v1/feedback/records")
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "feedback_capture_off"
        out = tmp_path / "kto.jsonl"
        assert export(url, out) == 1
        assert "spec.feedback.capture" in capsys.readouterr().err
        assert not out.exists()


def test_preference_pairs_need_the_same_prompt_with_opposite_feedback() -> None:
    def record(prompt: Any, completion: str, score: float) -> dict[str, Any]:
        return {"prompt": prompt, "completion": completion, "score": score}

    records = [
        record("2+2?", "4", 1.0),
        record("2+2?", "5", 0.0),
        record("2+2?", "4", 0.3),  # nothing good left to pair it with
        record("3+4?", "7", 0.9),
        record("3+4?", "7", 0.1),  # the same text rated both ways teaches nothing
        record("3+3?", "6", 1.0),  # no bad answer to this prompt
    ]
    assert preference_rows(records) == [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    assert [row["label"] for row in kto_rows(records)] == [True, False, False, True, False, True]
    assert kto_rows([{"prompt": "x", "score": 1.0}]) == []  # no completion: not a row


def test_reading_the_records_needs_an_admin_key_when_authentication_is_on(
    scripted: ScriptedModelServer,
    gateway_server: GatewayServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = tmp_path / "keys.json"
    product = create_key(keys, "team-a", [Scope.INFERENCE, Scope.FEEDBACK]).token
    admin = create_key(keys, "platform", [Scope.ADMIN]).token
    gateway_config = {
        **config(scripted, None),
        **capture(path=str(tmp_path / "feedback.jsonl")),
        "access": {"auth": "required", "keysFile": str(keys)},
    }
    with gateway_server(gateway_config) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=product, max_retries=0, timeout=15)
        answer = client.chat.completions.create(
            model="support-bot", messages=[{"role": "user", "content": "hi"}]
        )
        rated = httpx.post(
            f"{url}/v1/feedback",
            json={"requestId": answer.id, "score": 1},
            headers={"authorization": f"Bearer {product}"},
        )
        assert rated.status_code == 200
        out = tmp_path / "kto.jsonl"
        # A product's key may rate, not read what was said.
        assert export(url, out, "--api-key", product) == 1
        assert "403" in capsys.readouterr().err and not out.exists()
        assert export(url, out, "--api-key", admin) == 0
    assert read_jsonl(out) == [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "All good."}],
            "label": True,
        }
    ]
