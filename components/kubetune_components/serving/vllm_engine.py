"""What kubetune's vLLM service tells vLLM, and how it puts the gateway's requests to it (no vllm import).

`vllm_service` runs vLLM's OpenAI server inside a BentoML service; everything it decides is here, as
pure functions, so it is tested where vllm is not installed:

* :func:`plan_engine`: which weights vLLM loads and which LoRA adapters it serves by name, from the
  version's model directory (the Bento's model, or KUBETUNE_MODEL_DIR) and KUBETUNE_ADAPTERS. A
  LoRA adapter is served on its base (the copy a Bento bundles in ``base/``) with ``--enable-lora``
  and ``--lora-modules <version>=<adapter dir>``; full and merged weights are loaded as they are. A
  model vLLM cannot read is a ConfigError naming it: kubetune's torchao state dict, a non-LoRA PEFT
  adapter, LoRA versions beside a model that is no adapter.
* :func:`engine_cli_args`: the plan and ``spec.serving.vllm`` (KUBETUNE_VLLM_OPTIONS) as the
  arguments of vLLM's own parser (``vllm serve``'s flags).
* :func:`route` and :func:`rewrite_body`: the gateway reaches a version at ``/v1/...``, or, on a
  server of several LoRA versions, at ``/adapters/<version>/v1/...`` (as the transformers engine's
  shared adapter server). vLLM picks the LoRA by the request's ``model``, so the request's model is
  replaced by the version's LoRA name (or the served model's name); kubetune's own request
  extensions that vLLM would silently ignore are refused, naming the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubetune_components.common.errors import ConfigError
from kubetune_contract.deployment import VllmOptions
from kubetune_contract.openai import HIDDEN_REASONING_FIELD
from kubetune_contract.serving import ADAPTERS_ENV, VLLM_OPTIONS_ENV

ADAPTERS_PATH = "/adapters"
ENGINE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")
"""The OpenAI routes of vLLM's server that kubetune's service exposes (as the transformers engine)."""
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for --max-lora-rank (its ``MaxLoRARanks``)."""
UNSUPPORTED_REQUEST_FIELDS = (HIDDEN_REASONING_FIELD,)
"""kubetune's extensions the transformers engine honours and vLLM's server would drop unsaid."""
_ADAPTER_PATH = re.compile(r"^/adapters/(?P<version>[a-z0-9]([-a-z0-9]*[a-z0-9])?)(?P<rest>/v1/.*)$")


class VersionNotLoaded(ConfigError):
    """A request for a version this server does not hold (a 404 for the client)."""

    default_reason = "VersionNotLoaded"


@dataclass(frozen=True)
class LoraModule:
    """A LoRA adapter vLLM serves under ``name`` (the version), loaded from ``path``."""

    name: str
    path: Path
    rank: int


@dataclass(frozen=True)
class EnginePlan:
    """What vLLM loads: ``model`` (served as ``served_model_name``) and the LoRA adapters on it."""

    model: Path
    served_model_name: str
    loras: tuple[LoraModule, ...] = ()
    default_lora: str | None = None
    """The LoRA that answers ``/v1/...`` (a LoRA version's own server); None: the model itself."""

    def model_for(self, version: str | None) -> str:
        """The ``model`` vLLM is asked for: a version's LoRA under ``/adapters/<version>``, else the
        default one; ConfigError for a version this server does not hold."""
        if version is None:
            return self.default_lora or self.served_model_name
        if any(lora.name == version for lora in self.loras):
            return version
        held = ", ".join(lora.name for lora in self.loras) or "none"
        raise VersionNotLoaded(f"version {version!r} is not loaded on this server (loaded: {held})")


def options_from_env(env: Mapping[str, str]) -> VllmOptions:
    """``spec.serving.vllm`` as the operator passed it (JSON, wire names); defaults when unset."""
    raw = env.get(VLLM_OPTIONS_ENV, "").strip()
    if not raw:
        return VllmOptions()
    try:
        return VllmOptions.model_validate_json(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'value'}: {item['msg']}"
            for item in error.errors()
        )
        raise ConfigError(f"{VLLM_OPTIONS_ENV} is not valid spec.serving.vllm: {problems}") from None


def adapters_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """KUBETUNE_ADAPTERS (version -> adapter directory) when set, else {}; ConfigError names it."""
    raw = env.get(ADAPTERS_ENV, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as error:
        raise ConfigError(f"{ADAPTERS_ENV} is not valid JSON: {error}") from None
    if not isinstance(value, dict) or not all(isinstance(v, str) and v for v in value.values()):
        raise ConfigError(f"{ADAPTERS_ENV} must be a JSON object of version name -> adapter directory")
    return {str(version): str(directory) for version, directory in value.items()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return value


def _lora(version: str, directory: Path) -> LoraModule:
    """The LoRA module of an adapter directory; ConfigError for any other adapter."""
    config = _read_json(directory / "adapter_config.json")
    peft_type = str(config.get("peft_type") or "")
    if peft_type != "LORA":
        raise ConfigError(
            f"{directory} is a {peft_type or 'non-LoRA'} adapter; vLLM serves LoRA adapters only "
            "(use engine transformers, or merge the adapter into its base)"
        )
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"{directory / 'adapter_config.json'}: r must be a positive integer, got {rank!r}")
    return LoraModule(version, directory, rank)


def check_servable(model_dir: Path, kind: str, quantization_format: str | None) -> None:
    """ConfigError when vLLM cannot read the model in ``model_dir`` at all (checked by ``bento build
    --engine vllm`` too, so that a version's pod says so before it starts a server)."""
    if kind == "quantized" and quantization_format != "hf-safetensors":
        raise ConfigError(
            f"{model_dir} holds kubetune's {quantization_format or 'quantized'} format, which vLLM cannot "
            "read (only the transformers engine does); serve it with engine transformers"
        )
    if kind == "peft-adapter":
        _lora(model_dir.name, model_dir)


def plan_engine(
    model_dir: Path,
    version: str,
    adapters: Mapping[str, str],
    *,
    kind: str,
    base_uri: str | None,
    quantization_format: str | None = None,
) -> EnginePlan:
    """What vLLM serves for ``version`` whose model is ``model_dir`` (of artifact ``kind``, as
    ``artifacts.inspect_model_dir`` tells it), plus the LoRA versions of ``adapters`` on the same base.

    An adapter is served on its base (``base_uri``, a local directory), under its version's name;
    the ``adapters`` are taken to be LoRA adapters of that same base (as the operator groups them).
    """
    check_servable(model_dir, kind, quantization_format)
    loras: list[LoraModule] = []
    if kind == "peft-adapter":
        if base_uri is None or not Path(base_uri).is_dir():
            raise ConfigError(
                f"{model_dir} is an adapter whose base model {base_uri!r} is not a local directory"
            )
        loras.append(_lora(version, model_dir))
        model, default_lora = Path(base_uri), version
    else:
        model, default_lora = model_dir, None
        if adapters:
            raise ConfigError(
                f"{ADAPTERS_ENV} names LoRA versions, but {model_dir} is no adapter: they need the base "
                "model they were trained on"
            )
    for name, directory in adapters.items():
        if name == version:
            continue
        loras.append(_lora(name, Path(directory)))
    return EnginePlan(
        model=model,
        served_model_name=version if not loras else f"{version}-base",
        loras=tuple(loras),
        default_lora=default_lora,
    )


def lora_rank_bound(ranks: Sequence[int]) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds every rank (vLLM sizes its buffers by it)."""
    largest = max(ranks, default=1)
    for bound in VLLM_LORA_RANKS:
        if bound >= largest:
            return bound
    raise ConfigError(f"a LoRA rank of {largest} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")


def engine_cli_args(plan: EnginePlan, options: VllmOptions) -> list[str]:
    """The plan as the arguments of vLLM's OpenAI server (``make_arg_parser``, as ``vllm serve``)."""
    args = [
        "--model",
        str(plan.model),
        "--served-model-name",
        plan.served_model_name,
        "--dtype",
        options.dtype,
        "--gpu-memory-utilization",
        options.gpu_memory_utilization,
    ]
    if options.max_model_len is not None:
        args += ["--max-model-len", str(options.max_model_len)]
    if plan.loras:
        args += [
            "--enable-lora",
            "--max-loras",
            str(min(options.max_loras, len(plan.loras))),
            "--max-lora-rank",
            str(lora_rank_bound([lora.rank for lora in plan.loras])),
            "--lora-modules",
            *(f"{lora.name}={lora.path}" for lora in plan.loras),
        ]
    return args


def route(path: str) -> tuple[str | None, str] | None:
    """``(version, path on vLLM's server)`` of a request path; version None for ``/v1/...``; None for
    a path that is not one of the exposed OpenAI routes."""
    version: str | None = None
    match = _ADAPTER_PATH.match(path)
    if match is not None:
        version, path = match["version"], match["rest"]
    return (version, path) if path in ENGINE_PATHS else None


def rewrite_body(body: bytes, model: str) -> bytes:
    """The request for vLLM: ``model`` set to the LoRA (or model) vLLM serves the version as.

    ConfigError (a 400 for the client) for a body that is no JSON object or carries one of kubetune's
    extensions vLLM would ignore."""
    try:
        request = json.loads(body or b"{}")
    except ValueError as error:
        raise ConfigError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise ConfigError("the request body must be a JSON object")
    for field in UNSUPPORTED_REQUEST_FIELDS:
        if field in request:
            raise ConfigError(
                f"{field}: not supported by this version's engine (vllm); use engine transformers"
            )
    request["model"] = model
    return json.dumps(request).encode()
