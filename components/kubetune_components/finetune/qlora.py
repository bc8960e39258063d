"""QLoRA: the frozen base loaded in 4 bits by bitsandbytes, a LoRA adapter trained on top of it.

``method.lora.quantization: {bits: 4, type: nf4}`` needs ``target: gpu`` (the API refuses it on cpu,
by CEL and by ``kubetune validate``); here the step checks again what the machine really has, since
bitsandbytes' 4-bit kernels need CUDA: no GPU, or no bitsandbytes, is a ConfigError naming the field.
The load follows the QLoRA recipe of transformers and PEFT: ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type=nf4, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16)``, the model
placed on the process's GPU, then ``peft.prepare_model_for_kbit_training`` (norms in fp32, input grads
enabled) before the adapter is added.

Unverified here: no GPU has been lent to this project's tests yet; benchmarks/device/qlora_check.py is
the prepared check (a tiny model, a few steps, the loss falls, the adapter reloads).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from kubetune_components.common import models
from kubetune_components.common.errors import ConfigError
from kubetune_contract.finetune import LoraQuantization, Method

FIELD = "method.lora.quantization"


def quantization_of(method: Method) -> LoraQuantization | None:
    return method.lora.quantization if method.type == "lora" and method.lora is not None else None


def check_quantized_training_possible(quantization: LoraQuantization, device: torch.device) -> None:
    if device.type != "cuda":
        raise ConfigError(
            f"{FIELD}: 4-bit QLoRA needs a CUDA GPU (bitsandbytes) and this step runs on {device.type}; "
            "run the job with target gpu on a GPU node"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{FIELD}: 4-bit QLoRA needs the bitsandbytes package in the runtime image")


def bits_and_bytes_config(quantization: LoraQuantization) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=quantization.bits == 4,
        bnb_4bit_quant_type=quantization.type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_quantized_base(uri: str, quantization: LoraQuantization, device: torch.device) -> torch.nn.Module:
    """The base model in 4 bits on `device`, prepared for training an adapter on it."""
    check_quantized_training_possible(quantization, device)
    from peft import prepare_model_for_kbit_training

    model = models.load_causal_lm(
        uri,
        dtype=torch.bfloat16,
        quantization_config=bits_and_bytes_config(quantization),
        device_map={"": device.index or 0},
    )
    prepared: torch.nn.Module = prepare_model_for_kbit_training(model)
    return prepared
