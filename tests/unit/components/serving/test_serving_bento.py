"""Bentos of a model version, and the real `bentoml serve` of the service (the slow tests).

Every BentoML store lives in a temporary BENTOML_HOME; every server listens on a free loopback port
and is stopped (with its workers: the whole process group) when its test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import httpx
import pytest
from bentoml.exceptions import NotFound
from prometheus_client.parser import text_string_to_metric_families

from asgi_server import free_port
from kubetune_components.common.errors import ConfigError
from kubetune_components.serving import bento as bento_module
from kubetune_components.serving.artifacts import inspect_model_dir
from kubetune_components.serving.bento import (
    bento_name,
    bentoml_home_context,
    build_bento,
    export_bento,
    import_bento,
)
from kubetune_components.serving.service import resolve_model
from kubetune_contract.serving import MODEL_ALIAS, MODEL_INVALID_EXIT_CODE

SERVER_START_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, published_adapter: Path) -> tuple[str, Path]:
    """(tag, BENTOML_HOME) of the adapter's Bento for version `canary` of `support-bot`."""
    home = tmp_path_factory.mktemp("bentoml-home")
    return build_bento(published_adapter, "support-bot", "canary", bentoml_home=home), home


# --------------------------------------------------------------------------------------------------
# Building, exporting and importing.


def test_bento_names_follow_the_contract() -> None:
    assert bento_name("Support-Bot", "Tuned") == "support-bot-tuned"
    with pytest.raises(ConfigError, match="deployment 'support bot' must be lowercase letters"):
        bento_name("support bot", "tuned")
    with pytest.raises(ConfigError, match="version '' must be"):
        bento_name("support-bot", "")
    with pytest.raises(ConfigError, match="is 70 characters long; BentoML allows 63"):
        bento_name("d" * 60, "tuned-v2x")


def test_build_bento_bundles_the_adapter_with_its_base(
    built: tuple[str, Path], published_adapter: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    tag, home = built
    assert re.fullmatch(r"support-bot-canary:[0-9a-f]{16}", tag)
    with bentoml_home_context(home):
        bento = bentoml.bentos.get(tag)
        assert str(bento.tag) == tag
        assert bento.info.labels["kubetune-deployment"] == "support-bot"
        assert bento.info.labels["kubetune-version"] == "canary"
        assert [(model.alias, model.tag.name) for model in bento.info.models] == [
            (MODEL_ALIAS, "support-bot-canary")
        ]
        model_dir = Path(bentoml.models.get(bento.info.models[0].tag).path)
    assert (Path(bento.path) / "src" / "kubetune_components" / "serving" / "service.py").is_file()
    requirements = (Path(bento.path) / "env" / "python" / "requirements.txt").read_text()
    assert re.search(r"^torch==\d", requirements, re.MULTILINE)
    assert re.search(r"^bentoml==", requirements, re.MULTILINE)

    artifact = inspect_model_dir(model_dir)
    assert (artifact.kind, artifact.base_uri) == ("peft-adapter", str(model_dir / "base"))
    assert (model_dir / "adapter_model.safetensors").read_bytes() == (
        published_adapter / "adapter_model.safetensors"
    ).read_bytes()
    assert (model_dir / "base" / "model.safetensors").read_bytes() == (
        tiny_model_dir / "model.safetensors"
    ).read_bytes()

    assert build_bento(published_adapter, "support-bot", "canary", bentoml_home=home) == tag  # idempotent
    with bentoml_home_context(home):
        assert [str(b.tag) for b in bentoml.bentos.list("support-bot-canary")] == [tag]
    with bentoml_home_context(tmp_path / "another-home"), pytest.raises(NotFound):
        bentoml.bentos.get(tag)


def test_bento_exports_to_one_archive_that_imports_elsewhere(built: tuple[str, Path], tmp_path: Path) -> None:
    tag, home = built
    archive = export_bento(tag, tmp_path / "artifacts" / "support-bot-canary.bento", bentoml_home=home)
    assert Path(archive).is_file()
    pod_home = tmp_path / "pod-home"
    assert import_bento(archive, bentoml_home=pod_home) == tag
    assert import_bento(archive, bentoml_home=pod_home) == tag  # an init container may run twice
    with bentoml_home_context(pod_home):
        bento = bentoml.bentos.get(tag)
        model_dir = Path(bentoml.models.get(bento.info.models[0].tag).path)
    assert (model_dir / "base" / "config.json").is_file()
    with pytest.raises(ConfigError, match="does not exist"):
        import_bento(tmp_path / "missing.bento", bentoml_home=pod_home)
    with pytest.raises(ConfigError, match="there is no Bento"):
        export_bento("support-bot-canary:0000000000000000", tmp_path / "x.bento", bentoml_home=home)


def test_cli_builds_and_reports_errors(
    published_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(tmp_path / "home")
    args = ["--bentoml-home", home, "build", "--model-dir", str(published_adapter), "--deployment", "bot"]
    assert bento_module.main([*args, "--version", "v1"]) == 0
    assert re.fullmatch(r"bot-v1:[0-9a-f]{16}\n", capsys.readouterr().out)
    # a name that can never be built: the init container tells the operator not to retry it
    assert bento_module.main([*args, "--version", "no way"]) == MODEL_INVALID_EXIT_CODE
    assert "version 'no way' must be lowercase letters" in capsys.readouterr().err


def test_the_service_takes_its_model_from_the_environment_or_refuses(
    published_adapter: Path, tmp_path: Path
) -> None:
    with bentoml_home_context(tmp_path / "empty-home"):
        path, settings = resolve_model(
            {
                "KUBETUNE_MODEL_DIR": str(published_adapter),
                "KUBETUNE_DEPLOYMENT": "bot",
                "KUBETUNE_VERSION": "v1",
            }
        )
        assert (path, settings.deployment, settings.version, settings.model_id) == (
            published_adapter,
            "bot",
            "v1",
            "bot",
        )
        with pytest.raises(ConfigError, match=r"KUBETUNE_MODEL_DIR=.* is not a directory"):
            resolve_model({"KUBETUNE_MODEL_DIR": str(tmp_path / "nothing")})
        with pytest.raises(ConfigError, match="KUBETUNE_MODEL_DIR is not set and this service does not run"):
            resolve_model({})


# --------------------------------------------------------------------------------------------------
# Real servers.


def _log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (arbiter and workers), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


BIND_ATTEMPTS = 3


def _start_bentoml(
    target: str, environment: dict[str, str], workdir: Path, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `bentoml serve` and wait for /readyz. A port picked free can be taken before bentoml binds
    it (by any process on the machine): that start is retried on another port, nothing else is."""
    for _ in range(BIND_ATTEMPTS):
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            target,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        with log.open("wb") as output:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                if f"Could not bind 127.0.0.1:{port}" in log.read_text(errors="replace"):
                    break
                pytest.fail(f"bentoml serve exited with {process.returncode}:\n{_log_tail(log)}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return process, url
            if time.monotonic() > deadline:
                _stop(process)
                pytest.fail(
                    f"bentoml serve was not ready within {SERVER_START_TIMEOUT_S}s:\n{_log_tail(log)}"
                )
            time.sleep(0.25)
    pytest.fail(f"bentoml serve could not bind a free port in {BIND_ATTEMPTS} tries:\n{_log_tail(log)}")


@contextlib.contextmanager
def bentoml_server(target: str, env: dict[str, str], workdir: Path) -> Iterator[str]:
    """`bentoml serve target` on a free loopback port; yields its base URL once /readyz says so."""
    log = workdir / "server.log"
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("KUBETUNE_", "BENTOML_"))
    }
    environment.update({"BENTOML_DO_NOT_TRACK": "True", "OMP_NUM_THREADS": "1", **env})
    process, url = _start_bentoml(target, environment, workdir, log)
    try:
        yield url
    finally:
        _stop(process)


def chat_both_ways(url: str) -> tuple[dict[str, Any], str]:
    """A greedy chat completion, plain and streamed: (the plain body, the streamed text)."""
    request: dict[str, Any] = {
        "model": "support-bot",
        "messages": [{"role": "user", "content": "ticket about billing"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    with httpx.Client(base_url=url, timeout=60) as client:
        plain = client.post("/v1/chat/completions", json=request)
        assert plain.status_code == 200, plain.text
        pieces: list[str] = []
        with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in streamed.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        assert chunk["object"] == "chat.completion.chunk"
        pieces.append(chunk["choices"][0]["delta"].get("content", ""))
    return plain.json(), "".join(pieces)


def metric_value(url: str, name: str, labels: dict[str, str]) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name}{labels} is not in /metrics")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bentoml_serve_with_a_model_dir(published_adapter: Path, tmp_path: Path) -> None:
    env = {
        "KUBETUNE_MODEL_DIR": str(published_adapter),
        "KUBETUNE_DEPLOYMENT": "support-bot",
        "KUBETUNE_VERSION": "canary",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
    }
    with bentoml_server("kubetune_components.serving.service:LLMService", env, tmp_path) as url:
        assert httpx.get(f"{url}/livez").status_code == 200
        body, streamed_text = chat_both_ways(url)
        assert body["object"] == "chat.completion"
        assert body["usage"]["completion_tokens"] >= 1
        assert streamed_text == body["choices"][0]["message"]["content"]
        labels = {"deployment": "support-bot", "version": "canary"}
        chat = {**labels, "endpoint": "/v1/chat/completions", "code": "200"}
        assert metric_value(url, "kubetune_serving_requests_total", chat) == 2
        assert metric_value(url, "kubetune_serving_time_to_first_token_seconds_count", labels) == 2
        assert metric_value(url, "kubetune_serving_tokens_total", {**labels, "direction": "out"}) >= 2
        missing = httpx.get(f"{url}/v1/embeddings")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bentoml_serve_from_an_imported_bento(built: tuple[str, Path], tmp_path: Path) -> None:
    """What a serving pod does: import the exported archive, serve the tag; identity from the Bento."""
    tag, home = built
    pod_home = tmp_path / "pod-home"
    archive = export_bento(tag, tmp_path / "support-bot-canary.bento", bentoml_home=home)
    import_bento(archive, bentoml_home=pod_home)
    with bentoml_server(tag, {"BENTOML_HOME": str(pod_home)}, tmp_path) as url:
        models = httpx.get(f"{url}/v1/models").json()
        assert models["data"][0]["id"] == "support-bot"
        assert models["data"][0]["kubetune"]["version"] == "canary"
        body, streamed_text = chat_both_ways(url)
        assert streamed_text == body["choices"][0]["message"]["content"]
        chat = {"deployment": "support-bot", "version": "canary", "endpoint": "/v1/chat/completions"}
        assert metric_value(url, "kubetune_serving_requests_total", {**chat, "code": "200"}) == 2
