"""A ModelDeployment served by `kubetune up` in local mode, end to end, with real processes.

A LoRA adapter on the tiny pretrained base is trained and published in-process (a few seconds, the
real finetune and publish steps); `kubetune up` then runs a real QuantizeJob of it and serves two
versions (the adapter `tuned` 80%, the job's int8 model 20%) behind the gateway. The test talks to
the endpoint in the status with the official openai client, changes the weights with a second
`kubetune up -f` (applied in place: same server processes), kills a version's server (reported,
restarted), and finally interrupts `up` and checks that every process it started is gone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from kubetune.gateway.routing import Router

if TYPE_CHECKING:
    from conftest import KubetuneCli

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KUBETUNE = [sys.executable, "-m", "kubetune"]

NAME = "router"
USERS = [f"user-{index:03d}" for index in range(100)]
INSTRUCTION = "Route the support ticket to one team: billing, technical, account, shipping or returns."


def resources(adapter: Path, tuned: int, int8: int) -> str:
    return f"""\
apiVersion: kubetune.dev/v1alpha1
kind: QuantizeJob
metadata: {{name: router-int8}}
spec:
  model: {{uri: {adapter}}}
  method: {{type: int8-weight-only}}
  target: cpu
  evaluation: {{maxSamples: 2, maxNewTokens: 2, latencyPrompts: 1, latencyNewTokens: 2}}
  executor: local
---
apiVersion: kubetune.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {NAME}}}
spec:
  versions:
    - {{name: tuned, model: {{uri: {adapter}}}, weight: {tuned}}}
    - {{name: int8, model: {{quantizeJobRef: {{name: router-int8}}}}, weight: {int8}}}
  routing: {{stickyBy: user}}
  generation:
    defaults: {{temperature: "0", maxTokens: 4}}
    contextWindow: {{maxPromptTokens: 96, overflow: truncate}}
"""


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """A LoRA adapter of the tiny base, trained for a few steps and published by the real steps."""
    from tiny_adapter import publish_lora_adapter

    tickets = REPO / "examples" / "quickstart" / "data" / "support-tickets.jsonl"
    # Typed here: plain `mypy FILE` does not search tests/ (pytest's pythonpath), so it reads Any.
    published: Path = publish_lora_adapter(
        tmp_path_factory.mktemp("adapter"),
        tiny_base,
        [json.loads(line) for line in tickets.read_text().splitlines()[:64]],
        lora={"r": 8, "alpha": 16},
        training={"maxSteps": 8, "batchSize": 8, "learningRate": "3e-3", "seed": 1, "maxSeqLength": 96},
        dataset=tickets,
    )
    return published


class UpProcess:
    """`kubetune up` in the background, its output in a file; remembers every process under it."""

    def __init__(self, project: Path, *files: Path) -> None:
        self.log = project / "up.log"
        args = [arg for path in files for arg in ("-f", str(path))]
        with self.log.open("wb") as output:
            self.popen = subprocess.Popen(
                [*KUBETUNE, "up", *args], stdout=output, stderr=subprocess.STDOUT, env=dict(os.environ)
            )
        self.seen: dict[int, float] = {}

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def snapshot(self) -> list[psutil.Process]:
        """The processes under `up` now (and remember them, to check they are all gone at the end)."""
        try:
            children: list[psutil.Process] = psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in children:
            try:
                self.seen[child.pid] = child.create_time()
            except psutil.NoSuchProcess:
                continue
        return children

    def wait_for(self, what: str, check: Callable[[], Any], timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            self.snapshot()
            value = check()
            if value:
                return value
            if self.popen.poll() is not None:
                pytest.fail(
                    f"kubetune up exited with {self.popen.returncode} before {what}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"not {what} within {timeout_s:.0f}s:\n{self.output()[-6000:]}")
            time.sleep(0.5)

    def servers(self) -> dict[str, psutil.Process]:
        """version -> its `bentoml serve` process; "gateway" -> the gateway."""
        found: dict[str, psutil.Process] = {}
        for process in self.snapshot():
            try:
                command = process.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "kubetune.gateway" in command:
                found["gateway"] = process
            elif "bentoml" in command and "serve" in command:
                tag = command[command.index("serve") + 1]
                found[tag.split(":")[0].removeprefix(f"{NAME}-")] = process
        return found


def stored(project: Path) -> dict[str, Any]:
    path = project / ".kubetune" / "store" / "modeldeployments" / "default" / f"{NAME}.json"
    try:
        value: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return value


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def ready_with(project: Path, weights: str) -> dict[str, Any] | None:
    obj = stored(project)
    status = obj.get("status") or {}
    if condition(obj, "Ready").get("status") == "True" and status.get("weights") == weights:
        return obj
    return None


def messages(ticket: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": ticket}]


def split(client: OpenAI) -> dict[str, str]:
    """user -> the version that answered one request of theirs."""
    answered = {}
    for user in USERS:
        raw = client.chat.completions.with_raw_response.create(
            model=NAME, user=user, messages=messages("my parcel never arrived"), max_tokens=1
        )
        answered[user] = raw.headers["x-kubetune-version"]
    return answered


def alive(pid: int, created: float) -> bool:
    try:
        process = psutil.Process(pid)
        return bool(process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - created) < 1)
    except psutil.NoSuchProcess:
        return False


def test_up_serves_splits_reweights_in_place_restarts_and_stops_everything(
    project: Path, kubetune: KubetuneCli, adapter: Path
) -> None:
    app = project / "app.yaml"
    app.write_text(resources(adapter, 80, 20))
    up = UpProcess(project, app)
    try:
        obj = up.wait_for("Ready", lambda: ready_with(project, "tuned=80,int8=20"), timeout_s=420)
        output = up.output()
        # It waited for the QuantizeJob, ran it, then served its model.
        assert "waiting for QuantizeJob/router-int8 to succeed" in output
        assert "quantizejob/router-int8  Succeeded" in output
        status = obj["status"]
        endpoint = status["endpoint"]
        assert endpoint.startswith("http://127.0.0.1:") and endpoint.endswith("/v1")
        assert [(v["name"], v["weight"], v["ready"]) for v in status["versions"]] == [
            ("tuned", 80, True),
            ("int8", 20, True),
        ]
        assert status["versions"][1]["modelUri"].endswith("router-int8/v1")
        # `up` stores the status, then prints how to use the endpoint: on a loaded machine the line can
        # come a moment after the store says Ready.
        try_it = f"curl -si {endpoint}/chat/completions"  # the ready message's last part
        output = up.wait_for("the ready message", lambda: try_it in up.output() and up.output(), timeout_s=60)
        assert f"modeldeployment/{NAME} is ready: OpenAI-compatible endpoint {endpoint}" in output
        table = kubetune("get", "mdep", "-o", "wide").stdout.splitlines()
        assert table[0].split() == [
            "NAME",
            "READY",
            "VERSIONS",
            "WEIGHTS",
            "ROLLOUT",
            "AGE",
            "ENDPOINT",
            "REASON",
        ]
        row = table[1].split()
        assert row[:4] == [NAME, "True", "2/2", "tuned=80,int8=20"] and row[-2:] == [
            endpoint,
            "AllVersionsReady",
        ]

        client = OpenAI(base_url=endpoint, api_key="unused", timeout=60, max_retries=0)
        versions = set()
        for user in ("alice", "bob", "carol"):
            raw = client.chat.completions.with_raw_response.create(
                model=NAME, user=user, messages=messages("I was charged twice this month")
            )
            completion = raw.parse()
            assert completion.model == NAME and completion.choices[0].message.content
            versions.add(raw.headers["x-kubetune-version"])
        assert versions <= {"tuned", "int8"}
        stream = client.chat.completions.create(
            model=NAME, user="dave", messages=messages("the app crashes on start"), stream=True
        )
        assert stream.response.headers["x-kubetune-version"] in {"tuned", "int8"}
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        assert len(pieces) >= 2 and "".join(pieces)
        pinned = client.chat.completions.with_raw_response.create(
            model=NAME, user="alice", messages=messages("hi"), extra_headers={"x-kubetune-version": "int8"}
        )
        assert pinned.headers["x-kubetune-version"] == "int8"

        answered = split(client)
        expected = Router([("tuned", 80), ("int8", 20)])
        assert answered == {user: expected.sticky(user) for user in USERS}  # sticky, by weight
        assert 0.1 <= Counter(answered.values())["int8"] / len(USERS) <= 0.3, Counter(answered.values())
        processes = up.servers()
        assert set(processes) == {"tuned", "int8", "gateway"}, processes
        before = {name: (p.pid, p.create_time()) for name, p in processes.items()}

        # A weight change, applied by a second `kubetune up -f`, in place.
        app.write_text(resources(adapter, 50, 50))
        second = kubetune("up", "-f", str(app), timeout=60)
        assert f"modeldeployment/{NAME} configured" in second.stdout
        assert "quantizejob/router-int8 unchanged" in second.stdout
        assert "it applies the change" in second.stdout
        up.wait_for("reweighted", lambda: ready_with(project, "tuned=50,int8=50"), timeout_s=60)
        gateway = endpoint.removesuffix("/v1")
        up.wait_for(
            "routing 50/50",
            lambda: httpx.get(f"{gateway}/healthz").json()["versions"] == {"tuned": 50, "int8": 50},
            timeout_s=30,
        )
        answered = split(client)
        expected = Router([("tuned", 50), ("int8", 50)])
        assert answered == {user: expected.sticky(user) for user in USERS}
        assert 0.35 <= Counter(answered.values())["int8"] / len(USERS) <= 0.65
        after = {name: (p.pid, p.create_time()) for name, p in up.servers().items()}
        assert after == before  # same processes: nothing was restarted

        # A crashed server is reported and restarted.
        os.kill(before["int8"][0], signal.SIGKILL)
        up.wait_for(
            "the crash reported",
            lambda: (
                "version int8 of modeldeployment/router: bentoml serve was killed by SIGKILL; "
                "restarting it in 1s" in up.output()
            ),
            timeout_s=30,
        )
        up.wait_for("not Ready", lambda: condition(stored(project), "Ready").get("status") == "False", 30)
        assert condition(stored(project), "Ready")["reason"] == "VersionNotReady"
        up.wait_for("Ready again", lambda: ready_with(project, "tuned=50,int8=50"), timeout_s=180)
        restarted = up.servers()
        assert restarted["int8"].pid != before["int8"][0]
        assert (restarted["tuned"].pid, restarted["gateway"].pid) == (
            before["tuned"][0],
            before["gateway"][0],
        )
        raw = client.chat.completions.with_raw_response.create(
            model=NAME, user="alice", messages=messages("hi"), extra_headers={"x-kubetune-version": "int8"}
        )
        assert raw.headers["x-kubetune-version"] == "int8"
    finally:
        up.snapshot()
        if up.popen.poll() is None:
            up.popen.send_signal(signal.SIGINT)
        returncode = up.popen.wait(timeout=90)

    output = up.output()
    assert returncode == 0, output
    assert "SIGINT: stopping" in output and "stopped 3 process(es):" in output
    assert up.seen and not [pid for pid, created in up.seen.items() if alive(pid, created)], output
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", int(gateway.rsplit(":", 1)[1]))) != 0
    final = stored(project)
    assert condition(final, "Ready")["reason"] == "NotServed" and "endpoint" not in final["status"]
    assert not (project / ".kubetune" / "serving" / "processes.json").exists()
