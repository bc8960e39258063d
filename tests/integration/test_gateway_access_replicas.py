"""API keys, limits, budgets, feedback and experiments across two real gateway processes sharing a
real Redis server, driven with the official ``openai`` client where a client would use it.

Each test starts its own pair of ``python -m kubetune.gateway`` replicas (same config, keys and
signing key; own audit logs) in front of a stub model server that always reports 5 prompt and 7
completion tokens, streamed or not.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway_processes import USAGE, chat_completion, serve_chat_completions, start_gateway
from kubetune.gateway.access.audit import verify
from kubetune.gateway.access.keys import (
    KEY_RELOAD_SECONDS,
    Scope,
    create_key,
    load_or_create_signing_key,
    revoke_key,
)
from redis_server import RedisServer, redis_binary, running_redis

DEPLOYMENT = "support-bot"


async def _chat(request: Request) -> Response:
    body = await request.json()
    if not body.get("stream"):
        return JSONResponse(chat_completion(body["model"], "four words of answer"))

    async def events() -> AsyncIterator[bytes]:
        for text in ("four ", "words"):
            chunk = {"id": "u", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
            chunk["choices"] = [{"index": 0, "delta": {"content": text}, "finish_reason": None}]
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        if (body.get("stream_options") or {}).get("include_usage"):
            usage_chunk = {"id": "u", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
            yield b"data: " + json.dumps({**usage_chunk, "choices": [], "usage": USAGE}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def model_server() -> Iterator[str]:
    with serve_chat_completions(_chat) as url:
        yield url


@dataclass
class Replicas:
    urls: list[str]
    keys_file: Path
    audit_logs: list[Path]

    def key(self, tenant: str = "team-a", scopes: str = "inference,feedback,experiments") -> str:
        token = create_key(self.keys_file, tenant, [Scope(s) for s in scopes.split(",")]).token
        time.sleep(
            KEY_RELOAD_SECONDS + 0.2
        )  # a gateway re-reads a changed key file at its next request after this
        return token

    def client(self, replica: int, key: str | None) -> openai.OpenAI:
        # the client insists on a key: a keyless caller is one whose Authorization header is blank
        headers = {} if key else {"Authorization": ""}
        url = f"{self.urls[replica]}/v1"
        return openai.OpenAI(
            base_url=url, api_key=key or "none", default_headers=headers, max_retries=0, timeout=20
        )


@pytest.fixture
def replicas(
    tmp_path: Path, model_server: str, redis: RedisServer, request: pytest.FixtureRequest
) -> Callable[..., Replicas]:
    """``replicas(limits={...}, on_unavailable=...)`` starts two gateway processes sharing Redis."""
    stack = ExitStack()
    request.addfinalizer(stack.close)

    def start(
        limits: dict[str, Any] | None = None, on_unavailable: str = "failClosed", redis_url: str | None = None
    ) -> Replicas:
        keys_file = tmp_path / "access" / "keys.json"
        signing_key = tmp_path / "access" / "signing.key"
        load_or_create_signing_key(signing_key)
        urls, audit_logs = [], []
        for index in range(2):
            audit = tmp_path / f"replica-{index}" / "audit.jsonl"
            config = {
                "deployment": DEPLOYMENT,
                "versions": [{"name": "tuned", "url": model_server, "weight": 100}],
                "access": {
                    "auth": "required",
                    "keysFile": str(keys_file),
                    "signingKeyFile": str(signing_key),
                    "limits": {"perKey": limits or {}},
                    "store": {
                        "redisUrl": redis_url or redis.url,
                        "keyPrefix": tmp_path.name,  # every test its own counters
                        "onUnavailable": on_unavailable,
                    },
                    "audit": {"path": str(audit)},
                },
            }
            config_path = tmp_path / f"gateway-{index}.json"
            config_path.write_text(json.dumps(config))
            urls.append(start_gateway(stack, config_path, tmp_path / f"gateway-{index}.log"))
            audit_logs.append(audit)
        return Replicas(urls, keys_file, audit_logs)

    return start


def _ask(client: openai.OpenAI, stream: bool = False) -> Any:
    messages: Any = [{"role": "user", "content": "hello"}]
    if stream:
        return "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(model=DEPLOYMENT, messages=messages, stream=True)
            if chunk.choices
        )
    return client.chat.completions.create(model=DEPLOYMENT, messages=messages)


def test_a_per_key_request_limit_holds_across_both_replicas(replicas: Callable[..., Replicas]) -> None:
    pair = replicas(limits={"requestsPerMinute": 4})
    key = pair.key()
    started = time.monotonic()
    served, refusals = 0, []
    for turn in range(8):  # alternating replicas
        try:
            _ask(pair.client(turn % 2, key))
            served += 1
        except openai.RateLimitError as refused:
            refusals.append(refused)
    elapsed = time.monotonic() - started
    # a burst of 4, then one more request each 15 s (4 a minute), both replicas together: a slow
    # machine may earn one back, but never 2 x 4
    assert 4 <= served <= 4 + int(elapsed // 15), (served, elapsed)
    assert len(refusals) == 8 - served
    for error in refusals:
        assert error.status_code == 429 and error.code == "rate_limit_exceeded"
        assert error.type == "requests"
        assert int(error.response.headers["retry-after"]) >= 1
    _ask(pair.client(0, pair.key()))  # another key has its own limit


def test_a_token_budget_stops_a_key_after_its_tokens_streams_included(
    replicas: Callable[..., Replicas],
) -> None:
    pair = replicas(limits={"tokensPerDay": 30})  # 12 tokens a request: the third one crosses it
    key = pair.key()
    assert _ask(pair.client(0, key), stream=True) == "four words"
    assert _ask(pair.client(1, key), stream=True) == "four words"
    _ask(pair.client(0, key))
    with pytest.raises(openai.RateLimitError) as refused:
        _ask(pair.client(1, key), stream=True)
    assert refused.value.code == "insufficient_quota" and refused.value.type == "insufficient_quota"
    assert int(refused.value.response.headers["retry-after"]) >= 1


def test_keys_scopes_and_revocation_on_both_replicas(replicas: Callable[..., Replicas]) -> None:
    pair = replicas()
    key = pair.key(scopes="inference")
    for replica in (0, 1):
        with pytest.raises(openai.AuthenticationError) as missing:
            _ask(pair.client(replica, None))
        assert missing.value.status_code == 401 and missing.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError) as wrong:
            _ask(pair.client(replica, key[:-4] + "AAAA"))
        assert wrong.value.code == "invalid_api_key"
        _ask(pair.client(replica, key))
        forbidden = httpx.get(
            f"{pair.urls[replica]}/v1/experiments", headers={"authorization": f"Bearer {key}"}
        )
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["code"] == "insufficient_permissions"

    revoke_key(pair.keys_file, key.removeprefix("kt-").split("_")[0])
    deadline = time.monotonic() + 10
    refused: set[int] = set()
    while refused != {0, 1} and time.monotonic() < deadline:
        for replica in (0, 1):
            try:
                _ask(pair.client(replica, key))
            except openai.AuthenticationError:
                refused.add(replica)
        time.sleep(0.2)
    assert refused == {0, 1}, "a revoked key was still accepted after 10 s"


def test_feedback_on_either_replica_and_experiments_agree(replicas: Callable[..., Replicas]) -> None:
    pair = replicas()
    key = pair.key()
    headers = {"authorization": f"Bearer {key}"}
    answers = [_ask(pair.client(0, key)) for _ in range(3)]
    for answer in answers:  # feedback goes to the replica that did not serve the request
        rated = httpx.post(
            f"{pair.urls[1]}/v1/feedback", json={"requestId": answer.id, "score": 1}, headers=headers
        )
        assert rated.status_code == 200 and rated.json()["version"] == "tuned"
    again = httpx.post(
        f"{pair.urls[0]}/v1/feedback", json={"requestId": answers[0].id, "score": 0}, headers=headers
    )
    assert again.status_code == 409  # rated once, whichever replica is asked
    forged = answers[0].id[:-3] + "xyz"
    assert (
        httpx.post(
            f"{pair.urls[0]}/v1/feedback", json={"requestId": forged, "score": 1}, headers=headers
        ).status_code
        == 404
    )

    deadline = time.monotonic() + 10
    reports: list[Any] = []
    while time.monotonic() < deadline:
        reports = [httpx.get(f"{url}/v1/experiments", headers=headers).json() for url in pair.urls]
        if reports[0]["versions"][0]["requests"] == 3:
            break
        time.sleep(0.1)
    assert reports[0] == reports[1]
    tuned = reports[0]["versions"][0]
    assert (tuned["requests"], tuned["feedbackCount"], tuned["meanFeedback"]) == (3, 3, 1.0)


def test_limits_fail_closed_when_redis_is_gone(tmp_path: Path, replicas: Callable[..., Replicas]) -> None:
    with running_redis(tmp_path / "own-redis") as own_redis:
        pair = replicas(limits={"requestsPerMinute": 100}, redis_url=own_redis.url)
        key = pair.key()
        _ask(pair.client(0, key))
        own_redis.stop()
        response = httpx.post(
            f"{pair.urls[0]}/v1/chat/completions",
            json={"model": DEPLOYMENT, "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "limit_store_unavailable"
        assert response.headers["retry-after"] == "1"
        health = httpx.get(f"{pair.urls[0]}/healthz").json()
        assert "Redis" in health["limitStoreError"]
        metrics = httpx.get(f"{pair.urls[0]}/metrics").text
        assert f'kubetune_gateway_limit_store_up{{deployment="{DEPLOYMENT}"}} 0.0' in metrics
        # readiness shows it (on a cluster: the gateway's rollout, hence the Ready condition) ...
        not_ready = httpx.get(f"{pair.urls[0]}/readyz")
        assert not_ready.status_code == 503 and "(failClosed)" in not_ready.json()["refusing"]
        # ... until Redis answers again, with no request needed to notice
        restarted = subprocess.Popen(
            [redis_binary(), "--port", str(own_redis.port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while httpx.get(f"{pair.urls[0]}/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the gateway did not notice Redis was back"
                time.sleep(0.2)
            _ask(pair.client(0, key))
        finally:
            restarted.terminate()
            restarted.wait(timeout=10)


def test_the_audit_log_of_a_replica_verifies(replicas: Callable[..., Replicas]) -> None:
    pair = replicas()
    key = pair.key()
    _ask(pair.client(0, key))
    with pytest.raises(openai.AuthenticationError):
        _ask(pair.client(0, "kt-000000000000_nope"))
    lines = [json.loads(line) for line in pair.audit_logs[0].read_text().splitlines()]
    assert [line["decision"] for line in lines] == ["served", "unauthenticated"]
    assert (
        lines[0]["keyId"] == key.removeprefix("kt-").split("_")[0]
        and key not in pair.audit_logs[0].read_text()
    )
    assert verify(pair.audit_logs[0]).ok
