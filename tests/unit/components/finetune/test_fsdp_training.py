"""training.distributed.strategy fsdp: full fine-tuning with the weights sharded across processes (torch
FSDP2 on CPU with gloo), training the model one process trains with the same global batch.

The 2-process run is started the way a Kubeflow Trainer TrainJob starts it on a node: the TrainJob's own
command with the PET_* variables the Trainer sets; the resumed run is started locally (torchrun
--standalone). Both reach the same sharded loop. Float sums are reduced in another order across
processes, so losses and weights agree to a tolerance, not bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kubetune_components.common import models
from kubetune_components.common.errors import ComponentError
from kubetune_components.finetune import steps, trainjob
from kubetune_components.finetune.checkpoints import list_checkpoints

LOSS_TOLERANCE = 1e-4
"""Relative: what reordering float sums across two processes may move the final loss by."""
WEIGHT_RTOL, WEIGHT_ATOL = 1e-3, 1e-5
EXAMPLES = 14
"""7 micro-batches of 2 an epoch, 4 per step: the second step of an epoch has 3, two for rank 0 and one
for rank 1, which runs an unlabelled copy as its second so both run as many forwards."""
FSDP = {"workers": 1, "processesPerWorker": 2, "strategy": "fsdp"}
RUN_DEADLINE_S = 600


def write_train_split(workspace: Path) -> Path:
    rows = [
        {
            "instruction": "Route the ticket.",
            "input": f"Ticket {index}: {'help ' * (index % 4)}",
            "output": team,
        }
        for index, team in enumerate(["billing", "technical", "account", "shipping"] * EXAMPLES)
    ][:EXAMPLES]
    (workspace / "data").mkdir(parents=True)
    (workspace / "data" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return workspace


def full_finetune_job(model_dir: Path, **training: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": {
            "baseModel": {"uri": str(model_dir)},
            "dataset": {"uri": "unused.jsonl", "format": "instruction"},
            "method": {"type": "full"},
            "training": {
                "epochs": 2,
                "batchSize": 2,
                "learningRate": "1e-3",
                "scheduler": {"type": "cosine", "warmupSteps": 1},
                "seed": 7,
                "maxSeqLength": 128,
                "checkpointEverySteps": 2,
                "keepCheckpoints": 10,
                **training,
            },
        },
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_as_trainjob_node(job: dict[str, Any], workspace: Path) -> None:
    """The TrainJob's trainer command, run as the Trainer runs it on a node of 2 processes."""
    manifest = trainjob.render_trainjob(job, str(workspace), image="unused", namespace="default")
    command = manifest["spec"]["trainer"]["command"]
    assert command[0] == "python"
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PET_NNODES": str(manifest["spec"]["trainer"]["numNodes"]),
        "PET_NPROC_PER_NODE": str(manifest["spec"]["trainer"]["numProcPerNode"]),
        "PET_NODE_RANK": "0",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(free_port()),
    }
    completed = subprocess.run(
        [sys.executable, *command[1:]], env=environment, timeout=RUN_DEADLINE_S, check=False
    )
    assert completed.returncode == 0


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes on two busy cores: one intra-op thread each."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def one_process(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """The reference: one process accumulating the 4 micro-batches of a step two processes share."""
    workspace = write_train_split(tmp_path_factory.mktemp("one-process"))
    job = full_finetune_job(tiny_model_dir, gradientAccumulationSteps=4)
    return workspace, steps.run_step("finetune", job, str(workspace))


@pytest.fixture(scope="module")
def sharded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Two processes sharding the weights, started by the TrainJob's command."""
    workspace = write_train_split(tmp_path_factory.mktemp("fsdp"))
    job = full_finetune_job(tiny_model_dir, gradientAccumulationSteps=2, distributed=FSDP)
    run_as_trainjob_node(job, workspace)
    record = json.loads((workspace / "trained" / "kubetune-training.json").read_text())
    return workspace, record


def test_two_processes_sharding_the_weights_train_the_model_one_process_trains(
    one_process: tuple[Path, dict[str, Any]], sharded: tuple[Path, dict[str, Any]]
) -> None:
    alone, one = one_process
    shared, two = sharded

    assert (two["processes"], two["strategy"], two["method"]) == (2, "fsdp", "full")
    assert two["steps"] == one["steps"] == 4  # ceil(7 micro-batches / 4 per step) x 2 epochs
    assert two["tokensSeen"] == one["tokensSeen"]
    assert two["trainLoss"] == pytest.approx(one["trainLoss"], rel=LOSS_TOLERANCE)
    assert two["trainableParameters"] == one["trainableParameters"]  # whole, not one shard's
    weights = load_file(str(alone / "trained" / "model.safetensors"))
    sharded_weights = load_file(str(shared / "trained" / "model.safetensors"))
    assert weights.keys() == sharded_weights.keys()  # tied embeddings saved once, as one process saves
    for name, weight in weights.items():
        torch.testing.assert_close(
            sharded_weights[name], weight, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name
        )
    # Each process held its half of the weights (dim 0 split in two), not all of them as with ddp.
    whole_bytes = sum(weight.numel() * weight.element_size() for weight in weights.values())
    assert two["parameterBytesPerProcess"] == pytest.approx(whole_bytes / 2, rel=0.05)


def test_the_sharded_run_publishes_a_plain_model_and_writes_each_checkpoint_once(
    sharded: tuple[Path, dict[str, Any]],
) -> None:
    shared, _ = sharded
    config = json.loads((shared / "trained" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    model = models.load_causal_lm(str(shared / "trained"))  # no torch.distributed, no FSDP
    assert not any(type(param).__name__ == "DTensor" for param in model.parameters())

    # Rank 0 alone wrote whole checkpoints (every 2 steps, complete) and the progress.
    assert [checkpoint.step for checkpoint in list_checkpoints(shared / "checkpoints")] == [2, 4]
    assert not [path for path in (shared / "checkpoints").iterdir() if path.name.startswith(".")]
    checkpoint_weights = load_file(str(shared / "checkpoints" / "step-4" / "trainable.safetensors"))
    whole = dict(model.named_parameters())
    assert {name: tensor.shape for name, tensor in checkpoint_weights.items()} == {
        name: param.shape for name, param in whole.items()
    }
    progress = json.loads((shared / "progress.json").read_text())
    assert (progress["step"], progress["totalSteps"]) == (4, 4)


def test_a_sharded_run_killed_after_a_checkpoint_resumes_to_the_same_weights(
    tiny_model_dir: Path, sharded: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    shared, uninterrupted = sharded
    # What a kill between the checkpoints of steps 2 and 4 leaves: step-2, no trained/.
    killed = write_train_split(tmp_path / "killed")
    shutil.copytree(shared / "checkpoints" / "step-2", killed / "checkpoints" / "step-2")
    job = full_finetune_job(tiny_model_dir, gradientAccumulationSteps=2, distributed=FSDP)

    resumed = steps.run_step("finetune", job, str(killed))  # locally: torchrun --standalone

    assert resumed["resumedFromStep"] == 2
    assert resumed["trainLoss"] == pytest.approx(uninterrupted["trainLoss"], rel=LOSS_TOLERANCE)
    weights = load_file(str(shared / "trained" / "model.safetensors"))
    resumed_weights = load_file(str(killed / "trained" / "model.safetensors"))
    for name, weight in weights.items():
        torch.testing.assert_close(
            resumed_weights[name], weight, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name
        )


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        (
            {"method": {"type": "lora"}},
            "fsdp shards the weights of method full; a lora adapter trains with ddp",
        ),
        ({"training": {"evalEverySteps": 2}}, "fsdp does not run the periodic evaluations of"),
    ],
    ids=["an adapter", "periodic evaluations"],
)
def test_what_fsdp_cannot_shard_fails_the_step_naming_the_strategy(
    tiny_model_dir: Path, tmp_path: Path, change: dict[str, dict[str, Any]], refusal: str
) -> None:
    workspace = write_train_split(tmp_path)
    job = full_finetune_job(tiny_model_dir, distributed=FSDP)
    for block, fields in change.items():
        job["spec"][block].update(fields)

    with pytest.raises(ComponentError) as refused:
        steps.run_step("finetune", job, str(workspace))

    assert refused.value.reason == "InvalidConfig"
    assert refused.value.message.startswith(f"FineTuneJob/t: spec.training.distributed.strategy: {refusal}")
    assert not (workspace / "checkpoints").exists()
