"""The pipeline steps end to end: workspace layout, error.json, the command line."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.validation import validate_documents
from kubetune_components.common.errors import ConfigError, DatasetError, GateFailedError
from kubetune_components.common.jobs import parse_finetune_job
from kubetune_components.finetune import steps

CATEGORIES = ("billing", "technical", "account", "shipping")
ROWS = [
    {
        "instruction": "Route the ticket to a team.",
        "input": f"Ticket {index}: a {CATEGORIES[index % 4]} question",
        "output": CATEGORIES[index % 4],
    }
    for index in range(16)
]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def config(tiny_model_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """A FineTuneJob as the operator hands it over: wire names, every default filled in."""
    dataset = write_rows(tmp_path / "tickets.jsonl", [*ROWS, ROWS[0]])  # one duplicate
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "router", "namespace": "default", "uid": "u-1", "generation": 1},
        "spec": {
            "baseModel": {"uri": str(tiny_model_dir)},
            "dataset": {
                "uri": str(dataset),
                "format": "instruction",
                "validationSplit": "0.25",
                "seed": 42,
                "curation": {"dedupe": True, "minTokens": 1, "maxTokens": 2048},
            },
            "method": {
                "type": "lora",
                "lora": {"r": 4, "alpha": 8, "dropout": "0.05", "targetModules": [], "useRslora": False},
            },
            "training": {
                "maxSteps": 4,
                "batchSize": 4,
                "gradientAccumulationSteps": 1,
                "learningRate": "1e-2",
                "weightDecay": "0",
                "maxGradNorm": "1.0",
                "scheduler": {"type": "cosine", "warmupRatio": "0.1"},
                "precision": "fp32",
                "seed": 42,
                "maxSeqLength": 64,
                "checkpointEverySteps": 2,
                "keepCheckpoints": 2,
            },
            "evaluation": {
                "metrics": ["evalLoss", "perplexity", "exactMatch"],
                "maxNewTokens": 4,
                "maxSamples": 8,
                "gates": [{"metric": "evalLoss", "minImprovement": "0.01"}],
            },
            "output": {"uri": str(tmp_path / "store"), "mergeAdapter": False},
            "executor": "local",
        },
    }


def edited(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `config` with the field at the dotted `path` set to `value`."""
    document = copy.deepcopy(config)
    *parents, leaf = path.split(".")
    node = document
    for part in parents:
        node = node[part]
    node[leaf] = value
    return document


def test_the_api_and_the_steps_accept_the_same_config(config: dict[str, Any]) -> None:
    assert list(validate_documents([config])) == []
    assert parse_finetune_job(config).spec.training.max_steps == 4


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.training.batchSize", "8", 'spec.training.batchSize: must be an integer (got "8")'),
        ("spec.training.maxSteps", 0, "spec.training.maxSteps: must be at least 1 (got the number 0)"),
        (
            "spec.training.learningRate",
            0.01,
            'spec.training.learningRate: must be a decimal number as a string, e.g. "3e-4" '
            "(got the number 0.01; put it in quotes)",
        ),
        (
            "spec.training.learningrate",
            "1e-2",
            "spec.training.learningrate: unknown field (did you mean learningRate?)",
        ),
        ("spec.method.lora.r", 2048, "spec.method.lora.r: must be at most 1024 (got the number 2048)"),
        (
            "spec.evaluation.gates",
            [{"metric": "evalLoss", "max": "4"}, {"metric": "perplexity"}],
            "spec.evaluation.gates[1]: a gate needs min, max or minImprovement",
        ),
        (
            "spec.dataset.curation",
            {"dedupe": True, "minTokens": 64, "maxTokens": 32},
            "spec.dataset.curation: minTokens must not exceed maxTokens",
        ),
        (
            "spec.method",
            {"type": "lora", "ia3": {}},
            "spec.method: ia3 is set but type is 'lora'; only lora may be set",
        ),
    ],
)
def test_a_config_the_api_rejects_a_step_rejects_in_the_same_words(
    config: dict[str, Any], path: str, value: Any, expected: str
) -> None:
    invalid = edited(config, path, value)
    assert [str(issue) for issue in validate_documents([invalid])] == [f"FineTuneJob/router: {expected}"]
    with pytest.raises(ConfigError) as refused:
        parse_finetune_job(invalid)
    assert str(refused.value) == f"FineTuneJob/router: {expected}"


def test_the_whole_pipeline_through_run_step(config: dict[str, Any], tmp_path: Path) -> None:
    workspace = str(tmp_path / "run")
    root = Path(workspace)
    phases = []

    report = steps.run_step("curate", config, workspace)
    phases.append(json.loads((root / "progress.json").read_text())["phase"])
    assert report["duplicates"] == 1 and report["kept"] == 16
    assert (report["train"], report["validation"]) == (12, 4)
    assert len((root / "data" / "train.jsonl").read_text().splitlines()) == 12
    assert json.loads((root / "data" / "curation.json").read_text()) == report

    baseline = steps.run_step("evaluate", config, workspace, which="baseline")
    phases.append(json.loads((root / "progress.json").read_text())["phase"])
    trained = steps.run_step("finetune", config, workspace)
    phases.append(json.loads((root / "progress.json").read_text())["phase"])
    final = steps.run_step("evaluate-final", config, workspace)
    phases.append(json.loads((root / "progress.json").read_text())["phase"])
    output = steps.run_step("publish", config, workspace)
    phases.append(json.loads((root / "progress.json").read_text())["phase"])

    assert phases == ["curating", "evaluating-baseline", "training", "evaluating", "done"]
    assert set(final) == {"evalLoss", "perplexity", "exactMatch", "lenientMatch", "samples"}
    # the baseline evaluation also scores the trivial predictors exactMatch is read against
    assert set(baseline) == set(final) | {"majorityClass", "nearestNeighbour"}
    assert final["evalLoss"] < baseline["evalLoss"]
    assert trained["steps"] == 4
    progress = json.loads((root / "progress.json").read_text())
    assert set(progress) == {
        "phase",
        "step",
        "totalSteps",
        "epoch",
        "trainLoss",
        "learningRate",
        "tokensSeen",
        "updatedAt",
        "checkpointStep",
        "resumedFromStep",
    }
    assert (progress["step"], progress["totalSteps"]) == (4, 4)
    assert progress["resumedFromStep"] is None  # a first attempt resumes nothing
    assert progress["tokensSeen"] > 0 and progress["trainLoss"] > 0
    assert sorted(path.name for path in (root / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert json.loads((root / "evaluation" / "baseline.json").read_text()) == baseline
    assert json.loads((root / "gates.json").read_text())[0]["passed"] is True
    assert output == {"uri": str(tmp_path / "store" / "default" / "router" / "v1"), "version": "v1"}
    assert json.loads((root / "output.json").read_text()) == output
    assert (Path(output["uri"]) / "adapter_model.safetensors").is_file()
    assert not (root / "error.json").exists()


def test_a_separate_validation_file_is_kept_out_of_training(config: dict[str, Any], tmp_path: Path) -> None:
    validation = write_rows(tmp_path / "held-out.jsonl", ROWS[:3])
    config["spec"]["dataset"]["validationUri"] = str(validation)
    report = steps.curate(config, str(tmp_path / "run"))
    assert report["validation"] == 3
    assert report["alsoInValidation"] == 3
    assert report["train"] == 13
    train = (tmp_path / "run" / "data" / "train.jsonl").read_text()
    assert all(json.dumps(row) not in train for row in ROWS[:3])


def test_a_failing_step_writes_error_json_and_raises(config: dict[str, Any], tmp_path: Path) -> None:
    workspace = tmp_path / "run"
    config["spec"]["dataset"]["uri"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError):
        steps.run_step("curate", config, str(workspace))
    error = json.loads((workspace / "error.json").read_text())
    assert error["step"] == "curate" and error["reason"] == "InvalidDataset"
    assert "missing.jsonl" in error["message"]

    with pytest.raises(ConfigError):
        steps.run_step("train-harder", config, str(workspace))
    assert json.loads((workspace / "error.json").read_text())["reason"] == "InvalidConfig"

    config["spec"]["dataset"]["uri"] = str(write_rows(tmp_path / "ok.jsonl", ROWS))
    steps.run_step("curate", config, str(workspace))
    assert not (workspace / "error.json").exists()  # a successful retry clears the stale error


def test_a_failed_gate_is_reported_in_error_json(config: dict[str, Any], tmp_path: Path) -> None:
    workspace = f"file://{tmp_path / 'run'}"
    config["spec"]["evaluation"]["gates"] = [{"metric": "exactMatch", "min": "1.01"}]
    config["spec"]["evaluation"]["metrics"] = ["exactMatch"]
    for name, kwargs in (("curate", {}), ("evaluate", {"which": "baseline"}), ("finetune", {})):
        steps.run_step(name, config, workspace, **kwargs)
    steps.run_step("evaluate", config, workspace, which="final")
    with pytest.raises(GateFailedError):
        steps.run_step("publish", config, workspace)
    error = json.loads((tmp_path / "run" / "error.json").read_text())
    assert error["step"] == "publish" and error["reason"] == "QualityGateFailed"
    assert "exactMatch" in error["message"] and "1.01" in error["message"]
    assert not (tmp_path / "store").exists()


def test_the_command_line(
    config: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Process-wide settings of the command line are not for a shared test session.
    monkeypatch.setattr(steps, "_quiet_libraries", lambda: None)
    monkeypatch.setattr(steps, "match_threads_to_cpus", lambda: None)
    config_file = tmp_path / "job.json"
    config_file.write_text(json.dumps(config))
    workspace = str(tmp_path / "run")
    assert steps.main(["curate", "--config", str(config_file), "--workspace", workspace]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 16
    arguments = ["evaluate", "--which", "baseline", "--config", str(config_file), "--workspace", workspace]
    assert steps.main(arguments) == 0
    assert "evalLoss" in json.loads(capsys.readouterr().out)

    config["spec"]["dataset"]["format"] = "chat"  # the rows are not chat rows
    config_file.write_text(json.dumps(config))
    assert steps.main(["curate", "--config", str(config_file), "--workspace", workspace]) == 1
    assert "InvalidDataset" in capsys.readouterr().err
    assert steps.main(["curate", "--config", str(tmp_path / "nope.json"), "--workspace", workspace]) == 2


def test_cpu_quota_is_a_positive_count_or_none() -> None:
    quota = steps.cpu_quota()
    assert quota is None or quota >= 1
