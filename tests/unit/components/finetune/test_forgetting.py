"""Against forgetting: reference sets scored on the base and the tuned model, the maxReferenceDrop gate,
and replay mixed into training, deterministically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from kubetune_components.common.errors import DatasetError
from kubetune_components.finetune import steps
from kubetune_components.finetune.forgetting import (
    describe_reference_failure,
    reference_gates,
    reference_results,
    replay_features,
    replay_order,
)
from kubetune_components.finetune.publish import describe_failure
from kubetune_contract.finetune import Evaluation, Replay, reference_drop
from kubetune_contract.workspace import WorkspaceLayout

TEXTS = ["The river runs down to the sea.", "Bread is baked in a hot oven.", "The library opens at nine."]
TOPICS = ["billing", "shipping", "account", "technical"]
TICKETS = [
    {"instruction": "Route the ticket.", "input": f"Ticket {i} about {topic}", "output": topic}
    for i, topic in enumerate(TOPICS * 5)
]


def test_the_drop_is_the_relative_perplexity_rise_or_the_exact_match_fall() -> None:
    assert reference_drop("perplexity", 10.0, 12.5) == pytest.approx(0.25)
    assert reference_drop("perplexity", 10.0, 9.0) == pytest.approx(-0.1)  # tuning helped
    assert reference_drop("exactMatch", 0.6, 0.45) == pytest.approx(0.15)
    assert reference_drop("perplexity", None, 3.0) is None  # not measured on both models


def scored(value: float, metric: str = "perplexity") -> dict[str, Any]:
    return {"reference": {"general": {"metric": metric, "value": value}}}


def test_max_reference_drop_gates_every_reference_set() -> None:
    settings = Evaluation.model_validate(
        {
            "reference": [{"name": "general", "uri": "g.jsonl"}, {"name": "missing", "uri": "m.jsonl"}],
            "maxReferenceDrop": "0.1",
        }
    )
    within, missing = reference_gates(settings, scored(10.0), scored(10.8))
    assert within == {
        "metric": "referenceDrop.general",
        "op": "max",
        "threshold": 0.1,
        "value": pytest.approx(0.08),
        "passed": True,
    }
    assert (missing["value"], missing["passed"]) == (None, False)
    [exceeded, _] = reference_gates(settings, scored(10.0), scored(12.0))
    assert not exceeded["passed"]
    assert describe_failure(exceeded) == "reference set general dropped by 0.2, above maxReferenceDrop 0.1"
    assert describe_reference_failure({"metric": "evalLoss", "value": 1.0, "threshold": 0.5}) is None
    assert reference_gates(Evaluation(), scored(1.0), scored(2.0)) == []  # no limit, no gate


def test_replay_draws_a_seeded_order_repeating_the_file_when_it_is_short() -> None:
    order = replay_order(available=3, count=7, seed=42)
    assert order == replay_order(available=3, count=7, seed=42)
    assert order != replay_order(available=3, count=7, seed=43)
    assert sorted(order[:3]) == [0, 1, 2] and sorted(order[3:6]) == [0, 1, 2]
    assert len(order) == 7


def test_replay_features_are_the_replay_files_text_tokenized(
    tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    replay_file = tmp_path / "general.jsonl"
    replay_file.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    features = replay_features(Replay(uri=str(replay_file), ratio="0.5"), 10, tiny_tokenizer, 64, seed=1)
    assert len(features) == 5
    decoded = {tiny_tokenizer.decode(f["input_ids"], skip_special_tokens=True) for f in features}
    assert decoded == set(TEXTS)
    assert all(f["labels"] == f["input_ids"] for f in features)  # text: every token is learnt
    with pytest.raises(DatasetError, match=r"^training\.replay\.uri: .*missing\.jsonl: file not found"):
        replay_features(Replay(uri=str(tmp_path / "missing.jsonl")), 10, tiny_tokenizer, 64, seed=1)


def job(model_dir: Path, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    tickets = tmp_path / "tickets.jsonl"
    tickets.write_text("".join(json.dumps(row) + "\n" for row in TICKETS))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    routing = tmp_path / "routing.jsonl"
    routing.write_text("".join(json.dumps(row) + "\n" for row in TICKETS[:4]))
    spec: dict[str, Any] = {
        "baseModel": {"uri": str(model_dir)},
        "dataset": {"uri": str(tickets), "validationSplit": "0.2"},
        "method": {"type": "lora", "lora": {"r": 4}},
        "training": {"maxSteps": 4, "batchSize": 4, "learningRate": "5e-2", "maxSeqLength": 128},
        "evaluation": {
            "metrics": ["evalLoss"],
            "maxNewTokens": 3,
            "reference": [
                {"name": "general", "uri": str(general)},
                {"name": "routing", "uri": str(routing), "format": "instruction", "metric": "exactMatch"},
            ],
        },
        "output": {"uri": str(tmp_path / "store")},
    }
    for key, value in extra.items():
        spec[key] = {**spec[key], **value}
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "router", "namespace": "default", "uid": "u-1", "generation": 1},
        "spec": spec,
    }


def test_reference_sets_are_scored_before_and_after_with_what_tuning_lost(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = job(tiny_model_dir, tmp_path)
    workspace = str(tmp_path / "run")
    for step in ("curate", "evaluate-baseline", "finetune", "evaluate-final"):
        steps.run_step(step, config, workspace)
    baseline = json.loads((tmp_path / "run" / WorkspaceLayout.BASELINE_EVALUATION).read_text())
    final = json.loads((tmp_path / "run" / WorkspaceLayout.FINAL_EVALUATION).read_text())
    general_before = baseline["reference"]["general"]
    assert general_before["metric"] == "perplexity" and general_before["samples"] == 3
    assert general_before["value"] > 1
    routing_before = baseline["reference"]["routing"]
    assert routing_before["metric"] == "exactMatch" and 0 <= routing_before["value"] <= 1
    general, routing = reference_results(baseline, final)
    assert general == {
        "name": "general",
        "metric": "perplexity",
        "baseline": general_before["value"],
        "final": final["reference"]["general"]["value"],
        "drop": pytest.approx((general["final"] - general["baseline"]) / general["baseline"]),
    }
    assert general["final"] != general["baseline"]  # the tuned model is not the base
    assert routing["drop"] == pytest.approx(routing["baseline"] - routing["final"])


def test_replay_is_part_of_the_training_configuration(tiny_model_dir: Path, tmp_path: Path) -> None:
    general = tmp_path / "general.jsonl"
    config = job(tiny_model_dir, tmp_path, training={"replay": {"uri": str(general), "ratio": "0.25"}})
    workspace = str(tmp_path / "run")
    steps.run_step("curate", config, workspace)
    plain = steps.run_step("finetune", job(tiny_model_dir, tmp_path), workspace)
    replayed = steps.run_step("finetune", config, workspace)
    assert plain["replayExamples"] == 0
    assert replayed["replayExamples"] == 4  # a quarter of the 16 training tickets
    assert replayed["examples"] == plain["examples"] + 4
    assert "cached" not in replayed and replayed["fingerprint"] != plain["fingerprint"]


def test_the_kubeflow_ui_metrics_include_each_reference_sets_score() -> None:
    report = {
        "evalLoss": 1.5,
        "samples": 4,
        "reference": {"general": {"metric": "perplexity", "value": 12.5}},
    }
    assert steps.evaluation_metrics("final", report) == {
        "final.evalLoss": 1.5,
        "final.samples": 4.0,
        "final.reference.general.perplexity": 12.5,
    }
