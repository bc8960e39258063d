"""QuantizeJob methods and pipeline steps on the random tiny Llama, on CPU."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from kubetune_components import quantize
from kubetune_components.common import models
from kubetune_components.common.errors import ConfigError, GateFailedError
from kubetune_components.finetune.train import tokenize_examples
from kubetune_components.quantize import steps as quantize_steps
from kubetune_components.quantize.layers import linear_layer_filter
from kubetune_components.quantize.pruning import measured_sparsity
from kubetune_components.quantize.serialization import model_dtype
from kubetune_contract.quantize import QuantizeGate, QuantizeMethod, QuantizeMethodType

CPU = torch.device("cpu")
EXAMPLES = [
    {
        "instruction": f"Ticket {index}: my order {index} is late",
        "output": f"Sorry, order {index} ships soon.",
    }
    for index in range(12)
]


def cpu_plan(method_type: str, **block: Any) -> quantize.QuantizationPlan:
    method: dict[str, Any] = {"type": method_type}
    block_name = quantize_steps_block_name(method_type)
    if block_name is not None:
        method[block_name] = block
    return quantize.QuantizationPlan(QuantizeMethod.model_validate(method), target="cpu")


def quantize_steps_block_name(method_type: str) -> str | None:
    return {
        "int4-weight-only": "int4WeightOnly",
        "qat": "qat",
        "pruning": "pruning",
        "mixed-precision": "mixedPrecision",
    }.get(method_type)


def linear_weight_share(model: torch.nn.Module) -> float:
    """Share of the saved fp32 bytes that sit in quantizable linear layers."""
    keep = linear_layer_filter(model)
    linear = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and keep(module, name)
    )
    total = sum(parameter.numel() for parameter in model.parameters())  # a tied weight counts once
    return linear / total


CASES: list[tuple[str, dict[str, Any]]] = [
    ("int8-weight-only", {}),
    ("int8-dynamic", {}),
    ("int4-weight-only", {"groupSize": 32}),
    (
        "qat",
        {
            "scheme": "int8-weight-only",
            "steps": 2,
            "batchSize": 2,
            "learningRate": "1e-3",
            "maxSeqLength": 64,
        },
    ),
    ("qat", {"scheme": "int4-weight-only", "steps": 2, "batchSize": 2, "groupSize": 32, "maxSeqLength": 64}),
    ("pruning", {"sparsity": "0.5", "pattern": "unstructured", "then": "none"}),
    ("pruning", {"sparsity": "0.5", "pattern": "unstructured", "then": "int8-weight-only"}),
    ("mixed-precision", {"dtype": "bf16"}),
]


def test_every_method_the_api_admits_has_an_applier_and_a_case_here() -> None:
    assert set(quantize.METHODS) == set(get_args(QuantizeMethodType))
    assert {method_type for method_type, _ in CASES} == set(get_args(QuantizeMethodType))


@pytest.mark.parametrize(("method_type", "options"), CASES, ids=[f"{m}-{json.dumps(o)}" for m, o in CASES])
def test_method_shrinks_and_reloads_to_identical_generations(
    method_type: str,
    options: dict[str, Any],
    tiny_model_dir: Path,
    tiny_tokenizer: PreTrainedTokenizerBase,
    tmp_path: Path,
) -> None:
    plan = cpu_plan(method_type, **options)
    model = models.load_causal_lm(str(tiny_model_dir))
    linear_share = linear_weight_share(model)
    features = tokenize_examples(EXAMPLES, "instruction", tiny_tokenizer, 64) if plan.method.qat else None
    details = quantize.quantize_model(
        model, plan, train_features=features, pad_token_id=int(tiny_tokenizer.pad_token_id)
    )
    prompt = list(tiny_tokenizer("The quick brown fox")["input_ids"])
    in_memory = quantize.greedy_tokens(model, prompt, 8, CPU)

    fmt = quantize.save_quantized(model, tiny_tokenizer, tmp_path / "q", {"method": plan.type})
    reloaded = quantize.load_quantized(tmp_path / "q")
    assert quantize.greedy_tokens(reloaded, prompt, 8, CPU) == in_memory

    ratio = quantize.weights_size_bytes(tmp_path / "q") / quantize.weights_size_bytes(tiny_model_dir)
    plain = 1 - linear_share  # the fp32 share left alone (embedding, norms)
    if plan.scheme in ("int8-weight-only", "int8-dynamic"):
        assert fmt == "torchao-state-dict"
        assert plain + linear_share * 0.25 < ratio < plain + linear_share * 0.35
    elif plan.scheme == "int4-weight-only":
        assert fmt == "torchao-state-dict"
        assert plain + linear_share * 0.125 < ratio < plain + linear_share * 0.25
    elif method_type == "mixed-precision":
        assert fmt == "hf-safetensors"
        assert 0.49 < ratio < 0.52
        assert model_dtype(reloaded) == torch.bfloat16
    else:  # pruning alone: dense storage, same size
        assert fmt == "hf-safetensors"
        assert 0.99 < ratio < 1.01
    if method_type == "pruning":
        assert details["sparsity"] == pytest.approx(0.5, abs=0.01)
    if plan.method.pruning is not None and plan.method.pruning.then == "none":
        assert measured_sparsity(reloaded) == pytest.approx(0.5, abs=0.01)
    if method_type == "qat":
        assert details["training"]["steps"] == 2


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ({"type": "pruning", "pruning": {"pattern": "2:4"}}, "pattern 2:4 does not support target cpu"),
        (
            {"type": "mixed-precision", "mixedPrecision": {"dtype": "fp16"}},
            "fp16 does not support target cpu",
        ),
    ],
)
def test_gpu_only_options_are_refused_on_cpu(
    method: dict[str, Any], message: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = job_config(tiny_model_dir, tmp_path, method=method)
    with pytest.raises(ConfigError, match=message):
        quantize_steps.run_quantize_step("measure-source", config, str(tmp_path / "ws"))
    error = json.loads((tmp_path / "ws" / "error.json").read_text())
    assert error["step"] == "measure-source"
    assert error["reason"] == "InvalidConfig"
    assert message in error["message"]


def job_config(
    model_uri: Path,
    tmp_path: Path,
    *,
    method: dict[str, Any] | None = None,
    gates: list[dict[str, Any]] | None = None,
    dataset_uri: Path | None = None,
    generation: int = 1,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": str(model_uri)},
        "method": method or {"type": "int8-weight-only"},
        "target": "cpu",
        "evaluation": {
            "maxSamples": 3,
            "maxNewTokens": 4,
            "latencyPrompts": 2,
            "latencyNewTokens": 3,
            "gates": gates or [],
        },
        "output": {"uri": str(tmp_path / "store")},
    }
    if dataset_uri is not None:
        spec["dataset"] = {
            "uri": str(dataset_uri),
            "format": "instruction",
            "validationSplit": "0.25",
            "seed": 1,
        }
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "QuantizeJob",
        "metadata": {"name": "shrink", "namespace": "team", "uid": "u-1", "generation": generation},
        "spec": spec,
    }


@pytest.fixture(scope="module")
def adapter_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published LoRA fine-tune of a random tiny Llama: adapter + tokenizer + kubetune manifest."""
    from peft import LoraConfig, get_peft_model

    from kubetune_components.dev import tinylm

    base_dir = tinylm.build_random_tiny(tmp_path_factory.mktemp("base") / "model", seed=1)
    model = models.load_causal_lm(str(base_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)  # a non-trivial adapter, so merging changes the weights
    adapter_dir = tmp_path_factory.mktemp("finetune") / "v1"
    peft_model.save_pretrained(str(adapter_dir))
    models.load_tokenizer(str(base_dir)).save_pretrained(str(adapter_dir))
    manifest = {
        "schema": "kubetune.dev/manifest/v1",
        "kind": "FineTuneJob",
        "baseModel": {"uri": str(base_dir)},
    }
    (adapter_dir / "kubetune-manifest.json").write_text(json.dumps(manifest))
    return adapter_dir


RunSteps = Callable[..., dict[str, Any]]


def run_all(config: dict[str, Any], workspace: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name in quantize_steps.QUANTIZE_STEPS:
        result = quantize_steps.run_quantize_step(name, config, str(workspace))
    return result


def test_pipeline_publishes_adapter_source_with_manifest_chain(
    adapter_source: Path, tmp_path: Path, write_jsonl: Callable[..., Path]
) -> None:
    dataset = write_jsonl(EXAMPLES, "tickets.jsonl")
    gates = [
        {"metric": "sizeRatio", "max": "0.9"},
        {"metric": "perplexityIncrease", "max": "0.5"},
        {"metric": "exactMatchDrop", "max": "1"},
        {"metric": "latencyRatio", "max": "1000"},
    ]
    config = job_config(adapter_source, tmp_path, gates=gates, dataset_uri=dataset)
    workspace = tmp_path / "ws"
    output = run_all(config, workspace)

    expected_uri = f"{tmp_path / 'store'}/team/shrink/v1"
    assert output == {"uri": expected_uri, "version": "v1"}
    assert json.loads((workspace / "output.json").read_text()) == output
    before = json.loads((workspace / "report" / "before.json").read_text())
    after = json.loads((workspace / "report" / "after.json").read_text())
    assert before["perplexity"] is not None and after["perplexity"] is not None
    assert before["latencySecondsPerToken"] > 0 and after["latencySecondsPerToken"] > 0
    report = json.loads((workspace / "report.json").read_text())
    assert report["sizeBytes"] == {"before": before["sizeBytes"], "after": after["sizeBytes"]}
    assert report["sizeRatio"] < 0.9
    gates_result = json.loads((workspace / "gates.json").read_text())
    assert [gate["metric"] for gate in gates_result] == [gate["metric"] for gate in gates]
    assert all(gate["passed"] for gate in gates_result)

    published = Path(expected_uri)
    manifest = json.loads((published / "kubetune-manifest.json").read_text())
    assert manifest["kind"] == "QuantizeJob"
    assert manifest["method"] == {"type": "int8-weight-only"}
    assert manifest["artifact"]["format"] == "torchao-state-dict"
    assert set(manifest["artifact"]["files"]) >= {
        "quantized_model.pt",
        "config.json",
        "kubetune-quantization.json",
    }
    assert manifest["parent"]["kind"] == "FineTuneJob"
    assert (
        manifest["parent"]["baseModel"]["uri"]
        == json.loads((adapter_source / "kubetune-manifest.json").read_text())["baseModel"]["uri"]
    )
    assert manifest["report"]["sizeRatio"] == report["sizeRatio"]

    # The published artifact loads with the one loader and matches the workspace copy token for token.
    tokenizer = models.load_tokenizer(str(published))
    prompt = list(tokenizer("Once upon a time")["input_ids"])
    assert quantize.greedy_tokens(
        quantize.load_quantized(published), prompt, 6, CPU
    ) == quantize.greedy_tokens(quantize.load_quantized(workspace / "quantized"), prompt, 6, CPU)


def test_failed_gate_publishes_nothing_then_a_passing_one_publishes(
    tiny_model_dir: Path, tmp_path: Path, write_jsonl: Callable[..., Path]
) -> None:
    dataset = write_jsonl(EXAMPLES, "tickets.jsonl")
    method = {"type": "int4-weight-only", "int4WeightOnly": {"groupSize": 32}}
    failing = job_config(
        tiny_model_dir,
        tmp_path,
        method=method,
        dataset_uri=dataset,
        gates=[{"metric": "sizeRatio", "max": "0.01"}],
    )
    workspace = tmp_path / "ws"
    for name in ("measure-source", "quantize", "measure-quantized"):
        quantize_steps.run_quantize_step(name, failing, str(workspace))
    with pytest.raises(GateFailedError, match=r"sizeRatio is 0\.\d+, above max 0\.01"):
        quantize_steps.run_quantize_step("publish-quantized", failing, str(workspace))
    error = json.loads((workspace / "error.json").read_text())
    assert error["reason"] == "QualityGateFailed"
    assert not (tmp_path / "store").exists()
    assert not (workspace / "output.json").exists()
    gates = json.loads((workspace / "gates.json").read_text())
    assert gates[0]["passed"] is False and gates[0]["op"] == "max" and gates[0]["threshold"] == 0.01

    passing = job_config(
        tiny_model_dir,
        tmp_path,
        method=method,
        dataset_uri=dataset,
        gates=[{"metric": "sizeRatio", "max": "0.9"}, {"metric": "exactMatch", "min": "0"}],
    )
    output = quantize_steps.run_quantize_step("publish-quantized", passing, str(workspace))
    assert not (workspace / "error.json").exists()
    manifest = json.loads((Path(output["uri"]) / "kubetune-manifest.json").read_text())
    assert manifest["parent"] is None  # a plain HF model directory has no kubetune manifest
    assert manifest["target"] == "cpu"


def test_quality_gate_without_data_fails_clearly(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = job_config(tiny_model_dir, tmp_path, gates=[{"metric": "perplexityIncrease", "max": "0.1"}])
    with pytest.raises(GateFailedError, match="perplexityIncrease could not be measured"):
        run_all(config, tmp_path / "ws")
    before = json.loads((tmp_path / "ws" / "report" / "before.json").read_text())
    assert before["perplexity"] is None and before["latencySecondsPerToken"] > 0


def test_qat_pipeline_trains_on_the_train_split(
    tiny_model_dir: Path, tmp_path: Path, write_jsonl: Callable[..., Path]
) -> None:
    dataset = write_jsonl(EXAMPLES, "tickets.jsonl")
    method = {
        "type": "qat",
        "qat": {
            "scheme": "int8-dynamic",
            "steps": 3,
            "batchSize": 2,
            "learningRate": "1e-4",
            "maxSeqLength": 64,
        },
    }
    config = job_config(tiny_model_dir, tmp_path, method=method, dataset_uri=dataset)
    workspace = tmp_path / "ws"
    quantize_steps.run_quantize_step("measure-source", config, str(workspace))
    result = quantize_steps.run_quantize_step("quantize", config, str(workspace))
    assert result["details"]["training"]["steps"] == 3
    progress = json.loads((workspace / "progress.json").read_text())
    assert progress["step"] == 3 and progress["totalSteps"] == 3
    record = quantize.read_quantization_record(workspace / "quantized")
    assert record["options"]["qat"]["scheme"] == "int8-dynamic"


def test_a_step_refuses_an_invalid_method_in_the_api_words(tiny_model_dir: Path, tmp_path: Path) -> None:
    method = {"type": "int4-weight-only", "int4WeightOnly": {"groupSize": 100}}
    config = job_config(tiny_model_dir, tmp_path, method=method)
    with pytest.raises(ConfigError) as refused:
        quantize_steps.run_quantize_step("measure-source", config, str(tmp_path / "ws"))
    assert str(refused.value) == (
        "QuantizeJob/shrink: spec.method.int4WeightOnly.groupSize: "
        "must be one of: 32, 64, 128, 256 (got the number 100)"
    )


def test_unknown_step_and_wrong_kind_are_config_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = job_config(tiny_model_dir, tmp_path)
    with pytest.raises(ConfigError, match="unknown step"):
        quantize_steps.run_quantize_step("shrink", config, str(tmp_path / "ws"))
    with pytest.raises(ConfigError, match="expected a QuantizeJob"):
        quantize_steps.run_quantize_step(
            "measure-source", {**config, "kind": "FineTuneJob"}, str(tmp_path / "ws")
        )


def test_quantize_before_measure_source_says_what_to_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = job_config(tiny_model_dir, tmp_path)
    with pytest.raises(ConfigError, match="measure-source step must run before quantize"):
        quantize_steps.run_quantize_step("quantize", config, str(tmp_path / "ws"))


def test_gate_values_follow_the_api_definitions() -> None:
    report = quantize_steps.build_report(
        {"sizeBytes": 1000, "latencySecondsPerToken": 0.02, "perplexity": 10.0, "exactMatch": 0.5},
        {"sizeBytes": 280, "latencySecondsPerToken": 0.03, "perplexity": 10.5, "exactMatch": 0.25},
    )
    values = quantize_steps.gate_values(report)
    assert values["sizeRatio"] == pytest.approx(0.28)
    assert values["latencyRatio"] == pytest.approx(1.5)
    assert values["perplexityIncrease"] == pytest.approx(0.05)
    assert values["exactMatchDrop"] == pytest.approx(0.25)
    assert values["exactMatch"] == pytest.approx(0.25)
    results = quantize_steps.evaluate_quantize_gates(
        [
            QuantizeGate(metric="perplexityIncrease", max="0.05"),
            QuantizeGate(metric="exactMatch", min="0.3", max="1"),
        ],
        report,
    )
    assert [(r["metric"], r["op"], r["passed"]) for r in results] == [
        ("perplexityIncrease", "max", True),
        ("exactMatch", "min", False),
        ("exactMatch", "max", True),
    ]


@pytest.mark.parametrize("peft_type", ["PREFIX_TUNING", "PROMPT_TUNING"])
def test_adapters_that_cannot_be_merged_are_refused_as_sources(
    tiny_model_dir: Path, tmp_path: Path, peft_type: str
) -> None:
    source = tmp_path / "adapter"
    source.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_model_dir / name).exists():
            (source / name).write_bytes((tiny_model_dir / name).read_bytes())
    config = {"peft_type": peft_type, "base_model_name_or_path": str(tiny_model_dir)}
    (source / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"{peft_type} adapter, which cannot be merged"):
        quantize_steps.load_source(str(source), tmp_path)
