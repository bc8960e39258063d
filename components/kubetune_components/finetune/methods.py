"""The adaptation methods: which PEFT config each method type builds, and wrapping a model with it.

Like PEFT's `PEFT_TYPE_TO_CONFIG_MAPPING`, one table maps a FineTuneJob's `method.type` to the builder of
its PEFT config; the builders read the method's options block as the API parsed it (every default is
the API's). `full` is not PEFT: it trains the model's own weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from kubetune_components.common.errors import ConfigError
from kubetune_contract.common import KubeModel, as_float
from kubetune_contract.finetune import (
    FullOptions,
    Ia3Options,
    LoraOptions,
    Method,
    PromptTuningOptions,
    VirtualTokenOptions,
)

Options = TypeVar("Options", bound=KubeModel)
PeftConfigBuilder = Callable[[Any], Any]
"""Options block of one method -> its `peft.PeftConfig`."""


def _lora_config(options: LoraOptions) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=as_float(options.dropout),
        target_modules=list(options.target_modules) or None,
        use_rslora=options.use_rslora,
    )


def _prefix_tuning_config(options: VirtualTokenOptions) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=options.num_virtual_tokens)


def _prompt_tuning_config(options: PromptTuningOptions) -> Any:
    from peft import PromptTuningConfig

    # Always RANDOM in the saved config: a TEXT init would make PEFT reload the tokenizer by name
    # whenever the adapter is loaded. The text init is applied by hand after wrapping instead.
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=options.num_virtual_tokens)


def _ia3_config(options: Ia3Options) -> Any:
    from peft import IA3Config

    target_modules = list(options.target_modules) or None
    feedforward_modules = list(options.feedforward_modules) or None
    if target_modules is not None and feedforward_modules is None:
        feedforward_modules = []
    return IA3Config(
        task_type="CAUSAL_LM", target_modules=target_modules, feedforward_modules=feedforward_modules
    )


PEFT_CONFIG_BUILDERS: dict[str, PeftConfigBuilder] = {
    "lora": _lora_config,
    "prefix-tuning": _prefix_tuning_config,
    "prompt-tuning": _prompt_tuning_config,
    "ia3": _ia3_config,
}


def _train_all_weights(model: torch.nn.Module, options: FullOptions) -> torch.nn.Module:
    model.requires_grad_(True)
    if options.freeze_embeddings:
        for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):  # type: ignore[operator]
            if embedding is not None:
                embedding.weight.requires_grad_(False)
    return model


def _options_of(method: Method, expected: type[Options]) -> Options:
    options = method.options()
    assert isinstance(options, expected), f"{method.type} options are {type(options).__name__}"
    return options


def apply_method(model: torch.nn.Module, method: Method, tokenizer: Any) -> torch.nn.Module:
    """Wrap `model` for the method: a PEFT model, or the model itself with the right parameters trainable."""
    if method.type == "distillation":
        return _train_all_weights(model, FullOptions())  # the student learns with all of its weights
    preference = method.preference
    if preference is not None:  # dpo, kto: an adapter, or every weight
        if preference.weights == "full":
            return _train_all_weights(model, FullOptions())
        adapter: torch.nn.Module = _wrap_peft(
            model, _lora_config(preference.lora or LoraOptions()), f"{method.block}.lora"
        )
        return adapter
    if not method.is_peft:
        return _train_all_weights(model, _options_of(method, FullOptions))
    peft_model = _wrap_peft(model, PEFT_CONFIG_BUILDERS[method.type](method.options()), method.block)
    prompt_tuning = method.prompt_tuning
    if method.type == "prompt-tuning" and prompt_tuning is not None and prompt_tuning.init_text:
        _init_prompt_from_text(peft_model, tokenizer, prompt_tuning.init_text)
    wrapped: torch.nn.Module = peft_model
    return wrapped


def _wrap_peft(model: torch.nn.Module, config: Any, block: str) -> Any:
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise ConfigError(f"method.{block}: {error}") from error


def _init_prompt_from_text(peft_model: Any, tokenizer: Any, init_text: str) -> None:
    token_ids: list[int] = tokenizer(init_text, add_special_tokens=False)["input_ids"]
    if not token_ids:
        raise ConfigError("method.promptTuning.initText tokenizes to nothing")
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    count = embedding.weight.shape[0]
    repeated = (token_ids * math.ceil(count / len(token_ids)))[:count]
    word_embeddings = peft_model.get_input_embeddings()
    with torch.no_grad():
        init = word_embeddings(torch.tensor(repeated, device=embedding.weight.device))
        embedding.weight.copy_(init.to(embedding.weight.dtype))


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}
