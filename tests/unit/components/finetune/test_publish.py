"""Quality gates, export formats, the lineage manifest and atomic, idempotent publishing."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kubetune_components.common import models, storage
from kubetune_components.common.artifacts import MANIFEST_FILE, destination_uri
from kubetune_components.common.errors import ComponentError, ConfigError, GateFailedError
from kubetune_components.common.jobs import parse_finetune_job
from kubetune_components.finetune import publish as pub
from kubetune_components.finetune import train as ft
from kubetune_contract.common import ObjectMeta
from kubetune_contract.finetune import FineTuneJob, FineTuneJobSpec, Gate
from kubetune_contract.workspace import MODEL_CARD_FILE, MODEL_CARD_JSON_FILE

ROWS = [
    {"instruction": "Route the ticket.", "input": f"ticket {index} about {word}", "output": word}
    for index, word in enumerate(["billing", "technical", "account", "shipping"] * 3)
]
BASELINE = {"evalLoss": 3.0, "perplexity": 20.09, "exactMatch": 0.3, "samples": 4}
FINAL = {"evalLoss": 1.0, "perplexity": 2.72, "exactMatch": 0.6, "samples": 4}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads; on a busy machine spinning threads slow them 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_config(model_dir: Path, dataset: Path, store: Path, method: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "router", "namespace": "team-a", "uid": "uid-123", "generation": 3},
        "spec": {
            "baseModel": {"uri": str(model_dir)},
            "dataset": {"uri": str(dataset), "format": "instruction", "validationSplit": "0.25", "seed": 1},
            "method": method,
            "training": {
                "maxSteps": 2,
                "batchSize": 4,
                "learningRate": "1e-2",
                "seed": 1,
                "maxSeqLength": 64,
            },
            "evaluation": {"metrics": ["evalLoss", "perplexity", "exactMatch"], "gates": []},
            "output": {"uri": str(store), "mergeAdapter": False},
            "executor": "local",
        },
    }


def _trained_workspace(root: Path, model_dir: Path, method: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    dataset = root / "tickets.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    workspace = root / "workspace"
    (workspace / "data").mkdir(parents=True)
    (workspace / "data" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    storage.atomic_write_json(workspace / "data" / "curation.json", {"total": len(ROWS), "kept": len(ROWS)})
    config = make_config(model_dir, dataset, root / "store", method)
    ft.run_finetune(config["spec"], workspace)
    storage.atomic_write_json(workspace / "evaluation" / "baseline.json", BASELINE)
    storage.atomic_write_json(workspace / "evaluation" / "final.json", FINAL)
    return workspace, config


@pytest.fixture(scope="module")
def lora_template(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> tuple[Path, dict[str, Any]]:
    return _trained_workspace(
        tmp_path_factory.mktemp("lora"), tiny_model_dir, {"type": "lora", "lora": {"r": 4}}
    )


@pytest.fixture
def lora_job(lora_template: tuple[Path, dict[str, Any]], tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A private copy of the trained LoRA workspace, publishing to a private store."""
    template, config = lora_template
    workspace = tmp_path / "workspace"
    shutil.copytree(template, workspace)
    config = copy.deepcopy(config)
    config["spec"]["output"]["uri"] = str(tmp_path / "store")
    return workspace, config


def published_dir(config: dict[str, Any]) -> Path:
    return Path(config["spec"]["output"]["uri"]) / "team-a" / "router" / "v3"


def test_gate_semantics() -> None:
    gates = [
        Gate.model_validate(gate)
        for gate in (
            {"metric": "exactMatch", "minImprovement": "0.3"},  # 0.3 -> 0.6 is exactly 0.3 better
            {"metric": "evalLoss", "minImprovement": "2", "max": "1.5"},  # lower is better
            {"metric": "perplexity", "min": "3"},
            {"metric": "exactMatch", "min": "0.7"},
        )
    ]
    results = pub.evaluate_finetune_gates(gates, BASELINE, FINAL)
    table = [(r["metric"], r["op"], r["threshold"], r["passed"]) for r in results]
    assert table == [
        ("exactMatch", "minImprovement", 0.3, True),
        ("evalLoss", "max", 1.5, True),
        ("evalLoss", "minImprovement", 2.0, True),
        ("perplexity", "min", 3.0, False),
        ("exactMatch", "min", 0.7, False),
    ]
    assert results[0]["value"] == pytest.approx(0.3)
    assert results[2]["value"] == pytest.approx(2.0)
    assert (
        pub.evaluate_finetune_gates(
            [Gate(metric="evalLoss", min_improvement="0.1")], BASELINE, FINAL | {"evalLoss": 3.5}
        )[0]["passed"]
        is False
    )
    missing = pub.evaluate_finetune_gates([Gate(metric="exactMatch", min="0.1")], {}, {"evalLoss": 1.0})
    assert missing == [
        {"metric": "exactMatch", "op": "min", "threshold": 0.1, "value": None, "passed": False}
    ]


def test_a_failed_gate_publishes_nothing(lora_job: tuple[Path, dict[str, Any]]) -> None:
    workspace, config = lora_job
    config["spec"]["evaluation"]["gates"] = [
        {"metric": "exactMatch", "minImprovement": "0.5"},
        {"metric": "evalLoss", "max": "0.5"},
        {"metric": "perplexity", "max": "10"},
    ]
    with pytest.raises(GateFailedError) as failure:
        pub.run_publish(config, workspace)
    message = failure.value.message
    assert failure.value.reason == "QualityGateFailed"
    assert "exactMatch" in message and "0.3" in message and "0.5" in message
    assert "evalLoss" in message and "1" in message and "max 0.5" in message
    assert "perplexity" not in message
    gates = json.loads((workspace / "gates.json").read_text())
    assert [gate["passed"] for gate in gates] == [False, False, True]
    assert not Path(config["spec"]["output"]["uri"]).exists()
    assert not (workspace / "output.json").exists()


def test_publishing_an_adapter_with_its_manifest(lora_job: tuple[Path, dict[str, Any]]) -> None:
    workspace, config = lora_job
    config["spec"]["evaluation"]["gates"] = [{"metric": "exactMatch", "minImprovement": "0.3"}]
    output = pub.run_publish(config, workspace)
    destination = published_dir(config)
    assert output == {"uri": str(destination), "version": "v3"}
    assert json.loads((workspace / "output.json").read_text()) == output

    names = {path.name for path in destination.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", MANIFEST_FILE} <= names
    assert not names & {"model.safetensors", "README.md", ft.TRAINING_RECORD}

    manifest = json.loads((destination / MANIFEST_FILE).read_text())
    spec = config["spec"]
    assert manifest["schema"] == "kubetune.dev/manifest/v1"
    assert manifest["kind"] == "FineTuneJob"
    assert manifest["resource"] == {
        "namespace": "team-a",
        "name": "router",
        "uid": "uid-123",
        "generation": 3,
    }
    assert manifest["baseModel"] == models.snapshot_info(spec["baseModel"]["uri"])
    assert manifest["dataset"]["uri"] == spec["dataset"]["uri"]
    assert manifest["dataset"]["sha256"] == storage.sha256_of(spec["dataset"]["uri"])
    assert manifest["dataset"]["format"] == "instruction"
    assert manifest["dataset"]["curation"] == {"total": len(ROWS), "kept": len(ROWS)}
    assert manifest["method"] == FineTuneJobSpec.model_validate(spec).method.to_wire()  # defaults filled in
    assert manifest["hyperparameters"] == FineTuneJobSpec.model_validate(spec).training.to_wire()
    assert manifest["metrics"] == {"baseline": BASELINE, "final": FINAL}
    assert manifest["gates"] == json.loads((workspace / "gates.json").read_text())
    assert manifest["gates"][0]["passed"] is True
    assert manifest["artifact"]["format"] == "peft-adapter"
    files = manifest["artifact"]["files"]
    assert set(files) == names - {MANIFEST_FILE, MODEL_CARD_FILE, MODEL_CARD_JSON_FILE}  # derived from it
    assert all(files[name] == storage.sha256_of(str(destination / name)) for name in files)
    assert set(manifest["libraries"]) == {"torch", "transformers", "peft", "kubetune_components"}
    assert manifest["createdAt"].endswith("Z")
    assert manifest["parent"] is None


def test_publishing_twice_is_a_no_op_and_different_content_is_refused(
    lora_job: tuple[Path, dict[str, Any]],
) -> None:
    workspace, config = lora_job
    first = pub.run_publish(config, workspace)
    manifest_path = published_dir(config) / MANIFEST_FILE
    manifest_before = manifest_path.read_text()
    assert pub.run_publish(config, workspace) == first
    assert manifest_path.read_text() == manifest_before

    storage.atomic_write_json(workspace / "evaluation" / "final.json", FINAL | {"exactMatch": 0.9})
    with pytest.raises(ComponentError) as conflict:
        pub.run_publish(config, workspace)
    assert conflict.value.reason == "OutputExists"
    assert manifest_path.read_text() == manifest_before


def test_a_failed_export_leaves_nothing_behind(
    lora_job: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    workspace, config = lora_job
    copies = 0
    real_copy = shutil.copy2

    def copy_then_fail(source: Any, destination: Any) -> Any:
        nonlocal copies
        copies += 1
        if copies == 2:
            raise OSError("disk full")
        return real_copy(source, destination)

    monkeypatch.setattr(shutil, "copy2", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        pub.run_publish(config, workspace)
    assert not Path(config["spec"]["output"]["uri"]).exists()
    assert not (workspace / "export").exists()


def test_merged_export_holds_full_weights_equal_to_the_adapter_model(
    lora_job: tuple[Path, dict[str, Any]],
) -> None:
    workspace, config = lora_job
    config["spec"]["output"]["mergeAdapter"] = True
    pub.run_publish(config, workspace)
    destination = published_dir(config)
    names = {path.name for path in destination.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not names & {"adapter_model.safetensors", "adapter_config.json"}
    manifest = json.loads((destination / MANIFEST_FILE).read_text())
    assert manifest["artifact"]["format"] == "merged"

    merged = models.load_causal_lm(str(destination))
    adapter = ft.load_trained_model(workspace / "trained", config["spec"]["baseModel"]["uri"], merge=False)
    input_ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=input_ids).logits, adapter(input_ids=input_ids).logits)
    assert "lora" not in " ".join(load_file(str(destination / "model.safetensors")))


def test_full_fine_tuning_publishes_the_full_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    workspace, config = _trained_workspace(tmp_path, tiny_model_dir, {"type": "full", "full": {}})
    pub.run_publish(config, workspace)
    destination = published_dir(config)
    assert {"model.safetensors", "config.json"} <= {path.name for path in destination.iterdir()}
    assert json.loads((destination / MANIFEST_FILE).read_text())["artifact"]["format"] == "full"


def job_with(method_type: str, merge_adapter: bool) -> FineTuneJob:
    return parse_finetune_job(
        {
            "kind": "FineTuneJob",
            "metadata": {"name": "a"},
            "spec": {
                "baseModel": {"uri": "base"},
                "dataset": {"uri": "data.jsonl"},
                "method": {"type": method_type},
                "output": {"mergeAdapter": merge_adapter},
            },
        }
    )


def test_prompt_learning_adapters_cannot_be_merged() -> None:
    assert pub.artifact_format(job_with("ia3", merge_adapter=True)) == "merged"
    assert pub.artifact_format(job_with("full", merge_adapter=True)) == "full"
    assert pub.artifact_format(job_with("prefix-tuning", merge_adapter=False)) == "peft-adapter"
    with pytest.raises(ConfigError, match="mergeAdapter"):
        job_with("prompt-tuning", merge_adapter=True)


def test_the_destination_needs_an_output_uri_and_a_generation() -> None:
    config: dict[str, Any] = {
        "metadata": {"name": "a", "namespace": "n", "generation": 7},
        "spec": {"output": {}},
    }
    metadata = ObjectMeta.model_validate(config["metadata"])
    with pytest.raises(ConfigError, match=r"output\.uri"):
        destination_uri(metadata, config["spec"]["output"].get("uri"))
    config["spec"]["output"]["uri"] = "file:///store/"
    assert destination_uri(metadata, config["spec"]["output"]["uri"]) == ("file:///store/n/a/v7", "v7")
    del config["metadata"]["generation"]
    with pytest.raises(ConfigError, match="generation"):
        destination_uri(ObjectMeta.model_validate(config["metadata"]), config["spec"]["output"]["uri"])
