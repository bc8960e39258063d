import json
import os
import sys
from pathlib import Path
from typing import Any

from kubetune_components.common.cli import run_command_line
from kubetune_components.common.storage import resolve_local_path


def _write(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def run_quantize_step(name: str, config: dict[str, Any], workspace: str) -> dict[str, Any]:
    ws = resolve_local_path(workspace)
    ws.mkdir(parents=True, exist_ok=True)
    with (ws / "starts.log").open("a") as log:
        log.write(f"{name} {config['spec']['model']['uri']}\n")
    if name == "measure-source":
        _write(
            ws / "report" / "before.json",
            {"sizeBytes": 4000, "latencySecondsPerToken": 0.01, "perplexity": 2.0},
        )
    if name == "measure-quantized":
        _write(
            ws / "report" / "after.json",
            {"sizeBytes": 1000, "latencySecondsPerToken": 0.01, "perplexity": 2.02},
        )
    if name == "publish-quantized":
        _write(ws / "output.json", {"uri": str(ws / "published"), "version": "v1"})
    return {"step": name}


if __name__ == "__main__":
    sys.exit(run_command_line(run_quantize_step))
