"""spec.scheduling: every pod of the job's pipeline carries Kueue's queue-name and priority-class labels."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from kubetune.api.validation import parse_resource
from kubetune.config import OperatorConfig
from kubetune.pipelines.compile import compile_resource
from kubetune_contract.finetune import KUEUE_PRIORITY_LABEL, KUEUE_QUEUE_LABEL, FineTuneJob

JOB: dict[str, Any] = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-router", "namespace": "ml", "uid": "6d1c2f0e-aaaa", "generation": 3},
    "spec": {
        "baseModel": {"uri": "pvc://models/tiny-base"},
        "dataset": {"uri": "pvc://models/support.jsonl"},
        "executor": "kfp",
    },
}


def pod_labels_of_every_step(job: dict[str, Any], tmp_path: Path) -> list[dict[str, str]]:
    settings = OperatorConfig(home=tmp_path, workspace_root="pvc://kubetune-workspace/runs")
    out = tmp_path / "pipeline.yaml"
    compile_resource(parse_resource(job, FineTuneJob), settings, out)
    platform = list(yaml.safe_load_all(out.read_text()))[1]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # curate, evaluate-baseline, finetune, evaluate-final, crossvalidate-fold, publish
    assert len(executors) == 6
    return [executor["podMetadata"]["labels"] for executor in executors.values()]


def test_a_queue_name_labels_every_pipeline_pod_for_kueue(tmp_path: Path) -> None:
    job = copy.deepcopy(JOB)
    job["spec"]["scheduling"] = {"queueName": "team-a-gpus", "priorityClassName": "training"}

    for labels in pod_labels_of_every_step(job, tmp_path):
        assert labels[KUEUE_QUEUE_LABEL] == "team-a-gpus"
        assert labels[KUEUE_PRIORITY_LABEL] == "training"
        assert labels["kubetune.dev/name"] == "support-router"


def test_without_scheduling_no_pod_is_queued(tmp_path: Path) -> None:
    for labels in pod_labels_of_every_step(JOB, tmp_path):
        assert KUEUE_QUEUE_LABEL not in labels
        assert KUEUE_PRIORITY_LABEL not in labels
