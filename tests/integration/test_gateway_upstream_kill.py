"""The gateway's only version's model server SIGKILLed while requests flow, then started again.

Real processes: the gateway (``python -m kubetune.gateway``) in front of a stand-in model server
(openai_stub_server.py, answering after a short delay so that requests are in flight when it dies).
Eight clients send chat completions one after another throughout. No request may hang past the
gateway's bounded waits; every answer is a completion or a well-formed OpenAI error (503 with
Retry-After while no version can answer); once the server is back, traffic recovers by itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

STUB = Path(__file__).parent / "openai_stub_server.py"
CLIENTS = 8
ANSWER_DELAY_S = 0.05
MARK_DOWN_S = 1
CONNECT_S, RESPONSE_S = 1, 3
# The longest a request may take: its bounded waits, plus a loaded machine's scheduling.
REQUEST_BOUND_S = CONNECT_S + RESPONSE_S + 6
ERROR_STATUSES = {502, 503, 504}


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until_answering(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, f"the {what} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"the {what} did not answer at {url}"
        time.sleep(0.1)


@dataclass(frozen=True)
class Answer:
    sent: float
    seconds: float
    status: int
    headers: dict[str, str]
    body: Any


class Clients:
    """Clients that each send one chat completion after another, recording every answer."""

    def __init__(self, gateway_url: str) -> None:
        self.url = f"{gateway_url}/v1/chat/completions"
        self.answers: list[Answer] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._send, args=(n,), daemon=True) for n in range(CLIENTS)]

    def start(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=REQUEST_BOUND_S * 2)
        assert not any(thread.is_alive() for thread in self._threads), "a client is stuck"

    def since(self, moment: float) -> list[Answer]:
        with self._lock:
            return [answer for answer in self.answers if answer.sent >= moment]

    def _send(self, client: int) -> None:
        request = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "user": f"user-{client}"}
        with httpx.Client(timeout=REQUEST_BOUND_S * 2) as http:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = http.post(self.url, json=request)
                except httpx.HTTPError as error:  # a hang ends here, as a client timeout
                    with self._lock:
                        self.failures.append(f"{type(error).__name__} after {time.monotonic() - sent:.1f}s")
                    continue
                try:
                    body = response.json()
                except json.JSONDecodeError:
                    body = response.text
                answer = Answer(
                    sent, time.monotonic() - sent, response.status_code, dict(response.headers), body
                )
                with self._lock:
                    self.answers.append(answer)


@dataclass
class Upstream:
    port: int
    process: subprocess.Popen[bytes]

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, str(STUB), str(self.port), str(ANSWER_DELAY_S)])
        wait_until_answering(f"http://127.0.0.1:{self.port}/health", self.process, "model server")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def upstream_and_gateway(tmp_path: Path) -> Iterator[tuple[Upstream, str]]:
    upstream = Upstream(free_port(), subprocess.Popen(["true"]))
    upstream.start()
    gateway_port = free_port()
    config = tmp_path / "gateway.json"
    config.write_text(
        json.dumps(
            {
                "deployment": "chat",
                "versions": [{"name": "tuned", "url": f"http://127.0.0.1:{upstream.port}", "weight": 100}],
                "timeouts": {
                    "connectSeconds": CONNECT_S,
                    "firstByteSeconds": RESPONSE_S,
                    "responseSeconds": RESPONSE_S,
                },
                "health": {"markDownSeconds": MARK_DOWN_S},
            }
        )
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "kubetune.gateway", "--config", str(config), "--port", str(gateway_port)],
        stdout=(tmp_path / "gateway.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    try:
        wait_until_answering(f"{gateway_url}/healthz", gateway, "gateway")
        yield upstream, gateway_url
    finally:
        for process in (gateway, upstream.process):
            process.kill()
            process.wait()


def is_completion(answer: Answer) -> bool:
    return (
        answer.status == 200
        and isinstance(answer.body, dict)
        and answer.body.get("object") == "chat.completion"
    )


def assert_well_formed_error(answer: Answer) -> None:
    assert answer.status in ERROR_STATUSES, answer
    error = answer.body["error"] if isinstance(answer.body, dict) else None
    assert isinstance(error, dict) and error.get("message") and error.get("type"), answer
    if answer.status == 503:
        assert int(answer.headers["retry-after"]) >= 1, answer


def test_killing_the_model_server_under_load_gives_bounded_errors_and_traffic_recovers(
    upstream_and_gateway: tuple[Upstream, str],
) -> None:
    upstream, gateway_url = upstream_and_gateway
    clients = Clients(gateway_url).start()
    try:
        time.sleep(2.0)
        killed_at = time.monotonic()
        upstream.kill()
        time.sleep(3.0)
        restarted_at = time.monotonic()
        upstream.start()
        back_at = time.monotonic()

        def recovered() -> bool:
            latest = clients.since(back_at)[-4 * CLIENTS :]
            return len(latest) == 4 * CLIENTS and all(is_completion(answer) for answer in latest)

        deadline = back_at + MARK_DOWN_S + 20
        while not recovered():
            assert time.monotonic() < deadline, f"traffic did not recover: {clients.since(back_at)[-8:]}"
            time.sleep(0.2)
    finally:
        clients.stop()

    assert clients.failures == []
    answers = clients.since(0.0)
    assert max(answer.seconds for answer in answers) < REQUEST_BOUND_S
    before = [answer for answer in answers if answer.sent + answer.seconds < killed_at]
    assert before and all(is_completion(answer) for answer in before)
    for answer in answers:
        if not is_completion(answer):
            assert_well_formed_error(answer)
    while_down = [answer for answer in answers if killed_at + 0.5 <= answer.sent < restarted_at]
    assert while_down, "no request was sent while the model server was down"
    unavailable = [answer for answer in while_down if answer.status == 503]
    assert unavailable, f"no 503 while the model server was down: {[a.status for a in while_down]}"
    assert all(answer.body["error"]["type"] == "service_unavailable" for answer in unavailable)
    assert not any(is_completion(answer) for answer in while_down)
