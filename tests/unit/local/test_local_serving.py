"""LocalServing's supervision of version servers, with a stand-in interpreter whose `bentoml serve`
crashes or sleeps (no model is loaded), in seconds; and the async backend `up` awaits over it."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.common.supervision import process_alive
from kubetune.local.serving import LocalServing, ServingOnTheLoop
from kubetune.plan.versions import DeploymentRef, VersionObservation, VersionServing
from kubetune_contract.deployment import Serving

ROUTER = DeploymentRef(name="router", namespace="default")
STAND_IN = f"""\
#!{sys.executable}
import os, sys, time
args = sys.argv[1:]
if args[:2] == ["-m", "kubetune_components.serving.bento"]:
    if os.path.basename(args[args.index("--model-dir") + 1]) == "not-a-model":
        print("ValueError: no config.json in the model directory", flush=True)
        sys.exit(1)
    print(f"{{args[args.index('--deployment') + 1]}}-{{args[args.index('--version') + 1]}}:standin1")
elif args[:3] == ["-m", "bentoml", "serve"]:
    print("loading", flush=True)
    if os.environ.get("STAND_IN_SERVE") == "crash":
        print("RuntimeError: the model would not load", flush=True)
        sys.exit(1)
    time.sleep(60)
"""


def version(serve: str, model_uri: str = "/models/tuned") -> VersionServing:
    return VersionServing(
        name="tuned",
        model_uri=model_uri,
        bento="router-tuned",
        env={"STAND_IN_SERVE": serve},
        serving=Serving(),
    )


@pytest.fixture
def stand_in_python(tmp_path: Path) -> Path:
    path = tmp_path / "python"
    path.write_text(textwrap.dedent(STAND_IN))
    path.chmod(0o755)
    return path


@pytest.fixture
def said() -> list[str]:
    return []


@pytest.fixture
def serving(tmp_path: Path, stand_in_python: Path, said: list[str]) -> Iterator[LocalServing]:
    serving = LocalServing(
        tmp_path / "home", notify=said.append, python=str(stand_in_python), stop_grace_s=2.0
    )
    yield serving
    serving.close()


def step_until(serving: LocalServing, spec: VersionServing, done: object, timeout_s: float = 20.0) -> str:
    """Step the version once every 50 ms until ``done()``; returns its last message."""
    assert callable(done)
    deadline = time.monotonic() + timeout_s
    while True:
        message = serving.ensure_versions(ROUTER, [spec])["tuned"].message or ""
        if done():
            return message
        assert time.monotonic() < deadline, f"timed out; last message: {message}"
        time.sleep(0.05)


def test_a_crashing_server_is_reported_and_restarted_with_a_growing_backoff(
    serving: LocalServing, said: list[str]
) -> None:
    spec = version(serve="crash")

    def restarts() -> list[str]:
        return [line for line in said if "restarting it in" in line]

    message = step_until(serving, spec, lambda: len(restarts()) == 2)
    assert said[0].startswith("building Bento router-tuned for version tuned of modeldeployment/router")
    assert said[1].startswith("built Bento router-tuned:standin1 for version tuned")
    assert said[2].startswith("started bentoml serve router-tuned:standin1 for version tuned")
    first, second = restarts()
    assert "bentoml serve exited with code 1: RuntimeError: the model would not load" in first
    assert "restarting it in 1s (failure 1 in a row" in first
    assert "restarting it in 2s (failure 2 in a row" in second
    assert message.startswith("bentoml serve exited with code 1: RuntimeError: the model would not load")
    assert len([line for line in said if line.startswith("started bentoml serve")]) == 2


def test_a_build_that_fails_the_same_way_twice_is_not_retried_until_the_model_changes(
    serving: LocalServing, said: list[str], tmp_path: Path
) -> None:
    model = tmp_path / "not-a-model"
    model.mkdir()
    spec = version(serve="sleep", model_uri=str(model))
    build_log = tmp_path / "home" / "serving" / "default" / "router" / "tuned" / "build.log"

    def observe() -> VersionObservation:
        return serving.ensure_versions(ROUTER, [spec])["tuned"]

    deadline = time.monotonic() + 20
    retried = None
    while not (observation := observe()).failed:
        if "retrying in" in (observation.message or ""):
            retried = observation.message
        assert time.monotonic() < deadline, f"timed out; last message: {observation.message}"
        time.sleep(0.05)
    assert retried is not None and ", attempt 2 (log: " in retried
    assert observation.message == (
        f"building the Bento router-tuned for {model} failed (exit code 1): ValueError: no config.json in "
        "the model directory; it failed the same way twice, so it is not built again until the version's "
        f"model or its files change (log: {build_log})"
    )
    assert not observation.ready
    builds = [line for line in said if line.startswith("building Bento")]
    assert len(builds) == 2

    for _ in range(5):  # later passes neither build nor wait for a backoff
        assert observe().failed
        time.sleep(0.05)
    assert serving.processes() == []
    assert len([line for line in said if line.startswith("building Bento")]) == 2

    (model / "config.json").write_text("{}")  # the model's files changed: it is worth another build
    assert not observe().failed
    assert len([line for line in said if line.startswith("building Bento")]) == 3


def test_what_a_killed_up_left_running_is_reaped_by_the_next_one(
    tmp_path: Path, stand_in_python: Path, serving: LocalServing
) -> None:
    spec = version(serve="sleep")
    step_until(
        serving, spec, lambda: bool(serving.processes()) and serving.processes()[0].role.startswith("bentoml")
    )
    (server,) = serving.processes()
    assert serving.registry_path.exists()

    # The first `up` is gone without stopping anything (its objects are dropped, not closed).
    next_up = LocalServing(tmp_path / "home", python=str(stand_in_python))
    assert next_up.reap_leftovers() == 1
    assert not process_alive(server.pid, server.created)
    assert not next_up.registry_path.exists()
    assert next_up.reap_leftovers() == 0


def test_close_stops_every_process_and_forgets_the_record(serving: LocalServing) -> None:
    spec = version(serve="sleep")
    step_until(serving, spec, lambda: any(p.role.startswith("bentoml serve") for p in serving.processes()))
    (server,) = serving.processes()
    stopped = serving.close()
    assert stopped == [
        f"bentoml serve for version tuned of modeldeployment/router (pid {server.pid}, log {server.log})"
    ]
    assert not process_alive(server.pid, server.created)
    assert not serving.registry_path.exists()
    assert serving.deployments() == [] and serving.processes() == []
    assert os.path.exists(server.log)


def test_a_server_started_in_a_pass_of_up_outlives_the_passs_event_loop(serving: LocalServing) -> None:
    # Each pass of `up` runs on an event loop of its own. The servers die with the thread that started
    # them (PR_SET_PDEATHSIG), so LocalServing must not be called from a thread that ends with the pass.
    backend = ServingOnTheLoop(serving)
    spec = version(serve="sleep")
    deadline = time.monotonic() + 20
    while not any(p.role.startswith("bentoml serve") for p in serving.processes()):
        assert time.monotonic() < deadline, "the stand-in server did not start"
        asyncio.run(backend.ensure_versions(ROUTER, [spec]))
        time.sleep(0.05)
    (server,) = serving.processes()
    time.sleep(0.2)
    assert process_alive(server.pid, server.created)
    asyncio.run(backend.remove(ROUTER))
    assert not process_alive(server.pid, server.created)
    assert serving.deployments() == [] and serving.processes() == []
