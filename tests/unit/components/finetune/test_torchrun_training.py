"""training.distributed locally: the finetune step runs itself under torchrun (gloo on CPU); and the
step's own check that QLoRA (method.lora.quantization) has a GPU.

Two processes sharing each optimizer step's micro-batches train the same model as one process
accumulating twice as many: same data order, same global batch. Float sums are reduced in another order
across processes, so the final loss and weights agree to a tolerance (1e-4 relative on the loss), not
bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kubetune_components.common.errors import ComponentError
from kubetune_components.finetune import steps
from kubetune_components.finetune.checkpoints import list_checkpoints

LOSS_TOLERANCE = 1e-4
"""Relative: what reordering float sums across two processes may move the final loss by."""
EXAMPLES = 14
"""7 micro-batches of 2 an epoch: the last step of each epoch has one, so one process runs without data."""


def write_train_split(workspace: Path, count: int) -> Path:
    rows = [
        {
            "instruction": "Route the ticket.",
            "input": f"Ticket {index}: {'help ' * (index % 4)}",
            "output": team,
        }
        for index, team in enumerate(["billing", "technical", "account", "shipping"] * count)
    ][:count]
    (workspace / "data").mkdir(parents=True)
    (workspace / "data" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return workspace


def finetune_job(model_dir: Path, **training: Any) -> dict[str, Any]:
    spec = {
        "baseModel": {"uri": str(model_dir)},
        "dataset": {"uri": "unused.jsonl", "format": "instruction"},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": "0.0"}},
        "training": {
            "epochs": 2,
            "batchSize": 2,
            "learningRate": "1e-2",
            "scheduler": {"type": "cosine", "warmupSteps": 1},
            "seed": 7,
            "maxSeqLength": 128,
            "checkpointEverySteps": 3,
            "keepCheckpoints": 10,
            **training,
        },
    }
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "t"},
        "spec": spec,
    }


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes on two busy cores: one intra-op thread each."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_two_processes_train_the_model_one_process_trains_with_the_same_global_batch(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    alone = write_train_split(tmp_path / "one-process", EXAMPLES)
    one = steps.run_step("finetune", finetune_job(tiny_model_dir, gradientAccumulationSteps=2), str(alone))

    shared = write_train_split(tmp_path / "two-processes", EXAMPLES)
    two_process_job = finetune_job(
        tiny_model_dir,
        gradientAccumulationSteps=1,
        distributed={"workers": 1, "processesPerWorker": 2, "strategy": "ddp"},
    )
    two = steps.run_step("finetune", two_process_job, str(shared))

    assert two["processes"] == 2
    assert two["steps"] == one["steps"] == 8  # ceil(7 micro-batches / 2 per step) x 2 epochs
    assert two["tokensSeen"] == one["tokensSeen"]  # every example once per epoch, none twice
    assert two["trainLoss"] == pytest.approx(one["trainLoss"], rel=LOSS_TOLERANCE)
    weights = load_file(str(alone / "trained" / "adapter_model.safetensors"))
    shared_weights = load_file(str(shared / "trained" / "adapter_model.safetensors"))
    assert weights.keys() == shared_weights.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(shared_weights[name], weight, rtol=1e-3, atol=1e-5, msg=name)

    # Rank 0 alone wrote the checkpoints (one per 3 steps, complete) and the progress.
    assert [checkpoint.step for checkpoint in list_checkpoints(shared / "checkpoints")] == [3, 6]
    assert not [path for path in (shared / "checkpoints").iterdir() if path.name.startswith(".")]
    progress = json.loads((shared / "progress.json").read_text())
    assert (progress["step"], progress["totalSteps"]) == (8, 8)

    # Done already: the step runs no processes again and reports what rank 0 saved.
    assert steps.run_step("finetune", two_process_job, str(shared))["cached"] is True


def test_a_failing_training_process_fails_the_step_with_its_reason(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    workspace = write_train_split(tmp_path, EXAMPLES)
    job = finetune_job(tiny_model_dir, distributed={"workers": 2, "processesPerWorker": 1})
    job["spec"]["training"]["maxSeqLength"] = 8  # no response survives truncation: a DatasetError

    with pytest.raises(ComponentError) as failed:
        steps.run_step("finetune", job, str(workspace))

    assert failed.value.reason == "InvalidDataset"
    assert "maxSeqLength" in failed.value.message
    assert json.loads((workspace / "error.json").read_text())["reason"] == "InvalidDataset"


def test_qlora_on_a_machine_without_a_gpu_fails_the_step_naming_the_field(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # The API refuses quantization with target cpu; with target gpu the step still checks the machine.
    workspace = write_train_split(tmp_path, EXAMPLES)
    job = finetune_job(tiny_model_dir)
    job["spec"]["target"] = "gpu"
    job["spec"]["method"]["lora"]["quantization"] = {"bits": 4, "type": "nf4"}

    with pytest.raises(ComponentError) as refused:
        steps.run_step("finetune", job, str(workspace))

    assert refused.value.reason == "InvalidConfig"
    assert refused.value.message.startswith("method.lora.quantization: 4-bit QLoRA needs a CUDA GPU")
    assert "runs on cpu" in refused.value.message
    assert not (workspace / "trained").exists()
