"""evaluation.harness in the evaluate step: task YAMLs that come with the job are found by name, their data
is read from beside them (never downloaded), every bad input is refused naming the field and the file, and
the harness gates judge the tuned model's scores. One real lm-eval run scores the tiny base and a LoRA
adapter on it."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

from kubetune_components.common import models
from kubetune_components.common.errors import ConfigError
from kubetune_components.finetune.harness import (
    describe_harness_failure,
    harness_gates,
    offline,
    resolve_harness,
    resolve_task,
    run_harness,
)
from kubetune_contract.finetune import Harness, HarnessTask

REPO = Path(__file__).resolve().parents[4]
EXAMPLE_TASKS = REPO / "examples" / "harness" / "tasks"
HELD_OUT = REPO / "examples" / "quickstart" / "data" / "support-tickets-heldout.jsonl"

ROUTING_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: tickets.jsonl}}
test_split: test
output_type: loglikelihood
doc_to_text: "Ticket: {{{{input}}}}\\nTeam:"
doc_to_target: " {{{{output}}}}"
"""


def task_dir(tmp_path: Path, *names: str, text: str = ROUTING_TASK) -> Path:
    """A directory of task YAMLs (one per name) and the held-out tickets they read."""
    directory = tmp_path / "tasks"
    directory.mkdir(exist_ok=True)
    (directory / "tickets.jsonl").write_text(HELD_OUT.read_text(encoding="utf-8"), encoding="utf-8")
    for name in names:
        (directory / f"{name}.yaml").write_text(text.format(name=name), encoding="utf-8")
    return directory


def harness(uri: Path | str, name: str = "routing", gates: list[dict[str, Any]] | None = None) -> Harness:
    return Harness.model_validate({"tasks": [{"name": name, "uri": str(uri)}], "gates": gates or []})


def refusal(spec: Harness) -> str:
    with pytest.raises(ConfigError) as caught:
        resolve_harness(spec)
    return caught.value.message


# -- resolution -------------------------------------------------------------------------------------------


def test_the_shipped_example_task_resolves_with_its_data_beside_it() -> None:
    [task] = resolve_harness(
        harness(EXAMPLE_TASKS, "ticket-routing", [{"task": "ticket-routing", "metric": "acc", "min": "0"}])
    )
    assert task.yaml_path == EXAMPLE_TASKS / "ticket-routing.yaml"
    assert task.dataset_overrides["dataset_path"] == "json"
    assert task.dataset_overrides["dataset_kwargs"]["data_files"] == {"test": str(HELD_OUT.resolve())}
    assert task.metrics == ("acc", "acc_norm")


def test_a_task_is_found_by_name_in_a_directory_or_a_single_file(tmp_path: Path) -> None:
    directory = task_dir(tmp_path, "routing", "other")
    assert (
        resolve_task(HarnessTask(name="other", uri=str(directory)), 0).yaml_path == directory / "other.yaml"
    )
    single = HarnessTask(name="routing", uri=f"file://{directory / 'routing.yaml'}")
    # Without a metric_list a loglikelihood task reports lm-eval's defaults for its output type.
    assert resolve_task(single, 0).metrics == ("perplexity", "acc")


def test_included_files_and_function_tags_are_read_as_lm_eval_reads_them(tmp_path: Path) -> None:
    directory = task_dir(tmp_path, "routing")
    (directory / "routing.yaml").rename(directory / "_base.yml.inc")
    (directory / "routing.yaml").write_text(
        "include: _base.yml.inc\ntask: routing\nprocess_docs: !function utils.keep\n"
        "metric_list: [{metric: acc}]\n"
    )
    [task] = resolve_harness(harness(directory))
    assert task.metrics == ("acc",)
    assert task.dataset_overrides["dataset_kwargs"]["data_files"] == {
        "test": str(directory / "tickets.jsonl")
    }


def test_a_missing_location_is_refused_naming_the_field(tmp_path: Path) -> None:
    assert refusal(harness(tmp_path / "nowhere")) == (
        f"spec.evaluation.harness.tasks[0].uri: {tmp_path / 'nowhere'} does not exist"
    )
    (tmp_path / "empty").mkdir()
    assert refusal(harness(tmp_path / "empty")) == (
        f"spec.evaluation.harness.tasks[0].uri: {tmp_path / 'empty'} holds no task YAML (*.yaml, *.yml)"
    )


def test_a_name_the_files_do_not_define_is_refused_listing_what_they_define(tmp_path: Path) -> None:
    directory = task_dir(tmp_path, "routing", "other")
    assert refusal(harness(directory, "hellaswag")) == (
        f"spec.evaluation.harness.tasks[0].name: task 'hellaswag' is not defined in {directory} "
        "(it defines other, routing)"
    )


def test_malformed_yaml_is_refused_naming_the_file_and_line(tmp_path: Path) -> None:
    directory = task_dir(tmp_path, "routing")
    (directory / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    message = refusal(harness(directory))
    assert message.startswith(f"spec.evaluation.harness.tasks[0].uri: {directory / 'broken.yaml'} line 3: ")
    assert "malformed YAML" in message
    (directory / "broken.yaml").write_text("- just\n- a list\n")
    assert refusal(harness(directory)) == (
        f"spec.evaluation.harness.tasks[0].uri: {directory / 'broken.yaml'}: a task YAML must be a mapping, "
        "not list"
    )


def test_data_that_would_download_or_is_missing_is_refused(tmp_path: Path) -> None:
    directory = task_dir(
        tmp_path, "routing", text=ROUTING_TASK.replace("dataset_path: json", "dataset_path: Rowan/hellaswag")
    )
    message = refusal(harness(directory))
    assert message.startswith(
        f"spec.evaluation.harness.tasks[0]: task 'routing' in {directory / 'routing.yaml'}: dataset_path "
        "'Rowan/hellaswag' is neither a local file format"
    )
    assert "nothing is downloaded here" in message
    missing = task_dir(tmp_path, "routing", text=ROUTING_TASK.replace("tickets.jsonl", "gone.jsonl"))
    assert refusal(harness(missing)) == (
        f"spec.evaluation.harness.tasks[0]: task 'routing' in {missing / 'routing.yaml'}: "
        f"dataset_kwargs.data_files.test: data file {missing / 'gone.jsonl'} does not exist"
    )


def test_a_gate_on_a_metric_or_filter_the_task_does_not_report_is_refused(tmp_path: Path) -> None:
    directory = task_dir(tmp_path, "routing")
    unknown = harness(directory, gates=[{"task": "routing", "metric": "f1", "min": "0.5"}])
    assert refusal(unknown) == (
        "spec.evaluation.harness.gates[0].metric: task 'routing' reports perplexity, acc, not 'f1' "
        f"({directory / 'routing.yaml'})"
    )
    filtered = harness(directory, gates=[{"task": "routing", "metric": "acc,strict-match", "min": "0.5"}])
    assert refusal(filtered) == (
        "spec.evaluation.harness.gates[0].metric: task 'routing' has filters none, not 'strict-match' "
        f"({directory / 'routing.yaml'})"
    )


# -- gates ------------------------------------------------------------------------------------------------


def report(**metrics: float) -> dict[str, Any]:
    return {
        "harness": {
            "routing": {
                "samples": 20,
                "metrics": metrics,
                "higherIsBetter": {"acc": True, "perplexity": False},
            }
        }
    }


def test_gates_bound_the_tuned_score_and_its_improvement_in_lm_evals_direction(tmp_path: Path) -> None:
    spec = harness(
        "unused",
        gates=[
            {"task": "routing", "metric": "acc", "min": "0.5", "minImprovement": "0.1"},
            {"task": "routing", "metric": "perplexity", "minImprovement": "2"},
        ],
    )
    at_least, improved, perplexity = harness_gates(
        spec, report(acc=0.4, perplexity=30.0), report(acc=0.55, perplexity=27.0)
    )
    assert at_least == {
        "metric": "harness:routing/acc",
        "op": "min",
        "threshold": 0.5,
        "value": 0.55,
        "passed": True,
    }
    assert improved["value"] == pytest.approx(0.15) and improved["passed"]
    # Lower perplexity is better, so the improvement is the fall: 3.
    assert perplexity["value"] == pytest.approx(3.0) and perplexity["passed"]

    [_, worse, _] = harness_gates(spec, report(acc=0.6, perplexity=30.0), report(acc=0.55, perplexity=31.0))
    assert not worse["passed"]
    assert describe_harness_failure(worse) == (
        "harness:routing/acc improved by -0.05 over the base model, less than minImprovement 0.1"
    )


def test_a_score_that_was_not_measured_fails_its_gate() -> None:
    spec = harness("unused", gates=[{"task": "routing", "metric": "acc", "max": "0.9"}])
    [result] = harness_gates(spec, None, {"harness": {}})
    assert result["value"] is None and not result["passed"]
    assert (
        describe_harness_failure(result)
        == "harness:routing/acc was not scored on both the base and the tuned model"
    )
    assert describe_harness_failure({"metric": "evalLoss", "op": "max", "threshold": 1, "value": 2}) is None
    assert harness_gates(None, {}, {}) == []


# -- a real lm-eval run ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base() -> str:
    path = os.environ.get("KUBETUNE_TINY_BASE_DIR") or str(REPO / ".kubetune" / "models" / "tiny-base")
    if not Path(path, "config.json").is_file():
        pytest.skip("the tiny base is not built (kubetune dev tiny-base)")
    return path


def test_lm_eval_scores_the_loaded_base_and_its_lora_adapter_offline(tiny_base: str, tmp_path: Path) -> None:
    spec = harness(task_dir(tmp_path, "routing"))
    tokenizer = models.load_tokenizer(tiny_base)
    base = models.load_causal_lm(tiny_base)
    offline_before = {name: os.environ.get(name) for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    base_scores = run_harness(base, tokenizer, spec, limit=8, batch_size=8, seed=1)["routing"]
    assert base_scores["samples"] == 8
    assert set(base_scores["metrics"]) == {"perplexity", "acc"}
    assert base_scores["higherIsBetter"] == {"perplexity": False, "acc": True}
    assert math.isfinite(base_scores["metrics"]["perplexity"]) and base_scores["metrics"]["perplexity"] > 1
    # The offline switch is the run's only: the environment is as it was.
    assert {name: os.environ.get(name) for name in offline_before} == offline_before

    torch.manual_seed(0)
    tuned = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, weight in tuned.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5)
    tuned_scores = run_harness(tuned, tokenizer, spec, limit=8, batch_size=8, seed=1)["routing"]
    # The adapter is what is scored: the same documents get another likelihood.
    assert tuned_scores["metrics"]["perplexity"] != pytest.approx(
        base_scores["metrics"]["perplexity"], rel=1e-3
    )


def test_offline_switches_the_hub_libraries_off_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    before = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with offline():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert before == (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
