"""The steps' command line as pipelines call it: the config as a JSON argument, the report kept in a file,
and the evaluation's numbers logged as a KFP task's metrics (``--kfp-executor-input``, given ``{{$}}``).

The compiled evaluate component is run with this command line in tests/unit/pipelines/test_kubeflow.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from kubetune_components.finetune import steps
from kubetune_components.quantize import steps as quantize_steps

TICKETS = [
    {"instruction": "Route the ticket.", "input": f"Ticket {index}: a {team} question", "output": team}
    for index, team in enumerate(["billing", "technical", "account", "shipping"] * 4)
]


@pytest.fixture(autouse=True)
def keep_process_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Process-wide settings of the command line are not for a shared test session.
    monkeypatch.setattr(steps, "_quiet_libraries", lambda: None)
    monkeypatch.setattr(steps, "match_threads_to_cpus", lambda: None)


@pytest.fixture
def config_json(tiny_model_dir: Path, tmp_path: Path) -> str:
    dataset = tmp_path / "tickets.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in TICKETS))
    job = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "router", "namespace": "default", "uid": "u-1", "generation": 1},
        "spec": {
            "baseModel": {"uri": str(tiny_model_dir)},
            "dataset": {"uri": str(dataset), "format": "instruction", "validationSplit": "0.25"},
            "method": {"type": "lora", "lora": {"r": 4}},
            "training": {"maxSteps": 2, "maxSeqLength": 64},
            "evaluation": {"maxNewTokens": 4, "maxSamples": 4},
            "output": {"uri": str(tmp_path / "store")},
        },
    }
    return json.dumps(job)


def executor_input(task_root: Path) -> dict[str, Any]:
    """An evaluate task's ExecutorInput as KFP's launcher hands it over ({{$}}), in protojson's names."""
    return {
        "inputs": {"parameterValues": {"which": "baseline"}},
        "outputs": {
            "artifacts": {
                "metrics": {
                    "artifacts": [
                        {
                            "name": "metrics",
                            "type": {"schemaTitle": "system.Metrics", "schemaVersion": "0.0.1"},
                            "uri": "minio://mlpipeline/v2/artifacts/kubetune-finetune/r1/evaluate-model/7/metrics",
                            "metadata": {"display_name": "metrics"},
                        }
                    ]
                }
            },
            "parameters": {"report": {"outputFile": str(task_root / "report")}},
            "outputFile": str(task_root / "executor_output.json"),
        },
    }


def test_config_as_a_json_argument_and_the_report_kept_in_a_file(
    config_json: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace, report = str(tmp_path / "run"), tmp_path / "outputs" / "report"
    arguments = ["curate", "--config-json", config_json, "--workspace", workspace, "--report", str(report)]
    assert steps.main(arguments) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed)["kept"] == 16
    assert report.read_text() == printed  # what the pod log shows is what the `report` output holds


def test_the_config_comes_from_exactly_one_place(
    config_json: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace = str(tmp_path / "run")
    config_file = tmp_path / "job.json"
    config_file.write_text(config_json)
    for arguments in (
        ["curate", "--workspace", workspace],
        ["curate", "--config", str(config_file), "--config-json", config_json, "--workspace", workspace],
    ):
        with pytest.raises(SystemExit) as exit_:
            steps.main(arguments)
        assert exit_.value.code == 2
    assert "one of the arguments --config --config-json is required" in capsys.readouterr().err

    for bad in ("{not json", "[1, 2]"):
        assert steps.main(["curate", "--config-json", bad, "--workspace", workspace]) == 2
        assert "cannot read the config --config-json" in capsys.readouterr().err


def test_a_quantize_step_takes_the_same_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report"
    arguments = ["measure-source", "--config-json", "[]", "--workspace", str(tmp_path / "run")]
    assert quantize_steps.main([*arguments, "--report", str(report)]) == 2
    assert "cannot read the config --config-json: expected a JSON object, got list" in capsys.readouterr().err
    assert not report.exists()


def test_evaluate_logs_its_numbers_to_the_tasks_metrics_artifact(
    config_json: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace, task_root = str(tmp_path / "run"), tmp_path / "task"
    assert steps.main(["curate", "--config-json", config_json, "--workspace", workspace]) == 0
    given = executor_input(task_root)
    arguments = [
        "evaluate",
        "--config-json",
        config_json,
        "--workspace",
        workspace,
        "--report",
        given["outputs"]["parameters"]["report"]["outputFile"],
        "--which",
        "baseline",
        "--kfp-executor-input",
        json.dumps(given),
    ]
    capsys.readouterr()
    assert steps.main(arguments) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads((task_root / "report").read_text()) == report

    # Read the way the launcher reads it (protojson into ExecutorOutput, which refuses unknown fields).
    written = json_format.Parse(
        (task_root / "executor_output.json").read_text(), pipeline_spec_pb2.ExecutorOutput()
    )
    (artifact,) = written.artifacts["metrics"].artifacts
    assert artifact.uri == given["outputs"]["artifacts"]["metrics"]["artifacts"][0]["uri"]
    metadata = json_format.MessageToDict(artifact.metadata)
    numbers = {
        key: value
        for key, value in report.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    assert {"evalLoss", "perplexity", "exactMatch"} <= set(numbers)
    assert metadata == {
        "display_name": "metrics",  # what the launcher gave is kept
        **{f"baseline.{key}": pytest.approx(value) for key, value in numbers.items()},
    }
    assert not list(written.parameter_values)  # the report is left to its own output file


def test_the_evaluate_step_named_for_its_model_logs_under_that_name(config_json: str, tmp_path: Path) -> None:
    workspace, task_root = str(tmp_path / "run"), tmp_path / "task"
    assert steps.main(["curate", "--config-json", config_json, "--workspace", workspace]) == 0
    executor_input_json = json.dumps(executor_input(task_root))
    arguments = ["--config-json", config_json, "--workspace", workspace, "--kfp-executor-input"]
    assert steps.main(["evaluate-baseline", *arguments, executor_input_json]) == 0
    written = json.loads((task_root / "executor_output.json").read_text())
    logged = written["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert {key for key in logged if key != "display_name"} >= {"baseline.evalLoss", "baseline.exactMatch"}
    assert all(key.startswith("baseline.") for key in logged if key != "display_name")


def test_metrics_only_from_an_evaluation_and_an_executor_input_checked_before_the_work(
    config_json: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace = tmp_path / "run"
    executor_input_json = json.dumps(executor_input(tmp_path / "task"))
    base = ["--config-json", config_json, "--workspace", str(workspace)]
    with pytest.raises(SystemExit) as exit_:
        steps.main(["curate", *base, "--kfp-executor-input", executor_input_json])
    assert exit_.value.code == 2
    assert "--kfp-executor-input only applies to the evaluate step" in capsys.readouterr().err

    no_metrics_output = {"outputs": {"outputFile": str(tmp_path / "task" / "executor_output.json")}}
    for bad in ("{{$}}", json.dumps(no_metrics_output)):
        with pytest.raises(SystemExit) as exit_:
            steps.main(["evaluate", *base, "--which", "final", "--kfp-executor-input", bad])
        assert exit_.value.code == 2
        assert "not a KFP executor input with a 'metrics' output artifact" in capsys.readouterr().err
    assert not workspace.exists()  # refused before the step ran


def test_a_failed_evaluation_logs_no_metrics_and_keeps_no_report(
    config_json: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task_root = tmp_path / "task"
    given = executor_input(task_root)
    report = given["outputs"]["parameters"]["report"]["outputFile"]
    arguments = ["evaluate", "--config-json", config_json, "--workspace", str(tmp_path / "run")]
    # Nothing curated: the evaluation has no held-out data.
    assert steps.main([*arguments, "--report", report, "--kfp-executor-input", json.dumps(given)]) == 1
    assert "evaluate failed" in capsys.readouterr().err
    assert not task_root.exists()


def test_evaluation_metrics_are_the_reports_numbers_named_for_the_model() -> None:
    report = {"evalLoss": 1.5, "examples": 8, "exactMatch": 0.25, "skipped": False, "note": "x", "by": {}}
    assert steps.evaluation_metrics("final", report) == {
        "final.evalLoss": 1.5,
        "final.examples": 8.0,
        "final.exactMatch": 0.25,
    }
