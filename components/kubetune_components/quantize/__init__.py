"""Shrinking a causal LM with torchao: the methods of a QuantizeJob, their artifact, and measuring it.

- methods.py: the table from `method.type` to what applies it, and `quantize_model` (PEFT-style);
- torchao_ops.py, qat.py, pruning.py, layers.py: what the methods are made of;
- serialization.py: saving a quantized model and loading it back (`load_quantized`, the one loader);
- measure.py: latency per generated token and quality on held-out examples;
- steps.py: the pipeline steps (`python -m kubetune_components.quantize.steps ...`).

The names below are the package's public surface, for the serving runtime and the benchmarks.
"""

from kubetune_components.quantize.measure import (
    BUILT_IN_LATENCY_PROMPTS,
    greedy_tokens,
    latency_prompt_ids,
    measure_quality,
    seconds_per_token,
)
from kubetune_components.quantize.methods import METHODS, QuantizationPlan, device_for, quantize_model
from kubetune_components.quantize.serialization import (
    QUANTIZATION_RECORD,
    ArtifactFormat,
    load_quantized,
    read_quantization_record,
    save_quantized,
    weights_size_bytes,
)
from kubetune_components.quantize.torchao_ops import apply_quantization, torchao_version

__all__ = [
    "BUILT_IN_LATENCY_PROMPTS",
    "METHODS",
    "QUANTIZATION_RECORD",
    "ArtifactFormat",
    "QuantizationPlan",
    "apply_quantization",
    "device_for",
    "greedy_tokens",
    "latency_prompt_ids",
    "load_quantized",
    "measure_quality",
    "quantize_model",
    "read_quantization_record",
    "save_quantized",
    "seconds_per_token",
    "torchao_version",
    "weights_size_bytes",
]
