"""QLoRA on a GPU: a prepared check for when a GPU machine is lent (it has not run yet).

    python benchmarks/device/qlora_check.py --out $OUT/qlora

Builds a tiny Llama from a config (no download; bitsandbytes quantizes its Linear layers, so the hidden
size is a multiple of 64), runs the real finetune step with ``method.lora.quantization: {bits: 4, type:
nf4}`` and ``target: gpu`` for a few steps, and checks that

- the base was loaded in 4 bits (bitsandbytes' Linear4bit layers) on the GPU,
- the training loss falls (the mean of the last steps below the first step's),
- the saved adapter reloads onto a freshly quantized base (twice: the same logits) and changes the
  base's logits (the trained adapter takes effect).

Prints one JSON line with the figures and writes it to --out/qlora_check.json; exits 1 if a check fails.
Needs a CUDA GPU and the bitsandbytes package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

STEPS = 12


def rows(count: int) -> list[dict[str, str]]:
    teams = ["billing", "technical", "account", "shipping"]
    return [
        {
            "instruction": "Route the ticket.",
            "input": f"ticket {i} about {teams[i % 4]}",
            "output": teams[i % 4],
        }
        for i in range(count)
    ]


def job(model_dir: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "qlora-check"},
        "spec": {
            "baseModel": {"uri": str(model_dir)},
            "dataset": {"uri": "unused.jsonl", "format": "instruction"},
            "target": "gpu",
            "method": {
                "type": "lora",
                "lora": {"r": 8, "alpha": 16, "quantization": {"bits": 4, "type": "nf4"}},
            },
            "training": {
                "maxSteps": STEPS,
                "batchSize": 4,
                "learningRate": "5e-3",
                "scheduler": {"type": "constant"},
                "precision": "bf16",
                "checkpointEverySteps": 4,
            },
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: this check needs one", file=sys.stderr)
        return 2
    from peft import PeftModel

    from kubetune_components.common import models
    from kubetune_components.dev import tinylm
    from kubetune_components.finetune import loop, qlora
    from kubetune_components.finetune import train as ft
    from kubetune_contract.finetune import FineTuneJob

    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = tinylm.build_random_tiny(args.out / "tiny", seed=0, hidden_size=128, intermediate_size=256)
    workspace = args.out / "workspace"
    (workspace / "data").mkdir(parents=True, exist_ok=True)
    (workspace / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(64)))
    spec = FineTuneJob.model_validate(job(model_dir)).spec
    device = torch.device("cuda", 0)

    quantization = qlora.quantization_of(spec.method)
    assert quantization is not None
    probe = qlora.load_quantized_base(str(model_dir), quantization, device)
    four_bit_layers = sum(1 for m in probe.modules() if type(m).__name__ == "Linear4bit")
    del probe

    recorded: list[float] = []
    original_train = loop.train

    def recording_train(*a: Any, **k: Any) -> loop.TrainResult:
        result = original_train(*a, **{**k, "record_losses": True})
        recorded.extend(result.losses)
        return result

    setattr(ft, "train", recording_train)  # noqa: B010 -- record the losses of the real step
    summary = ft.run_finetune(spec, workspace)

    tokenizer = models.load_tokenizer(str(model_dir))
    batch = tokenizer(["Route the ticket. ticket 3 about account"], return_tensors="pt").to(device)
    base = qlora.load_quantized_base(str(model_dir), quantization, device)
    reloaded = PeftModel.from_pretrained(base, str(workspace / "trained")).eval()
    again = PeftModel.from_pretrained(
        qlora.load_quantized_base(str(model_dir), quantization, device), str(workspace / "trained")
    ).eval()
    with torch.no_grad():
        first = reloaded(**batch).logits.float()
        second = again(**batch).logits.float()
        with reloaded.disable_adapter():
            plain = reloaded(**batch).logits.float()
    tail = recorded[-4:]
    figures = {
        "gpu": torch.cuda.get_device_name(0),
        "linear4bitLayers": four_bit_layers,
        "steps": summary["steps"],
        "firstLoss": recorded[0] if recorded else None,
        "lastLossesMean": sum(tail) / len(tail) if tail else None,
        "reloadMaxLogitDifference": float((first - second).abs().max()),
        "adapterMaxLogitEffect": float((first - plain).abs().max()),
    }
    checks = {
        "loaded in 4 bits": four_bit_layers > 0,
        "loss falls": bool(recorded) and figures["lastLossesMean"] < recorded[0],
        "adapter reloads deterministically": figures["reloadMaxLogitDifference"] < 1e-3,
        "adapter changes the output": figures["adapterMaxLogitEffect"] > 1e-3,
    }
    figures["checks"] = checks
    line = json.dumps(figures, sort_keys=True)
    print(line)
    (args.out / "qlora_check.json").write_text(line + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
