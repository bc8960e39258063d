"""training.packing: examples packed into full-length sequences train exactly as they would alone."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from kubetune_components import data
from kubetune_components.common import models
from kubetune_components.common.errors import ConfigError
from kubetune_components.data import IGNORE_INDEX
from kubetune_components.finetune import loop, methods, signals
from kubetune_components.finetune import train as ft
from kubetune_contract.finetune import FineTuneJobSpec, Method

TEAMS = ("billing", "technical", "account", "shipping")


def ticket_rows(count: int) -> list[dict[str, Any]]:
    """Tickets of varied lengths, so packed sequences hold several examples and some padding."""
    return [
        {
            "instruction": "Route the ticket to a team.",
            "input": f"Ticket {index}: my {TEAMS[index % 4]} problem" + " really" * (index % 5),
            "output": TEAMS[index % 4],
        }
        for index in range(count)
    ]


def features_for(tokenizer: PreTrainedTokenizerBase, count: int) -> list[loop.Feature]:
    return ft.tokenize_examples(ticket_rows(count), "instruction", tokenizer, 128)


def per_token_losses(model: torch.nn.Module, batch: loop.Batch) -> torch.Tensor:
    """Each position's next-token loss (0 where the label is ignored), as the loop's forward computes it."""
    logits = model(**loop.model_inputs(batch)).logits[:, :-1, :]
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(
        logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none"
    )  # (batch, positions)
    return losses * (labels != IGNORE_INDEX)


def example_spans(sequence: loop.Feature) -> list[tuple[int, int]]:
    """(start, end) of each example in a packed sequence: where its position ids restart."""
    positions = sequence["position_ids"]
    starts = [index for index, position in enumerate(positions) if position == 0]
    return list(zip(starts, [*starts[1:], len(positions)], strict=True))


def test_packed_sequences_hold_every_example_once_within_the_length(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    features = features_for(tiny_tokenizer, 30)
    packed = data.pack_features(features, 256, seed=3)

    assert len(packed) < len(features) / 2
    assert all(len(sequence["input_ids"]) <= 256 for sequence in packed)
    assert all(
        len(sequence[key]) == len(sequence["input_ids"])
        for sequence in packed
        for key in ("attention_mask", "labels", "position_ids")
    )
    # Cut each packed sequence where the position ids restart: the pieces are the examples, each once.
    pieces: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for sequence in packed:
        for start, end in example_spans(sequence):
            assert sequence["position_ids"][start:end] == list(range(end - start))
            assert sequence["labels"][start] == IGNORE_INDEX
            pieces.append(
                (tuple(sequence["input_ids"][start:end]), tuple(sequence["labels"][start + 1 : end]))
            )
    originals = [(tuple(f["input_ids"]), tuple(f["labels"][1:])) for f in features]
    assert Counter(pieces) == Counter(originals)
    # The tokens that carry a loss are the unpacked examples' own, no more (the loss is normalised by them).
    assert sum(map(loop.target_token_count, packed)) == sum(map(loop.target_token_count, features))


def test_packing_is_deterministic_in_the_seed(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    features = features_for(tiny_tokenizer, 40)
    first = data.pack_features(features, 256, seed=5)
    assert data.pack_features(features, 256, seed=5) == first
    # Examples of equal length are placed in the seed's shuffled order.
    assert data.pack_features(features, 256, seed=6) != first


def test_an_example_longer_than_the_packed_length_is_refused(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    features = features_for(tiny_tokenizer, 2)
    with pytest.raises(ValueError, match="does not fit a packed sequence of 8"):
        data.pack_features(features, 8, seed=0)


@pytest.mark.parametrize("method_type", ["lora", "full"])
def test_a_packed_sequence_trains_each_example_as_if_alone(tiny_base_dir: Path, method_type: str) -> None:
    # The pretrained tiny base: its attention reads the context (random weights barely would).
    tokenizer = models.load_tokenizer(str(tiny_base_dir))
    torch.manual_seed(0)
    model = methods.apply_method(
        models.load_causal_lm(str(tiny_base_dir)), Method.model_validate({"type": method_type}), tokenizer
    )
    model.train(False)  # no dropout: the two forward passes must see the same network
    features = features_for(tokenizer, 9)
    packed = data.pack_features(features, 256, seed=1)
    assert any(sequence["position_ids"].count(0) >= 3 for sequence in packed)
    pad = int(tokenizer.pad_token_id)
    packed_batch = loop.collate(packed, pad, torch.device("cpu"))  # rows of unequal length: padded too

    with torch.no_grad():
        packed_losses = per_token_losses(model, packed_batch)
        for row, sequence in enumerate(packed):
            for start, end in example_spans(sequence):
                alone = {key: values[start:end] for key, values in sequence.items() if key != "position_ids"}
                alone_losses = per_token_losses(model, loop.collate([alone], pad, torch.device("cpu")))[0]
                # Position start + i predicts the example's token i + 1, as position i does alone.
                torch.testing.assert_close(
                    packed_losses[row, start : end - 1], alone_losses, rtol=1e-4, atol=1e-5
                )

        # The step's loss: the same token-loss sum over the same number of tokens as unpacked batches.
        packed_sum, packed_count = loop.token_loss_sum(model, packed_batch)
        unpacked = loop.collate(features, pad, torch.device("cpu"))
        unpacked_sum, unpacked_count = loop.token_loss_sum(model, unpacked)
    assert int(packed_count) == int(unpacked_count)
    torch.testing.assert_close(packed_sum, unpacked_sum, rtol=1e-4, atol=1e-4)


def test_without_its_position_ids_a_packed_sequence_would_attend_across_examples(tiny_base_dir: Path) -> None:
    """The control of the test above: the same packed tokens read as one sequence give other losses."""
    tokenizer = models.load_tokenizer(str(tiny_base_dir))
    model = models.load_causal_lm(str(tiny_base_dir))
    model.train(False)
    packed = data.pack_features(features_for(tokenizer, 9), 256, seed=1)
    batch = loop.collate(packed, int(tokenizer.pad_token_id), torch.device("cpu"))
    as_one_sequence = {key: value for key, value in batch.items() if key != "position_ids"}
    with torch.no_grad():
        isolated = per_token_losses(model, batch)
        crossed = per_token_losses(model, as_one_sequence)
    assert float((isolated - crossed).abs().max()) > 0.1


def test_a_model_that_attends_across_packed_examples_is_refused(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    features = features_for(tiny_tokenizer, 1)
    plain = models.load_causal_lm(str(tiny_model_dir))
    loop.check_packing_isolates_examples(plain, features[0]["input_ids"])
    # Prefix tuning's virtual keys and values come as a cache, past which transformers reads no packing.
    prefix_tuned = methods.apply_method(
        models.load_causal_lm(str(tiny_model_dir)),
        Method.model_validate({"type": "prefix-tuning", "prefixTuning": {"numVirtualTokens": 4}}),
        tiny_tokenizer,
    )
    with pytest.raises(
        ConfigError, match=r"^training.packing: the llama model attends across packed examples"
    ):
        loop.check_packing_isolates_examples(prefix_tuned, features[0]["input_ids"])


@pytest.mark.parametrize("method_type", ["prefix-tuning", "prompt-tuning"])
def test_packing_with_virtual_tokens_is_refused_naming_the_field(method_type: str) -> None:
    spec = {
        "baseModel": {"uri": "base"},
        "dataset": {"uri": "data.jsonl", "validationUri": "held-out.jsonl"},
        "method": {"type": method_type},
        "training": {"packing": True},
    }
    with pytest.raises(ValidationError) as refused:
        FineTuneJobSpec.model_validate(spec)
    assert [error["loc"] for error in refused.value.errors()] == [("training", "packing")]
    assert f"virtual tokens of {method_type} do not follow; use lora, ia3 or full" in str(refused.value)


def write_workspace(workspace: Path, count: int) -> Path:
    (workspace / "data").mkdir(parents=True, exist_ok=True)
    rows = "".join(json.dumps(row) + "\n" for row in ticket_rows(count))
    (workspace / "data" / "train.jsonl").write_text(rows, encoding="utf-8")
    return workspace


def packed_job(model_dir: Path) -> dict[str, Any]:
    return {
        "baseModel": {"uri": str(model_dir)},
        "dataset": {"uri": "unused.jsonl", "format": "instruction"},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": "0.1"}},
        "training": {
            "epochs": 3,
            "batchSize": 2,
            "learningRate": "2e-2",
            "scheduler": {"type": "cosine", "warmupSteps": 1},
            "seed": 11,
            "maxSeqLength": 256,
            "packing": True,
            "checkpointEverySteps": 2,
        },
        "output": {"uri": "unused", "mergeAdapter": False},
    }


def test_a_packed_run_learns_and_resumes_to_the_same_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = packed_job(tiny_model_dir)
    whole = ft.run_finetune(spec, write_workspace(tmp_path / "whole", 24))
    assert whole["examples"] == 24
    assert whole["packedSequences"] < 12
    assert whole["steps"] == 3 * -(-whole["packedSequences"] // 2)
    assert whole["tokensSeen"] == 3 * sum(
        len(f["input_ids"]) for f in features_for(models.load_tokenizer(str(tiny_model_dir)), 24)
    )

    killed = write_workspace(tmp_path / "killed", 24)
    with pytest.raises(signals.TrainingInterrupted):
        ft.run_finetune(spec, killed, on_step=lambda step: step == 3)
    resumed = ft.run_finetune(spec, killed)
    assert resumed["resumedFromStep"] == 3
    assert resumed["trainLoss"] == pytest.approx(whole["trainLoss"], rel=1e-5)
    weights = load_file(str(tmp_path / "whole" / "trained" / "adapter_model.safetensors"))
    resumed_weights = load_file(str(killed / "trained" / "adapter_model.safetensors"))
    for name, weight in weights.items():
        torch.testing.assert_close(resumed_weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_packing_reaches_the_loss_of_unpacked_training_on_the_same_examples(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Same examples per step (one packed row holding what the unpacked batch holds): same training."""
    features = features_for(tiny_tokenizer, 6)
    settings = FineTuneJobSpec.model_validate(packed_job(tiny_model_dir)).training.model_copy(
        update={"epochs": None, "max_steps": 6, "batch_size": 1, "max_seq_length": 512}
    )
    packed = data.pack_features(features, 512, seed=0)
    assert len(packed) == 1

    def trained_loss(batches: list[loop.Feature], batch_size: int) -> float:
        torch.manual_seed(0)
        model = methods.apply_method(
            models.load_causal_lm(str(tiny_model_dir)),
            Method.model_validate({"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": "0.0"}}),
            tiny_tokenizer,
        )
        result = loop.train(
            model,
            batches,
            settings.model_copy(update={"batch_size": batch_size}),
            pad_token_id=int(tiny_tokenizer.pad_token_id),
            record_losses=True,
        )
        return result.losses[-1]

    unpacked_loss = trained_loss(features, batch_size=6)
    packed_loss = trained_loss(packed, batch_size=1)
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-3)
