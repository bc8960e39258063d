"""Locating and loading the base model and its tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kubetune_components.common import storage
from kubetune_components.common.errors import ComponentError, ModelLoadError

HUB_SCHEME = "hf://"
FIELD = "baseModel.uri"
_TRUTHY = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True)
class ModelLocation:
    kind: Literal["hub", "local"]
    ref: str
    """Hub repository id, or a local directory."""
    revision: str | None = None


def parse_model_uri(uri: str) -> ModelLocation:
    """`hf://org/name@rev` is a hub model; paths, `file://` and `pvc://` are local directories."""
    if uri.startswith(HUB_SCHEME):
        repo_id, _, revision = uri[len(HUB_SCHEME) :].partition("@")
        if not repo_id or repo_id.startswith("/") or repo_id.endswith("/"):
            raise ModelLoadError(f"{FIELD}: {uri} is not of the form hf://org/name[@revision]")
        if "@" in uri[len(HUB_SCHEME) :] and not revision:
            raise ModelLoadError(f"{FIELD}: {uri} has an empty revision after '@'")
        return ModelLocation(kind="hub", ref=repo_id, revision=revision or None)
    try:
        path = storage.resolve_local_path(uri)
    except ComponentError as error:
        raise ModelLoadError(f"{FIELD}: {error.message}") from error
    return ModelLocation(kind="local", ref=str(path))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def _load_kwargs(location: ModelLocation, token: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if location.kind == "hub":
        kwargs["token"] = token or os.environ.get("HF_TOKEN") or None
        if location.revision:
            kwargs["revision"] = location.revision
    if hub_offline() or location.kind == "local":
        kwargs["local_files_only"] = True
    return kwargs


def _resolve(uri: str) -> ModelLocation:
    location = parse_model_uri(uri)
    if location.kind == "local":
        path = Path(location.ref)
        if not path.exists():
            raise ModelLoadError(f"{FIELD}: {uri} does not exist")
        if not path.is_dir():
            raise ModelLoadError(f"{FIELD}: {uri} is not a directory")
    return location


def _failure(uri: str, what: str, error: BaseException) -> ModelLoadError:
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    hint = " (HF_HUB_OFFLINE is set, so only the local cache is used)" if hub_offline() else ""
    return ModelLoadError(f"{FIELD}: cannot load the {what} from {uri}: {cause}{hint}")


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batching needs a pad token; most causal LMs ship without one, so reuse eos (or unk)."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        raise ModelLoadError("the tokenizer has neither a pad, an eos nor an unk token to pad with")


def load_tokenizer(uri: str, token: str | None = None) -> PreTrainedTokenizerBase:
    location = _resolve(uri)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location.ref, **_load_kwargs(location, token))
    except Exception as error:
        raise _failure(uri, "tokenizer", error) from error
    ensure_pad_token(tokenizer)
    return tokenizer


def load_causal_lm(
    uri: str, token: str | None = None, dtype: torch.dtype = torch.float32, **loading: Any
) -> PreTrainedModel:
    """The model at `uri`; `loading` are further from_pretrained arguments (a quantization_config)."""
    location = _resolve(uri)
    kwargs = {**_load_kwargs(location, token), **loading}
    try:
        model = AutoModelForCausalLM.from_pretrained(location.ref, dtype=dtype, **kwargs)
    except Exception as error:
        raise _failure(uri, "model", error) from error
    return model


def snapshot_info(uri: str) -> dict[str, Any]:
    """What exactly was loaded, for the lineage record of the published model."""
    location = parse_model_uri(uri)
    info: dict[str, Any] = {
        "uri": uri,
        "kind": location.kind,
        "ref": location.ref,
        "revision": location.revision,
    }
    if location.kind == "local":
        config = Path(location.ref) / "config.json"
        info["configSha256"] = storage.sha256_of(str(config)) if config.is_file() else None
    return info


def pick_device() -> torch.device:
    """Where steps and model servers run a model: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
