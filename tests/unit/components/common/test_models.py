from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from kubetune_components.common import models, storage
from kubetune_components.common.errors import ModelLoadError
from kubetune_components.common.models import ModelLocation


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("hf://meta-llama/Llama-3.2-1B@abc123", ModelLocation("hub", "meta-llama/Llama-3.2-1B", "abc123")),
        ("hf://org/name", ModelLocation("hub", "org/name", None)),
        ("hf://gpt2@main", ModelLocation("hub", "gpt2", "main")),
        ("file:///models/base", ModelLocation("local", "/models/base", None)),
        ("/models/base", ModelLocation("local", "/models/base", None)),
        ("models/base", ModelLocation("local", "models/base", None)),
    ],
)
def test_parse_model_uri(uri: str, expected: ModelLocation) -> None:
    assert models.parse_model_uri(uri) == expected


def test_parse_pvc_model_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(storage.PVC_ROOT_ENV, str(tmp_path))
    assert models.parse_model_uri("pvc://models/llama") == ModelLocation(
        "local", str(tmp_path / "models/llama")
    )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("hf://", "baseModel.uri: hf:// is not of the form hf://org/name[@revision]"),
        ("hf://org/name@", "baseModel.uri: hf://org/name@ has an empty revision after '@'"),
        ("s3://bucket/model", "baseModel.uri: s3://bucket/model: scheme s3:// is not a local location"),
    ],
)
def test_parse_model_uri_rejects(uri: str, message: str) -> None:
    with pytest.raises(ModelLoadError) as caught:
        models.parse_model_uri(uri)
    assert caught.value.message.startswith(message)
    assert caught.value.reason == "ModelLoadFailed"


@pytest.mark.parametrize("form", ["plain", "file", "pvc"])
def test_load_tokenizer_and_model_from_local_forms(
    form: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(storage.PVC_ROOT_ENV, str(tiny_model_dir.parent.parent))
    uri = {
        "plain": str(tiny_model_dir),
        "file": f"file://{tiny_model_dir}",
        "pvc": f"pvc://{tiny_model_dir.parent.name}/{tiny_model_dir.name}",
    }[form]
    tokenizer = models.load_tokenizer(uri)
    model = models.load_causal_lm(uri)
    assert tokenizer.pad_token_id is not None
    assert model.config.vocab_size == len(tokenizer)
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("hello world", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_load_causal_lm_in_another_dtype(tiny_model_dir: Path) -> None:
    model = models.load_causal_lm(str(tiny_model_dir), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_local_model_names_the_uri(tmp_path: Path) -> None:
    missing = tmp_path / "x" / "y"
    for load in (models.load_tokenizer, models.load_causal_lm):
        with pytest.raises(ModelLoadError) as caught:
            load(str(missing))
        assert caught.value.message == f"baseModel.uri: {missing} does not exist"
        assert caught.value.reason == "ModelLoadFailed"


def test_a_file_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is not a directory"):
        models.load_causal_lm(str(tmp_path / "model.bin"))


def test_broken_model_directory_reports_the_cause(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError) as caught:
        models.load_causal_lm(str(broken))
    assert caught.value.message.startswith(f"baseModel.uri: cannot load the model from {broken}: ")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as caught:
        models.load_tokenizer(str(empty))
    assert caught.value.message.startswith(f"baseModel.uri: cannot load the tokenizer from {empty}: ")


def test_offline_hub_model_that_is_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(ModelLoadError) as caught:
        models.load_tokenizer("hf://kubetune-test/does-not-exist@v1")
    assert caught.value.message.startswith(
        "baseModel.uri: cannot load the tokenizer from hf://kubetune-test/does-not-exist@v1: "
    )
    assert caught.value.message.endswith("(HF_HUB_OFFLINE is set, so only the local cache is used)")


def test_hub_loading_passes_revision_token_and_offline(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    real_from_pretrained = AutoTokenizer.from_pretrained

    def fake_from_pretrained(ref: str, **kwargs: Any) -> PreTrainedTokenizerBase:
        calls.append((ref, kwargs))
        return real_from_pretrained(str(tiny_model_dir))

    monkeypatch.setattr(
        "kubetune_components.common.models.AutoTokenizer.from_pretrained", fake_from_pretrained
    )
    monkeypatch.setenv("HF_TOKEN", "from-env")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    models.load_tokenizer("hf://org/name@v2")
    models.load_tokenizer("hf://org/name", token="explicit")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.load_tokenizer("hf://org/name")
    assert calls == [
        ("org/name", {"token": "from-env", "revision": "v2"}),
        ("org/name", {"token": "explicit"}),
        ("org/name", {"token": "from-env", "local_files_only": True}),
    ]


def test_pad_token_falls_back_to_eos(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.pad_token = None
    assert tokenizer.pad_token is None
    models.ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token


def test_snapshot_info(tiny_model_dir: Path) -> None:
    config_sha = hashlib.sha256((tiny_model_dir / "config.json").read_bytes()).hexdigest()
    assert models.snapshot_info(str(tiny_model_dir)) == {
        "uri": str(tiny_model_dir),
        "kind": "local",
        "ref": str(tiny_model_dir),
        "revision": None,
        "configSha256": config_sha,
    }
    assert models.snapshot_info("hf://org/name@abc") == {
        "uri": "hf://org/name@abc",
        "kind": "hub",
        "ref": "org/name",
        "revision": "abc",
    }
