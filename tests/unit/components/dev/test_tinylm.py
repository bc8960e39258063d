from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerBase

from kubetune_components.common import models
from kubetune_components.common.errors import ConfigError
from kubetune_components.dev import tinylm


def test_corpus_is_small_text() -> None:
    paths = tinylm.corpus_paths()
    assert all(path.is_file() for path in paths)
    assert sum(path.stat().st_size for path in tinylm.CORPUS_DIR.iterdir()) < 200_000
    assert len(tinylm.corpus_documents()) > 100


def test_tokenizer_special_tokens_and_round_trip() -> None:
    tokenizer = tinylm.build_tiny_tokenizer()
    assert len(tokenizer) == tinylm.DEFAULT_VOCAB_SIZE
    assert [
        tokenizer.unk_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    ] == [
        0,
        1,
        2,
        3,
    ]
    text = "Grüße! Order #4521 🙂 was charged $19.99.\n\n### Response:\nbilling"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_is_deterministic() -> None:
    first = tinylm.build_tiny_tokenizer(vocab_size=600)
    second = tinylm.build_tiny_tokenizer(vocab_size=600)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_chat_template(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    rendered = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        rendered
        == "<s><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello</s>\n<|user|>\nBye\n<|assistant|>\n"
    )


def test_random_tiny_loads_through_from_pretrained(tiny_model_dir: Path) -> None:
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        path.name for path in tiny_model_dir.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.pad_token_id == 3 and model.config.eos_token_id == 2
    assert tinylm.parameter_count(model) < 200_000


def test_random_tiny_is_fast_and_seeded(tmp_path: Path) -> None:
    started = time.monotonic()
    first = tinylm.build_random_tiny(tmp_path / "a", seed=1)
    assert time.monotonic() - started < 5
    second = tinylm.build_random_tiny(tmp_path / "b", seed=1)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_recipe_hash_is_stable_and_covers_the_seed() -> None:
    assert tinylm.recipe_hash(tinylm.base_recipe(0)) == tinylm.recipe_hash(tinylm.base_recipe(0))
    assert tinylm.recipe_hash(tinylm.base_recipe(0)) != tinylm.recipe_hash(tinylm.base_recipe(1))
    assert set(tinylm.base_recipe()["corpus"]) == set(tinylm.CORPUS_FILES)


def test_pretraining_loop_is_deterministic() -> None:
    tokenizer = tinylm.build_tiny_tokenizer()
    shape = tinylm.TinyShape(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
    )
    documents = [[*tokenizer(text)["input_ids"], 2] for text in tinylm.corpus_documents()[:30]]
    recipe = tinylm.PretrainingRecipe(steps=12, batch_size=2, sequence_length=32, warmup_steps=2)
    states = []
    for _ in range(2):
        model = tinylm._new_model(tokenizer, shape, seed=3)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            loss = tinylm.pretrain(model, documents, recipe, seed=3)
        assert math.isfinite(loss)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])


def test_build_tiny_base_reuses_a_complete_build(tmp_path: Path) -> None:
    target = tmp_path / "base"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"stand-in")
    marker = {"recipeHash": tinylm.recipe_hash(tinylm.base_recipe(0)), "files": ["model.safetensors"]}
    (target / tinylm.MARKER_FILE).write_text(json.dumps(marker))
    messages: list[str] = []
    assert tinylm.build_tiny_base(target, log=messages.append) == target
    assert "nothing to do" in messages[0]
    assert (target / "model.safetensors").read_bytes() == b"stand-in"


def test_build_tiny_base_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not a tiny-model build"):
        tinylm.build_tiny_base(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_cli_random(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tinylm.main(["--out", str(tmp_path / "m"), "--random"]) == 0
    assert "untrained tiny Llama" in capsys.readouterr().out
    assert (tmp_path / "m" / "config.json").is_file()
    assert tinylm.main(["--out", str(tmp_path)]) == 2
    assert "is not a tiny-model build" in capsys.readouterr().err


def corpus_loss(model_dir: Path | str, texts: list[str]) -> float:
    tokenizer = models.load_tokenizer(str(model_dir))
    model = models.load_causal_lm(str(model_dir))
    losses = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_tiny_base_is_pretrained_and_idempotent(tiny_base_dir: Path, tiny_model_dir: Path) -> None:
    marker = json.loads((tiny_base_dir / tinylm.MARKER_FILE).read_text())
    assert marker["recipeHash"] == tinylm.recipe_hash(tinylm.base_recipe(0))
    assert 300_000 <= marker["parameters"] <= 2_000_000
    assert not list(tiny_base_dir.parent.glob(f".{tiny_base_dir.name}.*"))

    texts = tinylm.corpus_documents()[::40]
    pretrained = corpus_loss(tiny_base_dir, texts)
    untrained = corpus_loss(tiny_model_dir, texts)
    assert pretrained < 2.5 < untrained

    started = time.monotonic()
    assert tinylm.build_tiny_base(tiny_base_dir) == tiny_base_dir
    assert time.monotonic() - started < 2


def test_the_small_size_is_a_student_for_the_base_and_leaves_the_base_recipe_as_it_was() -> None:
    base, small = tinylm.base_recipe(0), tinylm.base_recipe(0, "small")
    assert "size" not in base  # the default build (and its hash) predates sizes
    assert {key for key in small if small[key] != base.get(key)} == {"shape", "size"}
    tokenizer = tinylm.build_tiny_tokenizer()
    base_parameters = tinylm.parameter_count(tinylm._new_model(tokenizer, tinylm.BASE_SHAPE, seed=0))
    small_parameters = tinylm.parameter_count(tinylm._new_model(tokenizer, tinylm.SMALL_SHAPE, seed=0))
    assert small_parameters <= base_parameters / 3
    with pytest.raises(ConfigError, match="size 'huge' is not one of base, small"):
        tinylm.build_tiny_base(Path("unused"), size="huge")
