"""KfpBackend through the real kfp.Client against an emulated Kubeflow Pipelines API (kfp_emulator).

The emulator authenticates like a multi-user KFP: every test's client sends the ServiceAccount token the
chart projects (a file here), and the emulator refuses a call without an accepted one (401) or for a
namespace its identity may not use (403).
"""

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
from kubetune.config import KfpAuth, KfpNamespaceMap, OperatorConfig
from kubetune.plan.finetune import build_request, plan_finetune
from kubetune.plan.lifecycle import Observed
from kubetune.plan.runs import BackendError, RunRequest
from kubetune.reconcile.jobs import Backends, cancel_job, reconcile_finetune
from kubetune_components.finetune.steps import publish_workspace_report
from kubetune_contract.finetune import FineTuneJob
from kubetune_contract.workspace import WORKSPACE_REPORT_OUTPUT, WorkspaceLayout, WorkspaceReport

TOKEN = "projected-sa-token-of-the-operator"
WORKSPACE_ROOT = "pvc://kubetune-workspace/runs"
ARTIFACT_STORE = "pvc://kubetune-workspace/artifacts"

TASKS = {"curate", "evaluate-baseline", "finetune", "evaluate-final", "for-loop-1", "publish"}
"""The pipeline's tasks; for-loop-1 runs a crossvalidate-fold task per fold of evaluation.crossValidation."""
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
    """The module's emulator, emptied: single-user, terminate -> CANCELED, accepting TOKEN only."""
    served.reset(tokens={TOKEN: None})
    return served


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    """The projected ServiceAccount token, as the kubelet writes it into the operator's pod."""
    path = tmp_path / "kfp-token"
    path.write_text(TOKEN + "\n")
    return path


def kfp_settings(tmp_path: Path, url: str | None, token_file: Path, **overrides: object) -> OperatorConfig:
    """The operator's settings as the chart's kfp values make them: shared storage, a projected token."""
    values: dict[str, object] = {
        "home": tmp_path,
        "default_executor": "kfp",
        "kfp_host": url,
        "kfp_auth": KfpAuth(mode="serviceAccountToken", token_path=str(token_file)),
        "workspace_root": WORKSPACE_ROOT,
        "artifact_store": ARTIFACT_STORE,
        **overrides,
    }
    return OperatorConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path, emulator: KfpEmulator, token_file: Path) -> OperatorConfig:
    return kfp_settings(tmp_path, emulator.url, token_file)


def make_backend(settings: OperatorConfig) -> KfpBackend:
    """As the control plane makes it (a fresh one is what an operator restart gets)."""
    backend = Backends(settings).get("kfp")
    assert isinstance(backend, KfpBackend)
    return backend


def namespace_of(request: RunRequest) -> str:
    return str(request.config["metadata"]["namespace"])


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
    assert set(parameters) == {"config_json", "workspace", "folds"}
    assert parameters["folds"] == []  # no evaluation.crossValidation
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
    assert set(by_name) == TASKS and len(tasks) == 6
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"config_json", "workspace", "folds"}

    def after(name: str) -> set[str]:
        return set(by_name[name].get("dependentTasks", []))

    assert after("curate") == set()
    assert after("evaluate-baseline") == after("finetune") == {ids["curate"]}
    assert after("evaluate-final") == {ids["finetune"]}
    assert after("for-loop-1") == {ids["curate"]}
    assert after("publish") == {ids["evaluate-baseline"], ids["evaluate-final"], ids["for-loop-1"]}
    # Caching is off for every task (enable_caching=False; proto3 JSON leaves false out).
    assert all(not task.get("cachingOptions", {}).get("enableCache", False) for task in tasks.values())
    fold_tasks = spec["components"][by_name["for-loop-1"]["componentRef"]["name"]]["dag"]["tasks"]
    for task in [*(task for name, task in by_name.items() if name != "for-loop-1"), *fold_tasks.values()]:
        inputs = task["inputs"]["parameters"]
        prefix = "pipelinechannel--" if task in fold_tasks.values() else ""
        assert inputs["config_json"]["componentInputParameter"] == prefix + "config_json"
        assert inputs["workspace"]["componentInputParameter"] == prefix + "workspace"
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {settings.runtime_image}
    # Each step runs its own command line from the runtime image; nothing is embedded in the spec.
    assert {" ".join(e["container"]["command"][:4]) for e in executors.values()} == {
        f"python -m kubetune_components.finetune.steps {step}"
        for step in ("curate", "evaluate", "finetune", "crossvalidate", "publish")
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
    assert backend.find(request.key, "team-a") is None

    emulator.seed_run(request.key + "-other")
    emulator.seed_run(request.key[:-1])
    assert backend.find(request.key, "team-a") is None

    [listing] = emulator.calls_to("GET", r"^/apis/v2beta1/runs$")[-1:]
    [predicate] = (listing.filter or {})["predicates"]
    assert (predicate["key"], predicate["operation"]) == ("display_name", "EQUALS")
    assert listing.query["namespace"] == "team-a"  # the resource's own namespace


def test_find_follows_a_run_through_its_life(emulator: KfpEmulator, settings: OperatorConfig) -> None:
    request = request_for(settings)
    backend = make_backend(settings)
    run_id = backend.submit(request).id
    url = f"{emulator.url}/#/runs/details/{run_id}"

    seen = []
    for state in ("PENDING", "RUNNING", "SUCCEEDED"):
        if state == "SUCCEEDED":
            emulator.set_task(
                run_id, "publish", parameters={WORKSPACE_REPORT_OUTPUT: WorkspaceReport().to_json()}
            )
        emulator.set_state(run_id, state)
        status = backend.find(request.key, "team-a")
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
    if phase == "Succeeded":  # with its results, or it would be ResultsMissing
        emulator.set_task(
            run_id, "publish", parameters={WORKSPACE_REPORT_OUTPUT: WorkspaceReport().to_json()}
        )

    status = make_backend(settings).find(key, "team-a")

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

    status = make_backend(settings).find(key, "team-a")

    assert status is not None and status.id == older != newer
    assert (status.phase, status.message) == ("Failed", "boom")


def test_run_url_uses_the_ui_url(emulator: KfpEmulator, tmp_path: Path, token_file: Path) -> None:
    settings = kfp_settings(tmp_path, emulator.url, token_file, kfp_ui_url="https://kfp.example.com/")

    status = make_backend(settings).submit(request_for(settings))

    assert status.url == f"https://kfp.example.com/#/runs/details/{status.id}"


def test_multi_user_runs_land_in_each_resources_namespace(
    emulator: KfpEmulator, settings: OperatorConfig
) -> None:
    emulator.reset(multi_user=True, tokens={TOKEN: None})
    backend = make_backend(settings)
    team_a = request_for(settings)
    team_b = request_for(settings, namespace="team-b", uid="0a1b2c3d-0000-4000-8000-000000000002")
    other = emulator.seed_run(team_a.key, namespace="kubeflow")  # same name, another namespace

    in_a, in_b = backend.submit(team_a), backend.submit(team_b)

    assert emulator.experiment_named("kubetune-team-a", "team-a") is not None
    assert emulator.experiment_named("kubetune-team-b", "team-b") is not None
    found_a, found_b = backend.find(team_a.key, "team-a"), backend.find(team_b.key, "team-b")
    assert found_a is not None and found_a.id == in_a.id != other
    assert found_b is not None and found_b.id == in_b.id
    assert backend.find(team_a.key, "team-b") is None  # runs are listed per namespace
    touched = {
        call.query.get("namespace") or (call.body or {}).get("namespace")
        for call in emulator.calls
        if "experiments" in call.path or (call.method == "GET" and call.path.endswith("/runs"))
    }
    assert touched == {"team-a", "team-b"}


def test_namespace_map_sends_a_namespace_elsewhere(
    emulator: KfpEmulator, tmp_path: Path, token_file: Path
) -> None:
    emulator.reset(multi_user=True, tokens={TOKEN: None})
    mapping = KfpNamespaceMap.parse("team-a=ml-a, *=ml-shared")
    settings = kfp_settings(tmp_path, emulator.url, token_file, kfp_namespace=mapping)
    backend = make_backend(settings)
    team_a = request_for(settings)
    team_c = request_for(settings, namespace="team-c", uid="0a1b2c3d-0000-4000-8000-000000000003")

    backend.submit(team_a)
    backend.submit(team_c)

    experiment_a = emulator.experiment_named("kubetune-team-a")
    experiment_c = emulator.experiment_named("kubetune-team-c")
    assert experiment_a is not None and experiment_a["namespace"] == "ml-a"
    assert experiment_c is not None and experiment_c["namespace"] == "ml-shared"
    assert backend.find(team_c.key, "team-c") is not None
    # With a '*' entry every run's namespace is known from the map alone.
    assert backend.find(team_c.key) is not None


def test_finding_a_run_without_its_namespace_is_refused_when_runs_are_per_namespace(
    settings: OperatorConfig,
) -> None:
    with pytest.raises(BackendError, match="needs its resource's namespace"):
        make_backend(settings).find(request_for(settings).key)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ("team-a", "'team-a' is not NAMESPACE=KFP_NAMESPACE"),
        ("team-a=", "'team-a=' is not NAMESPACE=KFP_NAMESPACE"),
        ("team-a=x,team-a=y", "'team-a' is mapped twice"),
        ("*=x,*=y", "'*' is mapped twice"),
    ],
)
def test_a_malformed_namespace_map_names_the_setting(mapping: str, message: str) -> None:
    with pytest.raises(ValueError, match="KUBETUNE_KFP_NAMESPACE_MAP") as err:
        OperatorConfig.from_env({"KUBETUNE_KFP_NAMESPACE_MAP": mapping})
    assert message in str(err.value)


# ---- authentication -------------------------------------------------------------------------------


def test_every_call_carries_the_projected_token_read_afresh(
    emulator: KfpEmulator, settings: OperatorConfig, token_file: Path
) -> None:
    emulator.reset(tokens={TOKEN: None, "rotated-token": None})
    backend = make_backend(settings)
    request = request_for(settings)
    backend.submit(request)

    token_file.write_text("rotated-token\n")  # the kubelet rotated the projected token
    emulator.reset(tokens={"rotated-token": None})  # and the old one is no longer accepted

    assert backend.find(request.key, "team-a") is None  # answered: the new token went out


def test_a_client_without_credentials_is_refused_with_a_clear_backend_error(
    emulator: KfpEmulator, tmp_path: Path, token_file: Path
) -> None:
    settings = kfp_settings(tmp_path, emulator.url, token_file, kfp_auth=KfpAuth(mode="none"))

    with pytest.raises(BackendError) as err:
        make_backend(settings).submit(request_for(settings))

    message = str(err.value)
    assert "Kubeflow Pipelines did not accept a request without credentials" in message, message
    assert "KUBETUNE_KFP_AUTH=none" in message and "HTTP 401" in message
    assert emulator.runs == {}


def test_a_token_kfp_does_not_accept_is_refused(
    emulator: KfpEmulator, tmp_path: Path, token_file: Path
) -> None:
    token_file.write_text("a-token-of-someone-else")
    settings = kfp_settings(tmp_path, emulator.url, token_file)

    with pytest.raises(BackendError, match=rf"did not accept the ServiceAccount token in {token_file}"):
        make_backend(settings).find(request_for(settings).key, "team-a")


def test_a_namespace_the_operator_may_not_use_is_refused_with_403(
    emulator: KfpEmulator, settings: OperatorConfig
) -> None:
    emulator.reset(multi_user=True, tokens={TOKEN: ["team-a"]})
    backend = make_backend(settings)
    backend.submit(request_for(settings))  # team-a: allowed

    with pytest.raises(BackendError, match=r"does not authorize .* \(HTTP 403\)") as err:
        backend.submit(request_for(settings, namespace="team-b", uid="0a1b2c3d-0000-4000-8000-000000000009"))

    assert "team-b" in str(err.value)
    assert len(emulator.runs) == 1


def test_a_missing_token_file_says_where_the_token_should_be(emulator: KfpEmulator, tmp_path: Path) -> None:
    settings = kfp_settings(tmp_path, emulator.url, tmp_path / "not-mounted")

    with pytest.raises(BackendError, match=r"cannot read its ServiceAccount token at .*not-mounted") as err:
        make_backend(settings).find(request_for(settings).key, "team-a")

    assert "audience pipelines.kubeflow.org" in str(err.value)
    assert emulator.calls == []  # nothing is sent without the token


def test_an_explicit_token_is_sent_as_is(emulator: KfpEmulator, tmp_path: Path, token_file: Path) -> None:
    emulator.reset(tokens={"a-fixed-token": None})
    env = {
        "KUBETUNE_KFP_HOST": str(emulator.url),
        "KUBETUNE_KFP_AUTH": "token",
        "KUBETUNE_KFP_TOKEN": "a-fixed-token",
        "KUBETUNE_WORKSPACE_ROOT": WORKSPACE_ROOT,
        "KUBETUNE_ARTIFACT_STORE": ARTIFACT_STORE,
        "KUBETUNE_HOME": str(tmp_path),
    }
    settings = OperatorConfig.from_env(env)

    status = make_backend(settings).submit(request_for(settings))

    assert emulator.run(status.id)["display_name"] == request_for(settings).key


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KUBETUNE_KFP_AUTH": "basic"}, "KUBETUNE_KFP_AUTH must be one of serviceAccountToken, token, none"),
        (
            {"KUBETUNE_KFP_AUTH": "token"},
            "KUBETUNE_KFP_AUTH=token needs the bearer token in KUBETUNE_KFP_TOKEN",
        ),
    ],
)
def test_malformed_kfp_auth_settings_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OperatorConfig.from_env(env)


def test_credentials_default_to_kfps_projected_token_path() -> None:
    auth = OperatorConfig.from_env({}).kfp_auth
    assert (auth.mode, auth.token_path) == (
        "serviceAccountToken",
        "/var/run/secrets/kubeflow/pipelines/token",
    )


# ---- shared storage -------------------------------------------------------------------------------


def test_a_workspace_that_is_not_shared_storage_fails_the_job_naming_the_setting(
    emulator: KfpEmulator, tmp_path: Path, token_file: Path
) -> None:
    # The README's `helm install --set defaultExecutor=kfp`: workspaceRoot empty -> the operator pod's home.
    settings = kfp_settings(tmp_path, emulator.url, token_file, workspace_root="")
    request = request_for(settings)

    status = make_backend(settings).submit(request)

    assert (status.phase, status.reason) == ("Failed", "StorageNotShared")
    assert status.message.startswith(
        f"workspaceRoot (KUBETUNE_WORKSPACE_ROOT) puts the run's workspace at {tmp_path}"
    )
    assert "the kfp executor needs shared storage (pvc://CLAIM/...)" in status.message
    assert emulator.runs == {} and emulator.calls == []
    decision = plan_finetune(request_body(request), Observed(run=status), settings, "2026-01-01T00:00:00Z")
    [condition] = [c for c in decision.status["conditions"] if c["type"] == "Succeeded"]
    assert (condition["status"], condition["reason"]) == ("False", "StorageNotShared")
    assert condition["message"] == status.message


@pytest.mark.parametrize("store", ["s3://models/kubetune", "pvc://models/published"])
def test_an_object_store_or_claim_is_a_shared_artifact_store(
    emulator: KfpEmulator, tmp_path: Path, token_file: Path, store: str
) -> None:
    settings = kfp_settings(tmp_path, emulator.url, token_file, artifact_store=store)

    status = make_backend(settings).submit(request_for(settings))

    assert status.phase == "Pending" and len(emulator.runs) == 1


def test_an_artifact_store_that_is_not_shared_fails_the_job_naming_the_setting(
    emulator: KfpEmulator, tmp_path: Path, token_file: Path
) -> None:
    settings = kfp_settings(tmp_path, emulator.url, token_file, artifact_store=str(tmp_path / "artifacts"))

    status = make_backend(settings).submit(request_for(settings))

    assert (status.phase, status.reason) == ("Failed", "StorageNotShared")
    assert status.message.startswith("spec.output.uri (default: artifactStore, KUBETUNE_ARTIFACT_STORE) is ")
    assert "(pvc://CLAIM/... or s3://...)" in status.message
    assert emulator.runs == {}


# ---- results from the run's details ---------------------------------------------------------------


def published_report(tmp_path: Path, files: dict[str, object]) -> str:
    """What a step's workspace_report output holds once the step wrote `files` to its workspace."""
    workspace = tmp_path / "workspace"
    for relative, content in files.items():
        (workspace / relative).parent.mkdir(parents=True, exist_ok=True)
        (workspace / relative).write_text(json.dumps(content))
    output = tmp_path / "outputs" / WORKSPACE_REPORT_OUTPUT
    output.parent.mkdir(parents=True, exist_ok=True)
    publish_workspace_report(str(workspace), str(output))  # the steps' own code
    return output.read_text()


def request_body(request: RunRequest) -> dict[str, object]:
    metadata = request.config["metadata"]
    return {**request.config, "metadata": {**metadata, "creationTimestamp": "2026-01-01T00:00:00Z"}}


FINAL_FILES: dict[str, object] = {
    WorkspaceLayout.PROGRESS: {"phase": "published", "step": 8, "totalSteps": 8, "epoch": 1.0},
    WorkspaceLayout.BASELINE_EVALUATION: {
        "evalLoss": 3.9,
        "perplexity": 49.4,
        "exactMatch": 0.0,
        "examples": 4,
    },
    WorkspaceLayout.FINAL_EVALUATION: {"evalLoss": 2.1, "perplexity": 8.2, "exactMatch": 0.5, "examples": 4},
    WorkspaceLayout.GATES: [
        {"metric": "evalLoss", "op": "max", "threshold": 4.0, "value": 2.1, "passed": True}
    ],
    WorkspaceLayout.OUTPUT: {"uri": f"{ARTIFACT_STORE}/team-a/demo/g1", "version": "g1"},
}


def test_results_are_read_from_the_final_tasks_output_parameter(
    emulator: KfpEmulator, settings: OperatorConfig, tmp_path: Path
) -> None:
    request = request_for(settings)
    backend = make_backend(settings)
    run_id = backend.submit(request).id
    emulator.set_task(run_id, "curate", parameters={WORKSPACE_REPORT_OUTPUT: published_report(tmp_path, {})})
    emulator.set_task(
        run_id, "publish", parameters={WORKSPACE_REPORT_OUTPUT: published_report(tmp_path, FINAL_FILES)}
    )
    emulator.set_state(run_id, "SUCCEEDED")

    status = backend.find(request.key, "team-a")

    assert status is not None and status.phase == "Succeeded" and status.report is not None
    assert status.report.output == FINAL_FILES[WorkspaceLayout.OUTPUT]
    assert status.report.final == FINAL_FILES[WorkspaceLayout.FINAL_EVALUATION]
    decision = plan_finetune(
        request_body(request), Observed(run=status, report=status.report), settings, "2026-01-01T00:00:00Z"
    )
    assert decision.status["phase"] == "Succeeded"
    assert decision.status["output"]["uri"] == f"{ARTIFACT_STORE}/team-a/demo/g1"
    assert decision.status["evaluation"]["final"]["exactMatch"] == 0.5


def test_while_running_the_newest_finished_tasks_report_and_the_running_task_show(
    emulator: KfpEmulator, settings: OperatorConfig, tmp_path: Path
) -> None:
    request = request_for(settings)
    backend = make_backend(settings)
    run_id = backend.submit(request).id
    curation = {"kept": 40, "dropped": {"duplicate": 2}}
    emulator.set_task(
        run_id,
        "curate",
        parameters={
            WORKSPACE_REPORT_OUTPUT: published_report(tmp_path, {WorkspaceLayout.CURATION: curation})
        },
    )
    emulator.set_task(run_id, "finetune", "RUNNING")
    emulator.set_state(run_id, "RUNNING")

    status = backend.find(request.key, "team-a")

    assert status is not None and status.phase == "Running" and status.report is not None
    assert status.report.curation == curation
    assert status.report.progress == {"phase": "finetune"}


@pytest.mark.parametrize(
    "publish_outputs",
    [None, {"report": "{}"}, {WORKSPACE_REPORT_OUTPUT: "not json"}],
    ids=["no-outputs", "other-output-only", "unreadable"],
)
def test_a_run_that_succeeded_without_its_results_fails_with_results_missing(
    emulator: KfpEmulator, settings: OperatorConfig, publish_outputs: dict[str, str] | None
) -> None:
    request = request_for(settings)
    backend = make_backend(settings)
    run_id = backend.submit(request).id
    emulator.set_task(run_id, "publish", parameters=publish_outputs)
    emulator.set_state(run_id, "SUCCEEDED")

    status = backend.find(request.key, "team-a")

    assert status is not None
    assert (status.phase, status.reason) == ("Failed", "ResultsMissing")
    assert f"run {run_id} SUCCEEDED" in status.message
    assert "no 'workspace_report' output parameter of task 'publish'" in status.message
    decision = plan_finetune(
        request_body(request),
        Observed(run=status, report=status.report or WorkspaceReport()),
        settings,
        "2026-01-01T00:00:00Z",
    )
    [condition] = [c for c in decision.status["conditions"] if c["type"] == "Succeeded"]
    assert (condition["status"], condition["reason"]) == ("False", "ResultsMissing")
    assert "output" not in decision.status


# ---- cancel ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["PENDING", "RUNNING"])
def test_cancel_terminates_an_unfinished_run(
    emulator: KfpEmulator, settings: OperatorConfig, state: str
) -> None:
    request = request_for(settings)
    backend = make_backend(settings)
    run_id = emulator.seed_run(request.key, state=state)

    backend.cancel(request.key, "team-a")

    [call] = emulator.calls_to("POST", TERMINATE)
    assert call.path == f"/apis/v2beta1/runs/{run_id}:terminate"
    assert emulator.run(run_id)["state"] == "CANCELED"
    assert [h["state"] for h in emulator.run(run_id)["state_history"]][-2:] == ["CANCELING", "CANCELED"]
    status = backend.find(request.key, "team-a")
    assert status is not None and status.phase == "Cancelled" and status.finished

    backend.cancel(request.key, "team-a")  # already cancelled: nothing more to do
    assert len(emulator.calls_to("POST", TERMINATE)) == 1


def test_cancel_while_kfp_is_still_canceling_terminates_once(
    emulator: KfpEmulator, settings: OperatorConfig
) -> None:
    emulator.reset(terminate_state="CANCELING")
    request = request_for(settings)
    run_id = emulator.seed_run(request.key, state="RUNNING")
    backend = make_backend(settings)

    backend.cancel(request.key, "team-a")
    backend.cancel(request.key, "team-a")
    status = backend.find(request.key, "team-a")

    assert emulator.run(run_id)["state"] == "CANCELING"
    assert len(emulator.calls_to("POST", TERMINATE)) == 1
    assert status is not None and status.phase == "Cancelled"


@pytest.mark.parametrize("state", ["SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"])
def test_cancel_of_a_finished_run_is_a_no_op(
    emulator: KfpEmulator, settings: OperatorConfig, state: str
) -> None:
    key = request_for(settings).key
    run_id = emulator.seed_run(key, state=state)

    make_backend(settings).cancel(key, "team-a")

    assert emulator.calls_to("POST", TERMINATE) == []
    assert emulator.run(run_id)["state"] == state


def test_cancel_of_an_unknown_run_is_a_no_op(emulator: KfpEmulator, settings: OperatorConfig) -> None:
    make_backend(settings).cancel(request_for(settings).key, "team-a")

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
        backend.cancel(request.key, "team-a")
    assert emulator.run(run_id)["state"] == "RUNNING"


# ---- an unreachable or failing endpoint -----------------------------------------------------------


def test_resume_of_an_unknown_run_raises_backend_error(
    emulator: KfpEmulator, settings: OperatorConfig
) -> None:
    with pytest.raises(BackendError, match="no Kubeflow Pipelines run named"):
        make_backend(settings).resume(request_for(settings).key, "team-a")


def test_unreachable_endpoint_raises_backend_error_on_every_call(tmp_path: Path, token_file: Path) -> None:
    port = closed_port()
    settings = kfp_settings(tmp_path, f"http://127.0.0.1:{port}", token_file)
    request = request_for(settings)
    backend = make_backend(settings)

    calls: dict[str, Callable[[], object]] = {
        "find": lambda: backend.find(request.key, "team-a"),
        "submit": lambda: backend.submit(request),
        "resume": lambda: backend.resume(request.key, "team-a"),
        "cancel": lambda: backend.cancel(request.key, "team-a"),
    }
    for name, call in calls.items():
        with pytest.raises(BackendError) as err:
            call()
        message = str(err.value)
        assert "Kubeflow Pipelines" in message, name
        assert f":{port}" in message and "Connection refused" in message, (name, message)
        assert isinstance(err.value.__cause__, urllib3.exceptions.HTTPError | httpx.HTTPError), name


def test_endpoint_going_away_raises_backend_error(tmp_path: Path, token_file: Path) -> None:
    emulator = KfpEmulator()
    with emulator.serve() as url:
        settings = kfp_settings(tmp_path, url, token_file)
        request = request_for(settings)
        backend = make_backend(settings)
        emulator.seed_run(request.key, state="RUNNING")
        assert backend.find(request.key, "team-a") is not None  # connected once; then the server stops

    probes: list[Callable[[], object]] = [
        lambda: backend.find(request.key, "team-a"),
        lambda: backend.cancel(request.key, "team-a"),
    ]
    for call in probes:
        with pytest.raises(BackendError, match="Kubeflow Pipelines runs failed"):
            call()


def test_api_error_while_listing_raises_backend_error(
    emulator: KfpEmulator, settings: OperatorConfig
) -> None:
    backend = make_backend(settings)
    backend.find("warm-up", "team-a")  # the client exists; now the list call itself fails
    emulator.fail("GET", r"^/apis/v2beta1/runs$", 500, message="internal error listing runs")

    with pytest.raises(BackendError, match=r"listing Kubeflow Pipelines runs failed: \(500\)"):
        backend.find(request_for(settings).key, "team-a")


def test_unresponsive_endpoint_raises_backend_error_instead_of_hanging(
    tmp_path: Path, token_file: Path
) -> None:
    with socket.socket() as listener:  # connects (kernel backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        settings = kfp_settings(tmp_path, f"http://127.0.0.1:{port}", token_file)
        backend = KfpBackend(settings.kfp_host, auth=settings.kfp_auth, request_timeout=(0.5, 0.5))
        outcome: list[BaseException | object] = []

        def find() -> None:
            try:
                outcome.append(backend.find("ftj-any", "team-a"))
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
        make_backend(settings).find("ftj-any", "team-a")

    assert sum(slept) <= 5, f"kfp.Client slept {sum(slept)}s before giving up"
    assert "503" in str(err.value), str(err.value)


# ---- through the control plane's reconcile --------------------------------------------------------


def test_reconcile_runs_a_job_in_its_namespace_and_reads_its_results_from_kfp(
    emulator: KfpEmulator, settings: OperatorConfig, tmp_path: Path
) -> None:
    emulator.reset(multi_user=True, tokens={TOKEN: ["team-a"]})
    backends = Backends(settings)
    body = request_body(request_for(settings))

    submitted = reconcile_finetune(body, backends, now="2026-01-01T00:00:00Z")

    (run,) = emulator.runs.values()
    experiment = emulator.experiment_named("kubetune-team-a", "team-a")
    assert experiment is not None and run["experiment_id"] == experiment["experiment_id"]
    assert submitted.status["pipelineRun"]["id"] == run["run_id"]
    emulator.set_task(
        run["run_id"],
        "publish",
        parameters={WORKSPACE_REPORT_OUTPUT: published_report(tmp_path, FINAL_FILES)},
    )
    emulator.set_state(run["run_id"], "SUCCEEDED")

    finished = reconcile_finetune({**body, "status": submitted.status}, backends, now="2026-01-01T00:05:00Z")

    assert finished.status["phase"] == "Succeeded"
    assert finished.status["output"]["uri"] == f"{ARTIFACT_STORE}/team-a/demo/g1"
    assert finished.status["evaluation"]["final"]["exactMatch"] == 0.5
    assert cancel_job({**body, "status": finished.status}, backends) is None  # finished: nothing to stop
