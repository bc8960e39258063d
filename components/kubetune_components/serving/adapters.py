"""Many LoRA versions on one base model: the base loaded once, each version a named PEFT adapter.

`SharedAdapters` holds the base model wrapped in a `PeftModel` with one adapter per version
(`add(version, model_dir)` loads one while the others serve, `remove(version)` unloads it).
`runtime(version)` is the `ModelRuntime` of one version: it shares the model, the tokenizer, the
thread pool and the micro-batcher with every other version and tags its requests with its adapter,
so a batch mixes versions and PEFT applies each row's own LoRA weights (``adapter_names=``).

Adapters are not merged into the base (a version served alone is): LoRA's product is added per row
instead, which gives the same greedy tokens up to float rounding. Only LoRA adapters without DoRA
can share a base (PEFT mixes nothing else in one batch), and every adapter must name the same base.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kubetune_components.common import models
from kubetune_components.common.errors import ModelLoadError
from kubetune_components.serving.artifacts import ModelArtifact, inspect_model_dir
from kubetune_components.serving.chat import prompt_style
from kubetune_components.serving.config import RuntimeLimits
from kubetune_components.serving.generation import BASE_ADAPTER
from kubetune_components.serving.runtime import DEFAULT_MAX_CONCURRENCY, ModelRuntime

logger = logging.getLogger(__name__)

UNLOAD_WAIT_S = 60.0
"""How long unloading a version waits for its requests still running."""


def same_base(first: str, second: str) -> bool:
    """Whether two base model URIs name the same model (local paths compared resolved)."""
    if first == second:
        return True
    if "://" in first or "://" in second:
        return False
    return Path(first).resolve() == Path(second).resolve()


def _lora_config(artifact: ModelArtifact) -> dict[str, Any]:
    try:
        config = json.loads((artifact.path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{artifact.path}/adapter_config.json is not readable: {error}") from error
    if not isinstance(config, dict):
        raise ModelLoadError(f"{artifact.path}/adapter_config.json must hold a JSON object")
    return config


def check_shareable(artifact: ModelArtifact, base_uri: str) -> None:
    """Raises ModelLoadError unless `artifact` is a LoRA adapter (without DoRA) of `base_uri`."""
    if artifact.kind != "peft-adapter":
        raise ModelLoadError(
            f"{artifact.path} holds a {artifact.kind} model; only PEFT adapters share a base model"
        )
    assert artifact.base_uri is not None
    if not same_base(artifact.base_uri, base_uri):
        raise ModelLoadError(
            f"{artifact.path} is an adapter of {artifact.base_uri}, not of {base_uri} that this server holds"
        )
    config = _lora_config(artifact)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ModelLoadError(
            f"{artifact.path} is a {peft_type or 'unknown'} adapter; only LoRA adapters share a base model"
        )
    if config.get("use_dora"):
        raise ModelLoadError(f"{artifact.path} is a DoRA adapter; DoRA adapters cannot share a base model")


class SharedAdapters:
    """One base model and the LoRA adapters of many versions, each served by `runtime(version)`."""

    def __init__(
        self,
        base_uri: str,
        *,
        limits: RuntimeLimits | None = None,
        device: torch.device | str | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        self.base_uri = base_uri
        self.device = torch.device(device) if device is not None else models.pick_device()
        base: Any = models.load_causal_lm(base_uri)
        self._base: Any = base.to(self.device).eval()
        self.tokenizer = models.load_tokenizer(base_uri)
        self.limits = limits or RuntimeLimits()
        self.max_concurrency = max_concurrency
        self.lock = threading.Lock()
        """Held by every generate call and by loading and unloading adapters."""
        self._peft: Any = None
        self._root: ModelRuntime | None = None
        self._runtimes: dict[str, ModelRuntime] = {}
        self._changes = threading.RLock()

    @classmethod
    def load(
        cls,
        adapters: Mapping[str, str | Path],
        *,
        limits: RuntimeLimits | None = None,
        device: torch.device | str | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> SharedAdapters:
        """The base of the first adapter, with every adapter of `adapters` (version -> directory)."""
        if not adapters:
            raise ModelLoadError("no adapters to serve")
        artifacts = {version: inspect_model_dir(path) for version, path in adapters.items()}
        first = next(iter(artifacts.values()))
        if first.kind != "peft-adapter" or first.base_uri is None:
            raise ModelLoadError(f"{first.path} holds a {first.kind} model, not a PEFT adapter")
        for artifact in artifacts.values():
            check_shareable(artifact, first.base_uri)
        shared = cls(first.base_uri, limits=limits, device=device, max_concurrency=max_concurrency)
        for version, artifact in artifacts.items():
            shared.add(version, artifact.path)
        return shared

    @property
    def versions(self) -> list[str]:
        return sorted(self._runtimes)

    def runtime(self, version: str) -> ModelRuntime | None:
        return self._runtimes.get(version)

    def add(self, version: str, model_dir: str | Path) -> ModelRuntime:
        """Load the adapter in `model_dir` as `version` while the other versions serve on (a version
        already loaded is replaced); returns its runtime."""
        if not version or version == BASE_ADAPTER:
            raise ModelLoadError(f"{version!r} cannot name an adapter")
        artifact = inspect_model_dir(model_dir)
        check_shareable(artifact, self.base_uri)
        with self._changes:
            if version in self._runtimes:
                self.remove(version)
            self._load_weights(version, artifact)
            runtime = self._view(version, artifact)
            self._runtimes[version] = runtime
        logger.info("loaded adapter %s from %s", version, artifact.path)
        return runtime

    def _load_weights(self, version: str, artifact: ModelArtifact) -> None:
        from peft import PeftModel

        try:
            with self.lock:
                if self._peft is None:
                    self._peft = PeftModel.from_pretrained(
                        self._base, str(artifact.path), adapter_name=version
                    )
                else:
                    self._peft.load_adapter(str(artifact.path), adapter_name=version)
                    if not isinstance(self._peft.active_adapter, str) or (
                        self._peft.active_adapter not in self._peft.peft_config
                    ):
                        self._peft.set_adapter(version)  # every other adapter was unloaded
                self._peft.to(self.device)
                self._peft.eval()
        except Exception as error:
            raise ModelLoadError(
                f"cannot load the adapter in {artifact.path} onto {self.base_uri}: {error}"
            ) from error

    def _view(self, version: str, artifact: ModelArtifact) -> ModelRuntime:
        if self._root is None:
            root = ModelRuntime(
                self._peft, self.tokenizer, limits=self.limits, max_concurrency=self.max_concurrency
            )
            root.generation_lock = self.lock
            self._root = root
        view = copy.copy(self._root)  # shares the model, executor and batcher
        view.adapter = version
        view.artifact = artifact
        view.prompt_style = prompt_style(artifact.dataset_format, self.tokenizer)
        return view

    def remove(self, version: str) -> bool:
        """Unload `version`'s adapter; False when it was not loaded. Requests it has running finish
        first (they hold the generation lock); later ones find no runtime."""
        with self._changes:
            runtime = self._runtimes.pop(version, None)
            if runtime is None:
                return False
            # A request of the version still queued for a batch would fail that whole batch (every
            # version's rows in it) once the adapter is gone: let them finish first.
            deadline = time.monotonic() + UNLOAD_WAIT_S
            while runtime.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            if runtime.in_flight > 0:
                logger.warning(
                    "unloading adapter %s with %d requests still running", version, runtime.in_flight
                )
            with self.lock:
                self._peft.delete_adapter(version)
        logger.info("unloaded adapter %s", version)
        return True

    def close(self) -> None:
        if self._root is not None:
            self._root.close()
