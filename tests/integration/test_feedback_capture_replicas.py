"""spec.feedback.capture across two real gateway processes sharing a real Redis server: a completion
served by one replica and rated on the other is kept (PII-redacted), both replicas export the same
dataset with ``kubetune feedback export``, and each replica's audit log carries the redacted content
(``access.audit.logContent``) and still verifies. Driven with the official ``openai`` client.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway_processes import USAGE, chat_completion, serve_chat_completions, start_gateway
from kubetune.gateway.access.keys import load_or_create_signing_key
from redis_server import RedisServer

DEPLOYMENT = "support-bot"
GOOD, BAD = "Refunded; write to billing@example.com if not.", "Cannot help."


async def _chat(request: Request) -> Response:
    """Answers GOOD at temperature 0, BAD above, streamed or not."""
    body = await request.json()
    answer = GOOD if not body.get("temperature") else BAD
    if not body.get("stream"):
        return JSONResponse(chat_completion(body["model"], answer))

    async def events() -> AsyncIterator[bytes]:
        head = {"id": "u", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        for start in range(0, len(answer), 5):
            choice = {"index": 0, "delta": {"content": answer[start : start + 5]}, "finish_reason": None}
            yield b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n"
        yield b"data: " + json.dumps({**head, "choices": [], "usage": USAGE}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def model_server() -> Iterator[str]:
    with serve_chat_completions(_chat) as url:
        yield url


@pytest.fixture
def replicas(tmp_path: Path, model_server: str, redis: RedisServer) -> Iterator[tuple[list[str], list[Path]]]:
    """Two gateway processes (same config and signing key, own audit logs) sharing Redis."""
    signing_key = tmp_path / "signing.key"
    load_or_create_signing_key(signing_key)
    urls, audit_logs = [], []
    with ExitStack() as stack:
        for index in range(2):
            audit = tmp_path / f"replica-{index}" / "audit.jsonl"
            config = {
                "deployment": DEPLOYMENT,
                "versions": [{"name": "tuned", "url": model_server, "weight": 100}],
                "access": {
                    "auth": "disabled",
                    "signingKeyFile": str(signing_key),
                    "store": {"redisUrl": redis.url, "keyPrefix": tmp_path.name},
                    "audit": {"path": str(audit), "logContent": True},
                },
                "feedback": {"capture": True, "maxRecords": 100},
            }
            config_path = tmp_path / f"gateway-{index}.json"
            config_path.write_text(json.dumps(config))
            log = tmp_path / f"gateway-{index}.log"
            # building the PII analyzer takes seconds on a loaded machine
            urls.append(start_gateway(stack, config_path, log, healthy_within_s=120))
            audit_logs.append(audit)
        yield urls, audit_logs


PROMPT = "I'm jane.roe@example.org and was charged twice. Can you help?"
REDACTED_PROMPT = [{"role": "user", "content": "I'm <EMAIL_ADDRESS> and was charged twice. Can you help?"}]


def _ask(url: str, temperature: float, stream: bool) -> str:
    """The response id of a chat completion of PROMPT."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    messages: Any = [{"role": "user", "content": PROMPT}]
    if stream:
        chunks = client.chat.completions.create(
            model=DEPLOYMENT, messages=messages, temperature=temperature, stream=True
        )
        received = list(chunks)  # read to its end: the answer is complete
        return str(received[0].id)
    return str(
        client.chat.completions.create(model=DEPLOYMENT, messages=messages, temperature=temperature).id
    )


def _export(url: str, fmt: str, out: Path) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "kubetune", "feedback", "export", f"mdep/{DEPLOYMENT}"]
    done = subprocess.run(
        [*command, "--gateway", url, "--format", fmt, "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_feedback_on_the_other_replica_keeps_the_redacted_content_for_export(
    replicas: tuple[list[str], list[Path]], tmp_path: Path
) -> None:
    urls, audit_logs = replicas
    good = _ask(urls[0], 0, stream=False)
    bad = _ask(urls[0], 1, stream=True)
    good_again = _ask(urls[1], 0, stream=True)
    # each rated on the replica that did not serve it
    for response_id, score, replica in ((good, 1, 1), (bad, 0, 1), (good_again, 0.9, 0)):
        rated = httpx.post(
            f"{urls[replica]}/v1/feedback", json={"requestId": response_id, "score": score}, trust_env=False
        )
        assert rated.status_code == 200, rated.text

    kto = [_export(url, "kto", tmp_path / f"kto-{index}.jsonl") for index, url in enumerate(urls)]
    assert kto[0] == kto[1]  # both replicas read the shared store
    redacted_good = [{"role": "assistant", "content": "Refunded; write to <EMAIL_ADDRESS> if not."}]
    bad_answer = [{"role": "assistant", "content": BAD}]
    assert kto[0] == [
        {"prompt": REDACTED_PROMPT, "completion": redacted_good, "label": True},
        {"prompt": REDACTED_PROMPT, "completion": bad_answer, "label": False},
        {"prompt": REDACTED_PROMPT, "completion": redacted_good, "label": True},
    ]
    assert _export(urls[1], "preference", tmp_path / "pairs.jsonl") == [
        {"prompt": REDACTED_PROMPT, "chosen": redacted_good, "rejected": bad_answer}
    ]

    for audit in audit_logs:
        text = audit.read_text()
        assert "jane.roe" not in text and "billing@" not in text
        lines = [json.loads(line) for line in text.splitlines()]
        completions = [line["completion"] for line in lines if line["endpoint"] == "/v1/chat/completions"]
        assert completions and all("<EMAIL_ADDRESS>" in c or c == BAD for c in completions)
        verified = subprocess.run(
            [sys.executable, "-m", "kubetune", "audit", "verify", str(audit)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert verified.returncode == 0 and verified.stdout.startswith("OK"), verified.stderr
