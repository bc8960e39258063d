"""The Kubeflow UI artifacts (manifests/kubeflow): reproducible, complete, and runnable.

`kubetune compile --standard --out-dir manifests/kubeflow` writes them; the first test recompiles into
a temporary directory and compares byte for byte. The step components' container commands are run here
as KFP runs them, against the stand-in steps of the integration tests (and evaluate-model against the
real steps, for the metrics the Kubeflow UI shows); the last test runs the
fine-tune-then-quantize pipeline with kfp's local runner (which runs each step's command line through a
lightweight stand-in) to show the chaining works.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp.components import load_component_from_file
from kfp.dsl import Metrics
from kfp.local import executor_input_utils, executor_output_utils, placeholder_utils

from kubetune.api.validation import parse_resource
from kubetune.cli import main as cli_main
from kubetune.config import RUNTIME_IMAGE
from kubetune.pipelines.components import STEPS
from kubetune.pipelines.standard import (
    EXAMPLE_CHAINED_QUANTIZE_JOB,
    EXAMPLE_FINETUNE_JOB,
    EXAMPLE_QUANTIZE_JOB,
    resolve_finetune_job,
    resolve_quantize_job,
)
from kubetune_components.dev import tinylm
from kubetune_contract.workspace import WorkspaceLayout, WorkspaceReport

REPO = Path(__file__).resolve().parents[3]
COMMITTED = REPO / "manifests" / "kubeflow"
FAKE_STEPS = REPO / "tests" / "integration" / "fake_steps"


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_committed_artifacts_are_what_the_command_writes(tmp_path: Path) -> None:
    for path in (COMMITTED / "pipelines").glob("*.yaml"):
        assert len(list(yaml.safe_load_all(path.read_text()))) == 2, path  # pipeline spec + platform spec
    with pytest.raises(SystemExit) as exit_:
        cli_main(["compile", "--standard", "--out-dir", str(tmp_path)])
    assert exit_.value.code == 0
    fresh, committed = tree(tmp_path), tree(COMMITTED)
    assert sorted(fresh) == sorted(committed), "run: kubetune compile --standard --out-dir manifests/kubeflow"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert stale == [], f"{stale} differ: run kubetune compile --standard --out-dir manifests/kubeflow"


def test_compile_refuses_mixed_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["compile", "--standard"], ["compile", "--standard", "--out-dir", "x", "-f", "y"]):
        with pytest.raises(SystemExit) as exit_:
            cli_main(argv)
        assert exit_.value.code == 2
    assert "--standard takes --out-dir only" in capsys.readouterr().err


def test_every_component_has_a_spec_on_the_runtime_image() -> None:
    names = {p.stem for p in (COMMITTED / "components").glob("*.yaml")}
    assert names == set(STEPS) | {"resolve-finetune-job", "resolve-quantize-job"}
    for path in (COMMITTED / "components").glob("*.yaml"):
        spec = yaml.safe_load(path.read_text())
        (executor,) = spec["deploymentSpec"]["executors"].values()
        assert executor["container"]["image"] == RUNTIME_IMAGE


def ui_parameters(pipeline: str) -> dict[str, Any]:
    spec = next(yaml.safe_load_all((COMMITTED / "pipelines" / f"{pipeline}.yaml").read_text()))
    parameters: dict[str, Any] = spec["root"]["inputDefinitions"]["parameters"]
    return parameters


@pytest.mark.parametrize(
    ("pipeline", "parameters"),
    [
        ("finetune", {"job", "artifact_store", "workspace_root"}),
        ("quantize", {"job", "artifact_store", "workspace_root"}),
        ("finetune-then-quantize", {"finetune_job", "quantize_job", "artifact_store", "workspace_root"}),
    ],
)
def test_pipelines_take_what_a_user_fills_in_with_valid_examples(pipeline: str, parameters: set[str]) -> None:
    found = ui_parameters(pipeline)
    assert set(found) == parameters
    for name, parameter in found.items():
        assert parameter["parameterType"] == "STRING" and parameter["defaultValue"], name
        if name.endswith("job"):
            parse_resource(yaml.safe_load(parameter["defaultValue"]))  # the example itself is valid


def test_steps_mount_the_workspace_claim_and_a_writable_tmp_and_carry_ui_labels() -> None:
    docs = list(yaml.safe_load_all((COMMITTED / "pipelines" / "finetune-then-quantize.yaml").read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(executors) == 12  # 2 resolvers, 6 fine-tune tasks (evaluate twice, folds), 4 quantize tasks
    for name, config in executors.items():
        assert config["pvcMount"][0]["constant"] == "kubetune-workspace", name
        assert config["pvcMount"][0]["mountPath"] == "/mnt/pvc/kubetune-workspace", name
        assert config["podMetadata"]["labels"]["kubetune.dev/started-by"] == "kubeflow-ui", name
        assert config["emptyDirMounts"] == [{"mountPath": "/tmp", "volumeName": "tmp"}], name


# --- the step components run the steps' own command lines ------------------------------------------------


@dataclass
class Pod:
    """A finished task of a step component: how its command ended and the outputs KFP would record."""

    done: subprocess.CompletedProcess[str]
    outputs: dict[str, Any]
    executor_input: dict[str, Any]


def run_pod(
    component: str, inputs: dict[str, str], task_root: Path, stand_ins: Path | None = FAKE_STEPS, **env: str
) -> Pod:
    """Run a step component's container command as KFP does, with kfp's own helpers (those its local
    DockerRunner uses in the launcher's place): the task's ExecutorInput is built from the component's
    spec, the command's placeholders ({{$}} included) are filled in from it, and the outputs are read back
    from the files the command wrote. The image's `python` is this interpreter; the steps are the
    integration tests' stand-ins (`stand_ins` on PYTHONPATH), or the real ones when it is None."""
    loaded = load_component_from_file(str(COMMITTED / "components" / f"{component}.yaml"))
    component_spec = loaded.pipeline_spec.components[f"comp-{component}"]
    executor_input = executor_input_utils.construct_executor_input(
        component_spec=component_spec, arguments=inputs, task_root=str(task_root), block_input_artifact=True
    )
    executor_input_dict = executor_input_utils.executor_input_to_dict(executor_input, component_spec)
    command = placeholder_utils.replace_placeholders(
        full_command=list(loaded.component_spec.implementation.container.command),
        executor_input_dict=executor_input_dict,
        pipeline_resource_name="kubetune-test",
        task_resource_name=component,
        pipeline_root=str(task_root.parent),
        unique_pipeline_id="run-1",
    )
    task_root.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable if part == "python" else part for part in command],
        env={**os.environ, **({"PYTHONPATH": str(stand_ins)} if stand_ins else {}), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    outputs = (
        executor_output_utils.get_outputs_for_task(executor_input, component_spec)
        if done.returncode == 0
        else {}
    )
    return Pod(done, outputs, executor_input_dict)


def test_step_components_run_the_step_command_line_on_the_runtime_image() -> None:
    for path in (COMMITTED / "components").glob("*.yaml"):
        if path.stem in STEPS:
            (executor,) = yaml.safe_load(path.read_text())["deploymentSpec"]["executors"].values()
            step = STEPS[path.stem]
            # The step's own command line, no shell around it: the config goes in as an argument and the
            # step writes its report where KFP collects the `report` output.
            assert set(executor["container"]) == {"image", "command"}, path
            command = executor["container"]["command"]
            assert command[:8] == [
                "python",
                "-m",
                step.module,
                step.step,
                "--config-json",
                "{{$.inputs.parameters['config_json']}}",
                "--workspace",
                "{{$.inputs.parameters['workspace']}}",
            ], path
            assert command[8:10] == ["--report", "{{$.outputs.parameters['report'].output_file}}"], path
            # and the workspace's whole report where KFP collects `workspace_report`, which the operator
            # reads from the run's details (it mounts no user's workspace).
            assert command[10:12] == [
                "--workspace-report",
                "{{$.outputs.parameters['workspace_report'].output_file}}",
            ], path
            # and nothing else (no embedded source, no kfp install): evaluate says which model, and logs
            # its numbers through the executor input; finetune runs training.distributed as a Kubeflow
            # Trainer TrainJob on its own image; crossvalidate-fold says which fold.
            evaluate_flags = ["--which", "{{$.inputs.parameters['which']}}", "--kfp-executor-input", "{{$}}"]
            finetune_flags = ["--launcher", "trainjob", "--image", executor["container"]["image"]]
            fold_flags = ["--fold", "{{$.inputs.parameters['fold']}}"]
            own_flags = {
                "evaluate-model": evaluate_flags,
                "finetune-model": finetune_flags,
                "crossvalidate-fold": fold_flags,
            }
            assert command[12:] == own_flags.get(path.stem, []), path


def test_a_step_pod_gets_the_config_as_an_argument_and_keeps_the_report(tmp_path: Path) -> None:
    workspace = tmp_path / "run"
    config = {"kind": "QuantizeJob", "spec": {"model": {"uri": "s3://models/router/v1"}}}
    inputs = {"config_json": json.dumps(config), "workspace": str(workspace)}
    pod = run_pod("measure-source-model", inputs, tmp_path / "measure-source")
    assert pod.done.returncode == 0, pod.done.stderr
    assert (workspace / "starts.log").read_text() == "measure-source s3://models/router/v1\n"
    assert json.loads(pod.outputs["report"]) == {"step": "measure-source"}
    assert json.loads(pod.done.stdout) == {"step": "measure-source"}  # the report shows in the pod log too
    assert WorkspaceReport.from_json(pod.outputs["workspace_report"]) == WorkspaceReport.read(str(workspace))

    pod = run_pod("evaluate-model", {**inputs, "which": "baseline"}, tmp_path / "evaluate")
    assert pod.done.returncode == 0, pod.done.stderr
    assert (workspace / "evaluation" / "baseline.json").is_file()


def test_a_failing_step_fails_its_pod(tmp_path: Path) -> None:
    workspace = tmp_path / "run"
    inputs = {"config_json": "{}", "workspace": str(workspace)}
    pod = run_pod("publish-model", inputs, tmp_path / "publish", FAKE_FAIL_STEP="publish")
    assert pod.done.returncode == 1
    assert json.loads((workspace / "error.json").read_text())["reason"] == "QualityGateFailed"
    assert "publish failed" in pod.done.stderr


TICKETS = [
    {"instruction": "Route the ticket.", "input": f"Ticket {index}: a {team} question", "output": team}
    for index, team in enumerate(["billing", "technical", "account", "shipping"] * 4)
]


def test_the_evaluate_pod_logs_the_evaluation_as_the_runs_metrics(tmp_path: Path) -> None:
    # The real steps on a tiny random model: the UI shows the evaluate task's `metrics` artifact, whose
    # metadata KFP takes from the executor output file the step writes, as baseline.evalLoss, ...
    dataset = tmp_path / "tickets.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in TICKETS))
    job = yaml.safe_load(EXAMPLE_FINETUNE_JOB)
    job["spec"]["baseModel"]["uri"] = str(tinylm.build_random_tiny(tmp_path / "model", seed=0))
    job["spec"]["dataset"] = {"uri": str(dataset), "format": "instruction", "validationSplit": "0.25"}
    config_json, workspace, _ = resolve_finetune_job(
        json.dumps(job), str(tmp_path / "store"), str(tmp_path), "r1"
    )
    inputs = {"config_json": config_json, "workspace": workspace}
    curate = run_pod("curate-dataset", inputs, tmp_path / "curate", stand_ins=None, OMP_NUM_THREADS="1")
    assert curate.done.returncode == 0, curate.done.stderr

    pod = run_pod(
        "evaluate-model",
        {**inputs, "which": "baseline"},
        tmp_path / "evaluate",
        stand_ins=None,
        OMP_NUM_THREADS="1",
    )
    assert pod.done.returncode == 0, pod.done.stderr
    evaluation = json.loads((Path(workspace) / "evaluation" / "baseline.json").read_text())
    report = json.loads(pod.outputs["report"])
    assert report == evaluation
    # Every step publishes the workspace's report so far; the operator reads it from the run's details.
    published = WorkspaceReport.from_json(pod.outputs["workspace_report"])
    curation = json.loads((Path(workspace) / WorkspaceLayout.CURATION).read_text())
    assert (published.baseline, published.curation) == (evaluation, curation)
    assert WorkspaceReport.from_json(curate.outputs["workspace_report"]).curation == curation
    numbers = {key: value for key, value in report.items() if isinstance(value, int | float)}
    assert {"evalLoss", "perplexity", "exactMatch"} <= set(numbers)
    metrics = pod.outputs["metrics"]
    assert isinstance(metrics, Metrics)
    assert metrics.metadata == {f"baseline.{key}": pytest.approx(value) for key, value in numbers.items()}
    # Where the launcher looks: the executor output file named in the executor input the pod was given.
    written = json.loads(Path(pod.executor_input["outputs"]["outputFile"]).read_text())
    (logged,) = written["artifacts"]["metrics"]["artifacts"]
    assert logged["metadata"] == metrics.metadata
    assert logged["uri"] == pod.executor_input["outputs"]["artifacts"]["metrics"]["artifacts"][0]["uri"]


# --- the resolvers run the operator's own validation and resolution ---------------------------------------


def test_resolve_finetune_job() -> None:
    config_json, workspace, folds = resolve_finetune_job(
        EXAMPLE_FINETUNE_JOB, "s3://store", "pvc://ws/runs/", "r1"
    )
    config = json.loads(config_json)
    assert (config["kind"], config["metadata"]["name"]) == ("FineTuneJob", "support-router")
    assert config["spec"]["output"]["uri"] == "s3://store"
    assert config["spec"]["training"]["batchSize"] >= 1  # defaults filled in
    assert workspace == "pvc://ws/runs/r1/finetune"
    assert folds == []  # no evaluation.crossValidation: the pipeline's fold loop runs nothing


def test_resolve_finetune_job_lists_the_folds_the_pipeline_fans_out_over() -> None:
    job = json.loads(EXAMPLE_FINETUNE_JOB)
    job["spec"]["evaluation"]["crossValidation"] = {"folds": 4}
    _, _, folds = resolve_finetune_job(json.dumps(job), "s3://store", "pvc://ws", "r1")
    assert folds == [0, 1, 2, 3]


def test_resolve_reports_invalid_jobs_by_field() -> None:
    bad = EXAMPLE_FINETUNE_JOB.replace('"learningRate": "3e-3"', '"learningRate": "fast"')
    assert bad != EXAMPLE_FINETUNE_JOB
    with pytest.raises(ValueError, match=r"job is invalid: .*spec\.training\.learningRate"):
        resolve_finetune_job(bad, "s3://store", "pvc://ws", "r1")
    with pytest.raises(ValueError, match="paste a FineTuneJob"):
        resolve_finetune_job("just text", "s3://store", "pvc://ws", "r1")
    with pytest.raises(ValueError, match="expected FineTuneJob"):
        resolve_finetune_job(EXAMPLE_QUANTIZE_JOB, "s3://store", "pvc://ws", "r1")


def test_resolve_quantize_job_alone_and_after_a_finetune(tmp_path: Path) -> None:
    config_json, workspace = resolve_quantize_job(EXAMPLE_QUANTIZE_JOB, "s3://store", "pvc://ws", "r1")
    assert json.loads(config_json)["spec"]["model"]["uri"].endswith("/support-router/v1")
    assert workspace == "pvc://ws/r1/quantize"
    with pytest.raises(ValueError, match=r"fineTuneJobRef \(support-router\) is resolved by the operator"):
        resolve_quantize_job(EXAMPLE_CHAINED_QUANTIZE_JOB, "s3://store", "pvc://ws", "r1")

    finetune_config, finetune_ws, _ = resolve_finetune_job(
        EXAMPLE_FINETUNE_JOB, "s3://store", str(tmp_path), "r1"
    )
    with pytest.raises(ValueError, match="published nothing"):
        resolve_quantize_job(
            EXAMPLE_CHAINED_QUANTIZE_JOB, "s3://store", "pvc://ws", "r1", finetune_config, finetune_ws
        )
    Path(finetune_ws).mkdir(parents=True)
    (Path(finetune_ws) / "output.json").write_text(json.dumps({"uri": "s3://store/support-router/v3"}))
    chained, _ = resolve_quantize_job(
        EXAMPLE_CHAINED_QUANTIZE_JOB, "s3://store", "pvc://ws", "r1", finetune_config, finetune_ws
    )
    spec = json.loads(chained)["spec"]
    assert spec["model"]["uri"] == "s3://store/support-router/v3"
    assert spec["dataset"] == json.loads(finetune_config)["spec"]["dataset"]  # the fine-tune's held-out data
    other = EXAMPLE_CHAINED_QUANTIZE_JOB.replace('{"name": "support-router"}', '{"name": "someone-else"}')
    assert other != EXAMPLE_CHAINED_QUANTIZE_JOB
    with pytest.raises(ValueError, match=r"spec\.model must be fineTuneJobRef: \{name: support-router\}"):
        resolve_quantize_job(other, "s3://store", "pvc://ws", "r1", finetune_config, finetune_ws)


# --- a local run of the chained pipeline ------------------------------------------------------------------

# --- local runs: each step's command line through a lightweight stand-in ---------------------------------

STAND_IN = """
from kubetune.pipelines.components import run_step_command
run_step_command("finetune-model", "{{}}", {workspace!r}, "", {report!r})
"""


def training_step(workspace: Path) -> int:
    try:
        return int(json.loads((workspace / "progress.json").read_text())["step"])
    except (OSError, ValueError):
        return 0


def test_a_stopped_local_step_saves_its_progress_before_its_stand_in_exits(tmp_path: Path) -> None:
    # `kubetune up` stops a run with SIGTERM to the worker's process group: the stand-in must outlive it
    # until the step has saved its progress, and fail with the step's status.
    workspace, report = tmp_path / "run", tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(FAKE_STEPS), "FAKE_STEPS": "200", "FAKE_STEP_S": "0.2"}
    script = STAND_IN.format(workspace=str(workspace), report=str(report))
    stand_in = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while training_step(workspace) < 2 and stand_in.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(stand_in.pid, signal.SIGTERM)
    _, stderr = stand_in.communicate(timeout=30)
    assert stand_in.returncode == 143, stderr
    assert f"interrupted after step {training_step(workspace)}" in stderr
    assert not report.exists()


RUN = """
import warnings
warnings.simplefilter("ignore")
from kfp import local
from kubetune.pipelines.standard import build_finetune_then_quantize_ui_pipeline as build
from kubetune.pipelines.standard import EXAMPLE_CHAINED_QUANTIZE_JOB
local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root={root!r}, raise_on_error=True)
build()(finetune_job={finetune_job!r}, quantize_job=EXAMPLE_CHAINED_QUANTIZE_JOB,
        artifact_store={store!r}, workspace_root={workspaces!r})
"""


def test_finetune_then_quantize_runs_and_quantizes_what_the_finetune_published(tmp_path: Path) -> None:
    workspaces = tmp_path / "runs"
    # A pasted job with evaluation.crossValidation: the resolver's folds drive the nested fold loop.
    finetune_job = json.loads(EXAMPLE_FINETUNE_JOB)
    finetune_job["spec"]["evaluation"]["crossValidation"] = {"folds": 2}
    script = RUN.format(
        root=str(tmp_path / "root"),
        store=str(tmp_path / "store"),
        workspaces=str(workspaces),
        finetune_job=json.dumps(finetune_job),
    )
    env = {**os.environ, "PYTHONPATH": str(FAKE_STEPS)}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = workspaces.iterdir()  # <workspace_root>/<run id>/{finetune,quantize}
    finetune_steps = (run / "finetune" / "starts.log").read_text().split()
    assert finetune_steps[0] == "curate" and finetune_steps[-1] == "publish"
    # one task per fold, after curation and before publish (kfp's local runner runs them one at a time)
    assert sorted(step for step in finetune_steps if step.startswith("crossvalidate")) == [
        "crossvalidate-0",
        "crossvalidate-1",
    ]
    published = json.loads((run / "finetune" / "output.json").read_text())["uri"]
    quantize_steps = (run / "quantize" / "starts.log").read_text().splitlines()
    assert [line.split()[0] for line in quantize_steps] == [
        "measure-source",
        "quantize",
        "measure-quantized",
        "publish-quantized",
    ]
    assert {line.split()[1] for line in quantize_steps} == {published}
