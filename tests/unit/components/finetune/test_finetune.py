"""The training loop: methods, loss masking, accumulation, schedules, checkpoints and resume."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from kubetune_components import data
from kubetune_components.common import models
from kubetune_components.common.errors import ConfigError
from kubetune_components.common.progress import ProgressReporter
from kubetune_components.finetune import loop, methods, signals
from kubetune_components.finetune import train as ft
from kubetune_components.finetune.checkpoints import list_checkpoints
from kubetune_contract.finetune import FineTuneJobSpec, Method, Training

CATEGORIES = ("billing", "technical", "account", "shipping")


def ticket_rows(count: int) -> list[dict[str, Any]]:
    return [
        {
            "instruction": "Route the ticket to a team.",
            "input": f"Ticket {index}: my {CATEGORIES[index % 4]} problem needs help"
            + " please" * (index % 3),
            "output": CATEGORIES[index % 4],
        }
        for index in range(count)
    ]


def features_for(tokenizer: PreTrainedTokenizerBase, count: int) -> list[ft.Feature]:
    return ft.tokenize_examples(ticket_rows(count), "instruction", tokenizer, 128)


def training_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "epochs": None,
        "maxSteps": 4,
        "batchSize": 4,
        "gradientAccumulationSteps": 1,
        "learningRate": "1e-2",
        "weightDecay": "0",
        "maxGradNorm": "1.0",
        "scheduler": {"type": "constant"},
        "precision": "fp32",
        "seed": 7,
        "maxSeqLength": 128,
        "checkpointEverySteps": 100,
        "keepCheckpoints": 2,
    }
    spec.update(overrides)
    return spec


def job_spec(model_dir: Path, method: dict[str, Any], **training: Any) -> dict[str, Any]:
    return {
        "baseModel": {"uri": str(model_dir)},
        "dataset": {"uri": "unused.jsonl", "format": "instruction"},
        "method": method,
        "training": training_spec(**training),
        "output": {"uri": "unused", "mergeAdapter": False},
    }


def write_train_split(workspace: Path, count: int = 12) -> Path:
    (workspace / "data").mkdir(parents=True, exist_ok=True)
    path = workspace / "data" / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ticket_rows(count)), encoding="utf-8")
    return workspace


METHOD_CASES = [
    pytest.param({"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": "0.0"}}, "1e-2", id="lora"),
    pytest.param(
        {
            "type": "lora",
            "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "up_proj"], "useRslora": True},
        },
        "1e-2",
        id="lora-rslora-targets",
    ),
    pytest.param(
        {"type": "prefix-tuning", "prefixTuning": {"numVirtualTokens": 4}}, "5e-2", id="prefix-tuning"
    ),
    pytest.param(
        {"type": "prompt-tuning", "promptTuning": {"numVirtualTokens": 4, "initText": "route ticket"}},
        "5e-2",
        id="prompt-tuning",
    ),
    pytest.param({"type": "ia3", "ia3": {}}, "1e-1", id="ia3"),
    pytest.param(
        {
            "type": "ia3",
            "ia3": {"targetModules": ["k_proj", "down_proj"], "feedforwardModules": ["down_proj"]},
        },
        "1e-1",
        id="ia3-targets",
    ),
    pytest.param({"type": "full", "full": {"freezeEmbeddings": False}}, "3e-3", id="full"),
]


@pytest.mark.parametrize(("method", "learning_rate"), METHOD_CASES)
def test_every_method_lowers_the_loss_on_a_repeated_batch(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase, method: dict[str, Any], learning_rate: str
) -> None:
    torch.manual_seed(0)
    model = methods.apply_method(
        models.load_causal_lm(str(tiny_model_dir)), Method.model_validate(method), tiny_tokenizer
    )
    features = features_for(tiny_tokenizer, 4)
    settings = Training.model_validate(training_spec(maxSteps=6, batchSize=4, learningRate=learning_rate))
    result = loop.train(
        model, features, settings, pad_token_id=tiny_tokenizer.pad_token_id, record_losses=True
    )
    assert result.steps == 6
    assert len(result.losses) == 6
    assert all(math.isfinite(loss) for loss in result.losses)
    assert result.losses[-1] < result.losses[0] - 0.01
    if method["type"] != "full":
        total = sum(param.numel() for param in model.parameters())
        assert 0 < sum(param.numel() for param in methods.trainable_parameters(model).values()) < total / 2


def test_full_fine_tuning_can_freeze_the_embeddings(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    model: Any = models.load_causal_lm(str(tiny_model_dir))
    embeddings_before = model.get_input_embeddings().weight.detach().clone()
    layer = model.model.layers[0].mlp.up_proj
    layer_before = layer.weight.detach().clone()
    method = Method.model_validate({"type": "full", "full": {"freezeEmbeddings": True}})
    model = methods.apply_method(model, method, tiny_tokenizer)
    settings = Training.model_validate(training_spec(maxSteps=2, learningRate="1e-2"))
    loop.train(model, features_for(tiny_tokenizer, 4), settings, pad_token_id=tiny_tokenizer.pad_token_id)
    assert torch.equal(model.get_input_embeddings().weight, embeddings_before)
    assert not torch.equal(layer.weight, layer_before)


def test_prompt_tuning_starts_from_the_init_text(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    method = Method.model_validate(
        {"type": "prompt-tuning", "promptTuning": {"numVirtualTokens": 5, "initText": "route ticket"}}
    )
    model: Any = methods.apply_method(models.load_causal_lm(str(tiny_model_dir)), method, tiny_tokenizer)
    token_ids = tiny_tokenizer("route ticket", add_special_tokens=False)["input_ids"]
    expected_ids = (token_ids * 5)[:5]
    prompt = model.prompt_encoder["default"].embedding.weight
    expected = model.get_input_embeddings().weight[expected_ids]
    torch.testing.assert_close(prompt, expected)


def test_the_loss_covers_only_response_tokens(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    model = models.load_causal_lm(str(tiny_model_dir))
    rows = ticket_rows(2)
    features = ft.tokenize_examples(rows, "instruction", tiny_tokenizer, 128)
    batch = loop.collate(features, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    loss_sum, tokens = loop.token_loss_sum(model, batch)

    expected_sum = torch.zeros(())
    expected_tokens = 0
    for row, feature in zip(rows, features, strict=True):
        prompt, response = data.render_prompt_and_response(row, "instruction", tiny_tokenizer)
        prompt_ids = data.prompt_token_ids(prompt, "instruction", tiny_tokenizer)
        response_ids = [
            *tiny_tokenizer(response, add_special_tokens=False)["input_ids"],
            tiny_tokenizer.eos_token_id,
        ]
        assert feature["input_ids"] == prompt_ids + response_ids
        # Unpadded forward: the response tokens are predicted from the position before each one.
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([feature["input_ids"]])).logits[0], dim=-1)
        for offset, token in enumerate(response_ids):
            expected_sum -= log_probs[len(prompt_ids) + offset - 1, token]
        expected_tokens += len(response_ids)
        assert loop.target_token_count(feature) == len(response_ids)
    assert int(tokens) == expected_tokens
    torch.testing.assert_close(loss_sum, expected_sum, rtol=1e-5, atol=1e-4)


def test_accumulating_two_micro_batches_of_four_equals_one_batch_of_eight(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    features = features_for(tiny_tokenizer, 8)
    targets = sum(loop.target_token_count(feature) for feature in features)
    device = torch.device("cpu")
    pad = tiny_tokenizer.pad_token_id

    def gradients(groups: list[list[ft.Feature]]) -> dict[str, torch.Tensor]:
        model = models.load_causal_lm(str(tiny_model_dir))
        batches = [loop.collate(group, pad, device) for group in groups]
        loop.accumulate_gradients(model, batches, targets)
        return {
            name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None
        }

    whole = gradients([features])
    accumulated = gradients([features[:4], features[4:]])
    assert whole.keys() == accumulated.keys()
    for name, gradient in whole.items():
        torch.testing.assert_close(accumulated[name], gradient, rtol=1e-4, atol=1e-6, msg=name)

    # The same holds through the training loop: batch 8 vs 4 x 2 accumulation give the same weights.
    def trained_weights(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        model = models.load_causal_lm(str(tiny_model_dir))
        settings = Training.model_validate(
            training_spec(maxSteps=2, batchSize=batch_size, gradientAccumulationSteps=accumulation)
        )
        loop.train(model, features, settings, pad_token_id=pad)
        return {name: param.detach().clone() for name, param in model.named_parameters()}

    one_batch = trained_weights(8, 1)
    for name, weight in trained_weights(4, 2).items():
        torch.testing.assert_close(weight, one_batch[name], rtol=1e-4, atol=1e-5, msg=name)


def _learning_rates(scheduler: dict[str, Any], total_steps: int) -> list[float]:
    settings = Training.model_validate(training_spec(learningRate="1.0", scheduler=scheduler))
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = loop.build_optimizer({"p": parameter}, settings)
    schedule = loop.build_scheduler(optimizer, settings, total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(float(schedule.get_last_lr()[0]))
        optimizer.step()
        schedule.step()
    return rates


def test_scheduler_shapes() -> None:
    linear = _learning_rates({"type": "linear", "warmupSteps": 2}, 10)
    assert linear[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert linear[2:] == pytest.approx([1.0 - step / 8 for step in range(8)])

    cosine = _learning_rates({"type": "cosine", "warmupRatio": "0.2"}, 10)
    assert cosine[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert cosine[6] == pytest.approx(0.5)
    assert all(later <= earlier for earlier, later in itertools.pairwise(cosine[2:]))

    assert _learning_rates({"type": "constant"}, 5) == pytest.approx([1.0] * 5)
    assert _learning_rates({"type": "constant", "warmupSteps": 2}, 5) == pytest.approx([0.0, 0.5, 1, 1, 1])
    # warmupSteps wins over warmupRatio.
    both = Training.model_validate(training_spec(scheduler={"warmupRatio": "0.5", "warmupSteps": 1}))
    assert loop.warmup_step_count(both.scheduler, 10) == 1


def test_step_counts_follow_epochs_or_max_steps() -> None:
    by_epochs = Training.model_validate(
        training_spec(maxSteps=None, epochs=3, batchSize=4, gradientAccumulationSteps=2)
    )
    assert loop.steps_per_epoch(17, by_epochs) == 3  # 5 micro-batches -> 3 optimizer steps
    assert loop.total_step_count(17, by_epochs) == 9
    by_steps = Training.model_validate(training_spec(maxSteps=50, epochs=3))
    assert loop.total_step_count(17, by_steps) == 50


def test_micro_batches_are_deterministic_complete_and_length_grouped() -> None:
    lengths = [5, 50, 6, 49, 7, 48, 8, 47] * 4
    plan = loop.plan_micro_batches(lengths, 4, seed=3, epoch=0)
    assert plan == loop.plan_micro_batches(lengths, 4, seed=3, epoch=0)
    assert plan != loop.plan_micro_batches(lengths, 4, seed=3, epoch=1)
    assert sorted(index for batch in plan for index in batch) == list(range(len(lengths)))
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in plan)
    assert padded < 1.2 * sum(lengths)


def test_fp16_without_a_gpu_is_a_config_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    settings = Training.model_validate(training_spec(precision="fp16"))
    with pytest.raises(ConfigError, match=r"training\.precision"):
        loop.check_precision_supported(settings.precision, torch.device("cpu"))


def test_bf16_trains_with_autocast(tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    model = methods.apply_method(
        models.load_causal_lm(str(tiny_model_dir)),
        Method.model_validate({"type": "lora"}),
        tiny_tokenizer,
    )
    settings = Training.model_validate(training_spec(maxSteps=2, precision="bf16"))
    result = loop.train(
        model, features_for(tiny_tokenizer, 4), settings, pad_token_id=tiny_tokenizer.pad_token_id
    )
    assert result.train_loss is not None and math.isfinite(result.train_loss)
    assert all(param.dtype == torch.float32 for param in methods.trainable_parameters(model).values())


def test_a_job_killed_mid_run_resumes_to_the_same_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Dropout and gradient accumulation make sure RNG state and position in the data are restored too.
    method = {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": "0.2"}}
    spec = job_spec(
        tiny_model_dir,
        method,
        maxSteps=None,
        epochs=2,
        batchSize=3,
        gradientAccumulationSteps=2,
        checkpointEverySteps=2,
        keepCheckpoints=2,
        weightDecay="0.1",
        scheduler={"type": "cosine", "warmupSteps": 1},
    )
    uninterrupted = write_train_split(tmp_path / "uninterrupted")
    expected = ft.run_finetune(spec, uninterrupted)
    assert expected["steps"] == 4  # 12 examples / 3 per batch / 2 accumulated, twice

    killed = write_train_split(tmp_path / "killed")
    with pytest.raises(signals.TrainingInterrupted) as interrupted:
        ft.run_finetune(spec, killed, on_step=lambda step: step == 3)
    assert interrupted.value.step == 3
    checkpoints = killed / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step-2", "step-3"]
    assert not (killed / "trained").exists()

    resumed = ft.run_finetune(spec, killed)
    assert resumed["resumedFromStep"] == 3
    assert resumed["steps"] == 4
    assert resumed["trainLoss"] == pytest.approx(expected["trainLoss"], rel=1e-5)
    weights = load_file(str(uninterrupted / "trained" / "adapter_model.safetensors"))
    resumed_weights = load_file(str(killed / "trained" / "adapter_model.safetensors"))
    assert weights.keys() == resumed_weights.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(resumed_weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step-3", "step-4"]

    # Finished already: running the step again reuses trained/.
    assert ft.run_finetune(spec, killed)["cached"] is True


class HardKill(Exception):
    """Stands for SIGKILL: training stops at once, without the checkpoint a graceful stop writes."""


def test_a_restarted_step_reports_the_step_it_resumes_from(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = job_spec(tiny_model_dir, {"type": "lora"}, maxSteps=6, checkpointEverySteps=2)
    workspace = write_train_split(tmp_path)

    def kill_at_step_3(step: int) -> bool:
        if step == 3:
            raise HardKill
        return False

    first = ProgressReporter(workspace, min_interval_s=0)
    first.set_phase("training")
    with pytest.raises(HardKill):
        ft.run_finetune(spec, workspace, progress=first, on_step=kill_at_step_3)
    killed = json.loads((workspace / "progress.json").read_text())
    assert (killed["step"], killed["checkpointStep"], killed["resumedFromStep"]) == (3, 2, None)

    # The restarted step shows where it resumes before it has loaded anything, not the killed step's 3.
    restarted = ProgressReporter(workspace, min_interval_s=0)
    restarted.set_phase("training")
    waiting = json.loads((workspace / "progress.json").read_text())
    assert (waiting["step"], waiting["resumedFromStep"]) == (2, 2)

    written: list[dict[str, Any]] = []

    def record_progress(step: int) -> bool:
        written.append(json.loads((workspace / "progress.json").read_text()))
        return False

    result = ft.run_finetune(spec, workspace, progress=restarted, on_step=record_progress)
    assert result["resumedFromStep"] == 2
    assert [(state["step"], state["resumedFromStep"]) for state in written] == [
        (3, 2),
        (4, 2),
        (5, 2),
        (6, 2),
    ]
    finished = json.loads((workspace / "progress.json").read_text())
    assert (finished["step"], finished["checkpointStep"], finished["resumedFromStep"]) == (6, 6, 2)


def progress_of(workspace: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((workspace / "progress.json").read_text())
    return state


def stopped_while_training(workspace: Path, *, checkpoint: int, reached: int) -> None:
    stopped = ProgressReporter(workspace, min_interval_s=0)
    stopped.set_phase("training")
    stopped.checkpoint_saved(checkpoint)
    stopped.training_update(
        step=reached, total_steps=10, epoch=0.5, train_loss=1.0, learning_rate=1e-3, tokens_seen=99
    )


def test_a_resumed_run_that_redoes_the_steps_before_training_still_says_it_resumes(tmp_path: Path) -> None:
    stopped_while_training(tmp_path, checkpoint=4, reached=5)
    ProgressReporter(tmp_path).set_phase("curating")
    ProgressReporter(tmp_path).set_phase("evaluating-baseline")
    ProgressReporter(tmp_path).set_phase("training")
    assert (progress_of(tmp_path)["step"], progress_of(tmp_path)["resumedFromStep"]) == (4, 4)


def test_training_again_after_it_finished_is_no_resume(tmp_path: Path) -> None:
    stopped_while_training(tmp_path, checkpoint=10, reached=10)
    ProgressReporter(tmp_path).set_phase("evaluating")  # training had finished
    ProgressReporter(tmp_path).set_phase("training")
    assert (progress_of(tmp_path)["step"], progress_of(tmp_path)["resumedFromStep"]) == (10, None)


def test_a_fresh_start_reports_no_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = job_spec(tiny_model_dir, {"type": "lora"}, maxSteps=2, checkpointEverySteps=1)
    workspace = write_train_split(tmp_path)
    progress = ProgressReporter(workspace, min_interval_s=0)
    progress.set_phase("training")
    ft.run_finetune(spec, workspace, progress=progress)
    state = json.loads((workspace / "progress.json").read_text())
    assert (state["step"], state["checkpointStep"], state["resumedFromStep"]) == (2, 2, None)


def test_sigterm_saves_a_checkpoint_and_stops(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = job_spec(tiny_model_dir, {"type": "lora"}, maxSteps=10, checkpointEverySteps=100)
    workspace = write_train_split(tmp_path)
    handler_before = signal.getsignal(signal.SIGTERM)

    def send_sigterm(step: int) -> bool:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return False

    progress = ProgressReporter(workspace)
    with pytest.raises(signals.TrainingInterrupted) as interrupted:
        ft.run_finetune(spec, workspace, on_step=send_sigterm, progress=progress)
    assert interrupted.value.reason == "SIGTERM"
    assert interrupted.value.step in (2, 3)
    assert [path.name for path in (workspace / "checkpoints").iterdir()] == [f"step-{interrupted.value.step}"]
    assert signal.getsignal(signal.SIGTERM) == handler_before
    state = json.loads((workspace / "progress.json").read_text())
    assert state["phase"] == "training" and state["step"] == interrupted.value.step
    assert state["totalSteps"] == 10


def test_incomplete_and_foreign_checkpoints_are_not_resumed(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = job_spec(tiny_model_dir, {"type": "lora"}, maxSteps=3, checkpointEverySteps=1, keepCheckpoints=5)
    workspace = write_train_split(tmp_path)
    checkpoints = workspace / "checkpoints"
    (checkpoints / ".step-9.abc.tmp").mkdir(parents=True)  # a save that was cut short
    (checkpoints / "step-8").mkdir()  # no state.json: incomplete
    (checkpoints / "step-7").mkdir()
    (checkpoints / "step-7" / "state.json").write_text(json.dumps({"step": 7, "fingerprint": "another-job"}))
    assert [checkpoint.step for checkpoint in list_checkpoints(checkpoints)] == [7]

    result = ft.run_finetune(spec, workspace)
    assert result["resumedFromStep"] is None
    assert result["steps"] == 3
    assert [checkpoint.step for checkpoint in list_checkpoints(checkpoints)] == [1, 2, 3, 7]
    assert not (checkpoints / ".step-9.abc.tmp").exists()  # leftovers of a killed save are cleaned up


def test_trained_dir_holds_the_adapter_or_the_full_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    workspace = write_train_split(tmp_path / "lora")
    ft.run_finetune(job_spec(tiny_model_dir, {"type": "lora"}, maxSteps=1), workspace)
    names = {path.name for path in (workspace / "trained").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", ft.TRAINING_RECORD} <= names
    assert "model.safetensors" not in names

    workspace = write_train_split(tmp_path / "full")
    record = ft.run_finetune(job_spec(tiny_model_dir, {"type": "full"}, maxSteps=1), workspace)
    names = {path.name for path in (workspace / "trained").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert record["method"] == "full"
    assert isinstance(ft.load_trained_model(workspace / "trained", str(tiny_model_dir)), torch.nn.Module)


def test_merging_a_prompt_learning_adapter_is_rejected_up_front(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = job_spec(tiny_model_dir, {"type": "prefix-tuning"}, maxSteps=1)
    spec["output"]["mergeAdapter"] = True
    with pytest.raises(ConfigError, match="mergeAdapter"):
        ft.run_finetune(spec, write_train_split(tmp_path))


def test_the_step_takes_its_defaults_from_the_api_model(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step has no defaults of its own: changing the API's default batch size changes what it runs."""
    spec = job_spec(tiny_model_dir, {"type": "lora"}, epochs=1)
    del spec["training"]["maxSteps"], spec["training"]["batchSize"]  # one epoch at the default batch size
    workspace = write_train_split(tmp_path / "default", count=12)
    default_batch_size = Training.model_fields["batch_size"].default
    assert ft.run_finetune(spec, workspace)["totalSteps"] == math.ceil(12 / default_batch_size)

    def rebuild() -> None:
        Training.model_rebuild(force=True)
        FineTuneJobSpec.model_rebuild(force=True)  # it embeds Training's schema

    monkeypatch.setattr(Training.model_fields["batch_size"], "default", 4)
    rebuild()
    try:
        workspace = write_train_split(tmp_path / "patched", count=12)
        assert ft.run_finetune(spec, workspace)["totalSteps"] == 3  # 12 examples in micro-batches of 4
    finally:
        monkeypatch.undo()
        rebuild()
