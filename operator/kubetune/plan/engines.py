"""Which published models a ModelDeployment's engine can serve (``spec.serving.engine``).

The transformers engine serves everything kubetune publishes. vLLM reads Hugging Face directories
(full or merged weights, and the plain safetensors a mixed-precision or pruning-only QuantizeJob
writes) and LoRA adapters, which it applies per request (``--enable-lora``). It cannot read:

* kubetune's torchao state dict (``quantized_model.pt``), what every QuantizeJob whose weights are
  torchao tensor subclasses writes (int8-weight-only, int8-dynamic, int4-weight-only, qat, and
  pruning followed by one of them): vLLM's torchao support loads checkpoints saved through
  transformers' TorchAoConfig, not this format;
* unmerged prefix-tuning, prompt-tuning and IA3 adapters: vLLM's adapter support is LoRA only.

A job's method is in its spec, so a version refers to a model the engine cannot serve is refused
when its job is resolved, naming the field and the method. A ``uri`` version's format is known only
once its files are read: the vLLM service refuses it then (:mod:`kubetune_components.serving.vllm_engine`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune_contract.deployment import ServingEngine
from kubetune_contract.finetune import PEFT_METHODS, Method, Output

VLLM_LORA_METHODS = frozenset({"lora"})
VLLM_QUANTIZE_METHODS = frozenset({"mixed-precision", "pruning"})
"""QuantizeJob methods whose artifact is plain safetensors (pruning only without ``then``)."""
ENGINE_FIELD = "spec.serving.engine"


def _quantize_problem(job_name: str, spec: Mapping[str, Any]) -> str | None:
    method = spec.get("method") or {}
    method_type = str(method.get("type") or "")
    then = str((method.get("pruning") or {}).get("then") or "none")
    if method_type in VLLM_QUANTIZE_METHODS and not (method_type == "pruning" and then != "none"):
        return None
    what = f"pruning then {then}" if method_type == "pruning" else method_type
    return (
        f"{ENGINE_FIELD}: vllm cannot serve QuantizeJob/{job_name}'s {what} model: it is kubetune's "
        "torchao state dict (quantized_model.pt), which only the transformers engine reads; use engine "
        "transformers, or a mixed-precision or pruning (then: none) QuantizeJob"
    )


def _finetune_problem(job_name: str, spec: Mapping[str, Any]) -> str | None:
    method_type = str((spec.get("method") or {}).get("type") or Method.model_fields["type"].default)
    merged = (spec.get("output") or {}).get("mergeAdapter", Output.model_fields["merge_adapter"].default)
    if method_type not in PEFT_METHODS or merged or method_type in VLLM_LORA_METHODS:
        return None
    return (
        f"{ENGINE_FIELD}: vllm cannot serve FineTuneJob/{job_name}'s unmerged {method_type} adapter: "
        "vLLM applies LoRA adapters only; use engine transformers, or output.mergeAdapter: true"
    )


def engine_problem(
    engine: ServingEngine, kind: str, job_name: str, job_spec: Mapping[str, Any]
) -> str | None:
    """Why ``engine`` cannot serve the model a ``kind`` job with ``job_spec`` publishes; None if it can."""
    if engine != "vllm":
        return None
    if kind == "QuantizeJob":
        return _quantize_problem(job_name, job_spec)
    if kind == "FineTuneJob":
        return _finetune_problem(job_name, job_spec)
    return None
