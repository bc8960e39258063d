import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from kubetune_components.common.cli import run_command_line
from kubetune_components.common.storage import resolve_local_path

EXIT_INTERRUPTED = 143  # as the real finetune step: stopped by SIGTERM after saving its progress


def _write(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def run_step(name: str, config: dict[str, Any], workspace: str, **kwargs: Any) -> dict[str, Any]:
    ws = resolve_local_path(workspace)
    ws.mkdir(parents=True, exist_ok=True)
    with (ws / "starts.log").open("a") as log:
        log.write(f"{name}-{kwargs['fold']}\n" if "fold" in kwargs else f"{name}\n")
    if os.environ.get("FAKE_FAIL_STEP") == name:
        _write(
            ws / "error.json",
            {"step": name, "reason": "QualityGateFailed", "message": "exactMatch 0.1 < 0.5"},
        )
        raise RuntimeError("gate failed")
    if name == "finetune":
        steps = int(os.environ.get("FAKE_STEPS", "5"))
        done = (
            int(json.loads((ws / "progress.json").read_text())["step"])
            if (ws / "progress.json").exists()
            else 0
        )
        # Like the real training loop, SIGTERM stops after the current step, once its progress is saved.
        stop_requested: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.append(signum))
        for step in range(done + 1, steps + 1):
            time.sleep(float(os.environ.get("FAKE_STEP_S", "0.05")))
            _write(
                ws / "progress.json",
                {"phase": "training", "step": step, "totalSteps": steps, "trainLoss": 1 / step},
            )
            if stop_requested:
                print(f"interrupted after step {step}", file=sys.stderr)
                sys.exit(EXIT_INTERRUPTED)
    if name == "evaluate":
        _write(ws / "evaluation" / f"{kwargs['which']}.json", {"evalLoss": 1.0, "exactMatch": 0.5})
    if name == "publish":
        _write(ws / "output.json", {"uri": str(ws / "published"), "version": "v1"})
    return {"step": name}


if __name__ == "__main__":
    sys.exit(run_command_line(run_step, with_evaluate_flags=True))
