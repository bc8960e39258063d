"""One fine-tune of a benchmark round with the real pipeline steps, from a workspace prepared once.

A round curates (and evaluates the baseline) once in a "prepared" workspace, then tunes several
variants from copies of it: :func:`tune_from` runs the ``finetune`` and ``evaluate-final`` steps in
a fresh copy and returns what they wrote.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from _results import REPO
from kubetune_components.finetune import steps
from kubetune_components.finetune.train import TRAINING_RECORD
from kubetune_contract.workspace import WorkspaceLayout

DEFAULT_BASE = REPO / ".kubetune" / "models" / "tiny-base"


@dataclass(frozen=True)
class TunedRun:
    final: dict[str, Any]  # the final evaluation (WorkspaceLayout.FINAL_EVALUATION)
    training: dict[str, Any]  # the training record beside the trained model
    seconds: float  # finetune + evaluate-final, wall clock


def read_json(workspace: Path, relative: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((workspace / relative).read_text())
    return value


def tune_from(config: dict[str, Any], prepared: Path, workspace: Path) -> TunedRun:
    """Fine-tune and evaluate ``config`` in ``workspace``, a copy of ``prepared`` (curated data, baseline)."""
    shutil.copytree(prepared, workspace)
    started = time.monotonic()
    steps.run_step("finetune", config, str(workspace))
    steps.run_step("evaluate-final", config, str(workspace))
    seconds = round(time.monotonic() - started, 1)
    return TunedRun(
        final=read_json(workspace, WorkspaceLayout.FINAL_EVALUATION),
        training=read_json(workspace, f"{WorkspaceLayout.TRAINED}/{TRAINING_RECORD}"),
        seconds=seconds,
    )


def add_base_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--threads (torch's CPU threads) and --base-model (tiny-base unless given)."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base-model", type=Path, default=DEFAULT_BASE)


def use_base_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop with a usage error when --base-model holds no model; set torch's threads to --threads."""
    if not (args.base_model / "config.json").is_file():
        parser.error(
            f"{args.base_model} holds no model: run `kubetune dev tiny-base --out {args.base_model}`"
        )
    torch.set_num_threads(args.threads)
