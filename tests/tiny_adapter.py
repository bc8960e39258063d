"""A LoRA adapter trained and published in process by the real finetune and publish steps, for tests
that serve one (the runtime then reads the same manifest a FineTuneJob writes).

``publish_lora_adapter(root, base_model, rows, lora=..., training=...)`` lays a FineTuneJob's
workspace out under ``root/workspace`` (the rows are its ``data/train.jsonl``), trains there and
publishes under ``root/store``, as FineTuneJob ``default/router`` (generation 1) would. It returns the
published directory, ``root/store/default/router/v1``.

``ROUTING_ROWS``: a dozen instruction rows (``ROUTING_INSTRUCTION``, a ticket, its team) for tiny runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubetune_components.finetune import publish
from kubetune_components.finetune import train as finetune

ROUTING_INSTRUCTION = "Route the ticket to one team."
ROUTING_ROWS = [
    {"instruction": ROUTING_INSTRUCTION, "input": f"ticket {index} about {team}", "output": team}
    for index, team in enumerate(["billing", "technical", "account", "shipping"] * 3)
]


def publish_lora_adapter(
    root: Path,
    base_model: Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    lora: Mapping[str, Any],
    training: Mapping[str, Any],
    dataset: Path | None = None,
) -> Path:
    """`lora` and `training` are the FineTuneJob's spec.method.lora and spec.training; `dataset` is the
    source the manifest's lineage names (by default the training file itself)."""
    workspace = root / "workspace"
    train_file = workspace / "data" / "train.jsonl"
    train_file.parent.mkdir(parents=True)
    train_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config: dict[str, Any] = {
        "kind": "FineTuneJob",
        "metadata": {"name": "router", "namespace": "default", "uid": "uid-router", "generation": 1},
        "spec": {
            "baseModel": {"uri": str(base_model)},
            "dataset": {"uri": str(dataset or train_file), "format": "instruction"},
            "method": {"type": "lora", "lora": dict(lora)},
            "training": dict(training),
            "evaluation": {"gates": []},
            "output": {"uri": str(root / "store"), "mergeAdapter": False},
        },
    }
    finetune.run_finetune(config["spec"], workspace)
    return Path(publish.run_publish(config, workspace)["uri"])
