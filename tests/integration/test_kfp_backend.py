"""KfpBackend through the real kfp.Client against an emulated Kubeflow Pipelines API (kfp_emulator)."""

from __future__ import annotations

import datetime
import json
import socket
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import kfp.client.client
import pytest
import urllib3
from kfp_emulator import KfpEmulator

from kubetune.api.validation import parse_resource
from kubetune.backends.kfp import KfpBackend
from kubetune.config import OperatorConfig
from kubetune.plan.finetune import build_request
from kubetune.plan.runs import BackendError, RunRequest
from kubetune.reconcile.jobs import Backends
from kubetune_contract.finetune import FineTuneJob

TASKS = {"curate", "evaluate-baseline", "finetune", "evaluate-final", "publish"}
TERMINATE = r"^/apis/v2beta1/runs/[^/]+:terminate$"
CREATE_RUN = r"^/apis/v2beta1/runs$"
EXPERIMENTS = r"^/apis/v2beta1/experiments$"


# ---- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _hermetic_kfp_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ~/.config/kfp/context.json and no KF_PIPELINES_* variables from the machine running the tests."""
    monkeypatch.setattr(kfp.client.client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for name in (
        "KF_PIPELINES_ENDPOINT",
        "KF_PIPELINES_UI_ENDPOINT",
        "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
        "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def served() -> Iterator[KfpEmulator]:
    """One server for the module (starting and stopping uvicorn per test costs more than the tests)."""
    emulator = KfpEmulator()
    with emulator.serve():
        yield emulator


@pytest.fixture
def emulator(served: KfpEmulator) -> KfpEmulator:
    """The module's emulator, emptied: single-user, terminate -> CANCELED."""
    served.reset()
    return served


@pytest.fixture
def settings(tmp_path: Path, emulator: KfpEmulator) -> OperatorConfig:
    return OperatorConfig(home=tmp_path, default_executor="kfp", kfp_host=emulator.url)


def make_backend(settings: OperatorConfig) -> KfpBackend:
    """As the control plane makes it (a fresh one is what an operator restart gets)."""
    backend = Backends(settings).get("kfp")
    assert isinstance(backend, KfpBackend)
    return backend


def request_for(
    settings: OperatorConfig,
    name: str = "demo",
    namespace: str = "team-a",
    uid: str = "0a1b2c3d-0000-4000-8000-000000000001",
    generation: int = 1,
) -> RunRequest:
    doc = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": generation},
        "spec": {
            "baseModel": {"uri": "hf://sshleifer/tiny-gpt2@main"},
            "dataset": {"uri": "file:///data/train.jsonl"},
            "training": {"epochs": 1, "learningRate": "3e-4"},
            "evaluation": {"gates": [{"metric": "evalLoss", "max": "4.0"}]},
        },
    }
    return build_request(parse_resource(doc, FineTuneJob), settings)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- submit ---------------------------------------------------------------------------------------


def test_submit_creates_one_run_named_after_the_key_in_the_namespace_experiment(
    emulator: KfpEmulator, settings: OperatorConfig
) -> None:
    backend = make_backend(settings)
    request = request_for(settings)

    status = backend.submit(request)

    [run] = emulator.runs_named(request.key)
    assert len(emulator.runs) == 1
    assert (status.backend, status.id, status.phase) == ("kfp", run["run_id"], "Pending")
    assert status.url == f"{emulator.url}/#/runs/details/{run['run_id']}"
    experiment = emulator.experiment_named("kubetune-team-a")
    assert experiment is not None and run["experiment_id"] == experiment["experiment_id"]
    assert len(emulator.calls_to("POST", EXPERIMENTS)) == 1

    parameters = run["runtime_config"]["parameters"]
    assert set(parameters) == {"config_json", "workspace"}
    assert parameters["workspace"] == request.workspace
    assert json.loads(parameters["config_json"]) == request.config
    assert json.loads(parameters["config_json"])["metadata"]["namespace"] == "team-a"


def test_submit_sends_the_compiled_finetune_pipeline(emulator: KfpEmulator, settings: OperatorConfig) -> None:
    request = request_for(settings)
    make_backend(settings).submit(request)

    [run] = emulator.runs_named(request.key)
    # Pod labels are Kubernetes platform config, so the client sends {pipeline_spec, platform_spec}.
    spec, platform = run["pipeline_spec"]["pipeline_spec"], run["pipeline_spec"]["platform_spec"]
    tasks = spec["root"]["dag"]["tasks"]
    by_name = {task["taskInfo"]["name"]: task for task in tasks.values()}
    ids = {task["taskInfo"]["name"]: task_id for task_id, task in tasks.items()}
    assert set(by_name) == TASKS and len(tasks) == 5
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"config_json", "workspace"}

    def after(name: str) -> set[str]:
        return set(by_name[name].get("dependentTasks", []))

    assert after("curate") == set()
    assert after("evaluate-baseline") == after("finetune") == {ids["curate"]}
    assert after("evaluate-final") == {ids["finetune"]}
    assert after("publish") == {ids["evaluate-baseline"], ids["evaluate-final"]}
    # Caching is off for every task (enable_caching=False; proto3 JSON leaves false out).
    assert all(not task.get("cachingOptions", {}).get("enableCache", False) for task in tasks.values())
    for task in tasks.values():
        inputs = task["inputs"]["parameters"]
        assert inputs["config_json"]["componentInputParameter"] == "config_json"
        assert inputs["workspace"]["componentInputParameter"] == "workspace"
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {settings.runtime_image}
    # Each step runs its own command line from the runtime image; nothing is embedded in the spec.
    assert {" ".join(e["container"]["command"][:4]) for e in executors.values()} == {
        f"python -m kubetune_components.finetune.steps {step}"
        for step in ("curate", "evaluate", "finetune", "publish")
    }
    pods = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(pods) == set(executors)
    assert all(e["podMetadata"]["labels"] == request.labels for e in pods.values())


def test_submit_reuses_the_namespace_experiment_and_creates_one_per_namespace(
    emulator: KfpEmulator, settings: OperatorConfig
) -> None:
    backend = make_backend(settings)
    first = backend.submit(request_for(settings, name="one"))
    second = backend.submit(request_for(settings, name="two", uid="0a1b2c3d-0000-4000-8000-000000000002"))
    third = make_backend(settings).submit(
        request_for(settings, name="one", namespace="team-b", uid="0a1b2c3d-0000-4000-8000-000000000003")
    )

    team_a, team_b = (
        emulator.experiment_named("kubetune-team-a"),
        emulator.experiment_named("kubetune-team-b"),
    )
    assert team_a is not None and team_b is not None
    assert len(emulator.experiments) == 2
    assert len(emulator.calls_to("POST", EXPERIMENTS)) == 2
    assert emulator.run(first.id)["experiment_id"] == team_a["experiment_id"]
    assert emulator.run(second.id)["experiment_id"] == team_a["experiment_id"]
    assert emulator.run(third.id)["experiment_id"] == team_b["experiment_id"]


def test_submit_is_exactly_once_across_repeats_and_restarts(
    emulator: KfpEmulator, settings: OperatorConfig
) -> None:
    request = request_for(settings)
    first = make_backend(settings).submit(request)
    backend = make_backend(settings)  # the operator restarted: no memory of the first submit

    again = backend.submit(request)
    emulator.set_state(first.id, "RUNNING")
    once_more = backend.submit(request)
    after_restart = make_backend(settings).submit(request)

    assert first.id == again.id == once_more.id == after_restart.id
    assert once_more.phase == after_restart.phase == "Running"
    assert len(emulator.runs) == 1 and len(emulator.runs_named(request.key)) == 1
    assert len(emulator.calls_to("POST", CREATE_RUN)) == 1
    assert len(emulator.experiments) == 1


def test_a_new_generation_is_a_new_run(emulator: KfpEmulator, settings: OperatorConfig) -> None:
    backend = make_backend(settings)
    first = backend.submit(request_for(settings, generation=1))
    second = backend.submit(request_for(settings, generation=2))

    assert first.id != second.id
    assert len(emulator.runs) == 2


def test_submit_after_a_lost_response_finds_the_run_instead_of_duplicating_it(
    emulator: KfpEmulator, settings: OperatorConfig
) -> None:
    request = request_for(settings)
    backend = make_backend(settings)
    emulator.fail("POST", CREATE_RUN, 504, after=True, message="upstream request timeout")

    with pytest.raises(BackendError, match="creating the Kubeflow Pipelines run failed"):
        backend.submit(request)
    [run] = emulator.runs_named(request.key)  # KFP did create it; only the answer was lost

    retried = backend.submit(request)

    assert retried.id == run["run_id"]
    assert len(emulator.runs) == 1


def test_submit_that_kfp_refuses_raises_backend_error_and_creates_nothing(
    emulator: KfpEmulator, settings: OperatorConfig
) -> None:
    emulator.fail("POST", CREATE_RUN, 500, message="database is locked")

    with pytest.raises(BackendError, match=r"creating the Kubeflow Pipelines run failed: \(500\)") as err:
        make_backend(settings).submit(request_for(settings))

    assert "database is locked" in str(err.value)
    assert emulator.runs == {}


# ---- find -----------------------------------------------------------------------------------------


def test_find_unknown_key_is_none(emulator: KfpEmulator, settings: OperatorConfig) -> None:
    request = request_for(settings)
    backend = make_backend(settings)
    assert backend.find(request.key) is None

    emulator.seed_run(request.key + "-other")
    emulator.seed_run(request.key[:-1])
    assert backend.find(request.key) is None

    [listing] = emulator.calls_to("GET", r"^/apis/v2beta1/runs$")[-1:]
    [predicate] = (listing.filter or {})["predicates"]
    assert (predicate["key"], predicate["operation"]) == ("display_name", "EQUALS")
    assert listing.query["namespace"] == settings.kfp_namespace


def test_find_follows_a_run_through_its_life(emulator: KfpEmulator, settings: OperatorConfig) -> None:
    request = request_for(settings)
    backend = make_backend(settings)
    run_id = backend.submit(request).id
    url = f"{emulator.url}/#/runs/details/{run_id}"

    seen = []
    for state in ("PENDING", "RUNNING", "SUCCEEDED"):
        emulator.set_state(run_id, state)
        status = backend.find(request.key)
        assert status is not None and status.id == run_id and status.url == url
        seen.append((status.phase, status.finished))

    assert seen == [("Pending", False), ("Running", False), ("Succeeded", True)]


@pytest.mark.parametrize(
    ("state", "error", "phase", "message", "reason"),
    [
        ("RUNTIME_STATE_UNSPECIFIED", None, "Pending", "", ""),
        ("PENDING", None, "Pending", "", ""),
        ("RUNNING", None, "Running", "", ""),
        ("PAUSED", None, "Running", "", ""),
        ("SUCCEEDED", None, "Succeeded", "", ""),
        ("SKIPPED", None, "Succeeded", "", ""),
        ("FAILED", "step finetune: OOMKilled", "Failed", "step finetune: OOMKilled", "PipelineFailed"),
        ("CANCELING", None, "Cancelled", "", ""),
        ("CANCELED", None, "Cancelled", "", ""),
    ],
)  # fmt: skip
def test_find_maps_run_states_to_phases(
    emulator: KfpEmulator,
    settings: OperatorConfig,
    state: str,
    error: str | None,
    phase: str,
    message: str,
    reason: str,
) -> None:
    key = request_for(settings).key
    run_id = emulator.seed_run(key, state=state, error=error)

    status = make_backend(settings).find(key)

    assert status is not None
    assert (status.backend, status.id, status.phase) == ("kfp", run_id, phase)
    assert (status.message, status.reason) == (message, reason)
    assert status.url == f"{emulator.url}/#/runs/details/{run_id}"


def test_find_takes_the_oldest_of_duplicate_runs(emulator: KfpEmulator, settings: OperatorConfig) -> None:
    key = request_for(settings).key
    now = datetime.datetime.now(datetime.UTC)
    newer = emulator.seed_run(key, state="RUNNING", created_at=now)
    older = emulator.seed_run(
        key, state="FAILED", error="boom", created_at=now - datetime.timedelta(minutes=5)
    )

    status = make_backend(settings).find(key)

    assert status is not None and status.id == older != newer
    assert (status.phase, status.message) == ("Failed", "boom")


def test_run_url_uses_the_ui_url(emulator: KfpEmulator, tmp_path: Path) -> None:
    settings = OperatorConfig(
        home=tmp_path, default_executor="kfp", kfp_host=emulator.url, kfp_ui_url="https://kfp.example.com/"
    )

    status = make_backend(settings).submit(request_for(settings))

    assert status.url == f"https://kfp.example.com/#/runs/details/{status.id}"


def test_multi_user_deployment_scopes_to_the_configured_namespace(
    emulator: KfpEmulator, tmp_path: Path
) -> None:
    emulator.reset(multi_user=True)
    settings = OperatorConfig(
        home=tmp_path, default_executor="kfp", kfp_host=emulator.url, kfp_namespace="ml"
    )
    request = request_for(settings)
    backend = make_backend(settings)
    other = emulator.seed_run(request.key)  # same name, but in the default experiment of no namespace

    status = backend.submit(request)
    found = backend.find(request.key)

    experiment = emulator.experiment_named("kubetune-team-a")
    assert experiment is not None and experiment["namespace"] == "ml"
    assert found is not None and found.id == status.id != other
    for call in emulator.calls_to("GET", r"^/apis/v2beta1/(runs|experiments)$"):
        assert call.query["namespace"] == "ml"


# ---- cancel ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["PENDING", "RUNNING"])
def test_cancel_terminates_an_unfinished_run(
    emulator: KfpEmulator, settings: OperatorConfig, state: str
) -> None:
    request = request_for(settings)
    backend = make_backend(settings)
    run_id = emulator.seed_run(request.key, state=state)

    backend.cancel(request.key)

    [call] = emulator.calls_to("POST", TERMINATE)
    assert call.path == f"/apis/v2beta1/runs/{run_id}:terminate"
    assert emulator.run(run_id)["state"] == "CANCELED"
    assert [h["state"] for h in emulator.run(run_id)["state_history"]][-2:] == ["CANCELING", "CANCELED"]
    status = backend.find(request.key)
    assert status is not None and status.phase == "Cancelled" and status.finished

    backend.cancel(request.key)  # already cancelled: nothing more to do
    assert len(emulator.calls_to("POST", TERMINATE)) == 1


def test_cancel_while_kfp_is_still_canceling_terminates_once(
    emulator: KfpEmulator, settings: OperatorConfig
) -> None:
    emulator.reset(terminate_state="CANCELING")
    request = request_for(settings)
    run_id = emulator.seed_run(request.key, state="RUNNING")
    backend = make_backend(settings)

    backend.cancel(request.key)
    backend.cancel(request.key)
    status = backend.find(request.key)

    assert emulator.run(run_id)["state"] == "CANCELING"
    assert len(emulator.calls_to("POST", TERMINATE)) == 1
    assert status is not None and status.phase == "Cancelled"


@pytest.mark.parametrize("state", ["SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"])
def test_cancel_of_a_finished_run_is_a_no_op(
    emulator: KfpEmulator, settings: OperatorConfig, state: str
) -> None:
    key = request_for(settings).key
    run_id = emulator.seed_run(key, state=state)

    make_backend(settings).cancel(key)

    assert emulator.calls_to("POST", TERMINATE) == []
    assert emulator.run(run_id)["state"] == state


def test_cancel_of_an_unknown_run_is_a_no_op(emulator: KfpEmulator, settings: OperatorConfig) -> None:
    make_backend(settings).cancel(request_for(settings).key)

    assert emulator.calls_to("POST", TERMINATE) == []
    assert emulator.runs == {}


def test_cancel_that_kfp_refuses_raises_backend_error(
    emulator: KfpEmulator, settings: OperatorConfig
) -> None:
    request = request_for(settings)
    backend = make_backend(settings)
    run_id = emulator.seed_run(request.key, state="RUNNING")
    emulator.fail("POST", TERMINATE, 500, message="workflow patch failed")

    with pytest.raises(BackendError, match=f"terminating Kubeflow Pipelines run {run_id} failed"):
        backend.cancel(request.key)
    assert emulator.run(run_id)["state"] == "RUNNING"


# ---- an unreachable or failing endpoint -----------------------------------------------------------


def test_resume_of_an_unknown_run_raises_backend_error(
    emulator: KfpEmulator, settings: OperatorConfig
) -> None:
    with pytest.raises(BackendError, match="no Kubeflow Pipelines run named"):
        make_backend(settings).resume(request_for(settings).key)


def test_unreachable_endpoint_raises_backend_error_on_every_call(tmp_path: Path) -> None:
    port = closed_port()
    settings = OperatorConfig(home=tmp_path, default_executor="kfp", kfp_host=f"http://127.0.0.1:{port}")
    request = request_for(settings)
    backend = make_backend(settings)

    calls: dict[str, Callable[[], object]] = {
        "find": lambda: backend.find(request.key),
        "submit": lambda: backend.submit(request),
        "resume": lambda: backend.resume(request.key),
        "cancel": lambda: backend.cancel(request.key),
    }
    for name, call in calls.items():
        with pytest.raises(BackendError) as err:
            call()
        message = str(err.value)
        assert "Kubeflow Pipelines" in message, name
        assert f":{port}" in message and "Connection refused" in message, (name, message)
        assert isinstance(err.value.__cause__, urllib3.exceptions.HTTPError | httpx.HTTPError), name


def test_endpoint_going_away_raises_backend_error(tmp_path: Path) -> None:
    emulator = KfpEmulator()
    with emulator.serve() as url:
        settings = OperatorConfig(home=tmp_path, default_executor="kfp", kfp_host=url)
        request = request_for(settings)
        backend = make_backend(settings)
        emulator.seed_run(request.key, state="RUNNING")
        assert backend.find(request.key) is not None  # connected once; then the server stops

    probes: list[Callable[[], object]] = [
        lambda: backend.find(request.key),
        lambda: backend.cancel(request.key),
    ]
    for call in probes:
        with pytest.raises(BackendError, match="Kubeflow Pipelines runs failed"):
            call()


def test_api_error_while_listing_raises_backend_error(
    emulator: KfpEmulator, settings: OperatorConfig
) -> None:
    backend = make_backend(settings)
    backend.find("warm-up")  # the client exists; now the list call itself fails
    emulator.fail("GET", r"^/apis/v2beta1/runs$", 500, message="internal error listing runs")

    with pytest.raises(BackendError, match=r"listing Kubeflow Pipelines runs failed: \(500\)"):
        backend.find(request_for(settings).key)


def test_unresponsive_endpoint_raises_backend_error_instead_of_hanging(tmp_path: Path) -> None:
    with socket.socket() as listener:  # connects (kernel backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        settings = OperatorConfig(home=tmp_path, default_executor="kfp", kfp_host=f"http://127.0.0.1:{port}")
        backend = KfpBackend(settings.kfp_host, request_timeout=(0.5, 0.5))
        outcome: list[BaseException | object] = []

        def find() -> None:
            try:
                outcome.append(backend.find("ftj-any"))
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=find, daemon=True)
        worker.start()
        worker.join(timeout=1.5)
        hung = worker.is_alive()
    worker.join(timeout=10.0)  # the listener is closed now: the pending request fails, the thread ends
    assert not worker.is_alive()
    assert not hung, "KfpBackend.find() was still waiting for an answer after 1.5s"
    assert isinstance(outcome[0], BackendError)


def test_unhealthy_endpoint_fails_fast_with_the_http_status(
    emulator: KfpEmulator, settings: OperatorConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(kfp.client.client, "time", types.SimpleNamespace(sleep=slept.append))
    emulator.fail("GET", r"^/apis/v2beta1/healthz$", 503, times=100, message="no healthy upstream")

    with pytest.raises(BackendError) as err:
        make_backend(settings).find("ftj-any")

    assert sum(slept) <= 5, f"kfp.Client slept {sum(slept)}s before giving up"
    assert "503" in str(err.value), str(err.value)
