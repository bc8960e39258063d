"""The detached process that carries out one attempt of one local run with kfp's local runner.

Usage: python -m kubetune.backends.local_worker RUN_DIR ATTEMPT
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

from kubetune.backends.local import REQUEST_FILE, STATE_FILE
from kubetune.common.clock import utc_now
from kubetune.common.files import read_json, write_json_atomically


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def _wait_for_own_state(run_dir: Path, timeout_s: float = 30.0) -> dict[str, Any]:
    """The launcher writes state.json with our pid right after spawning us; wait for it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = read_json(run_dir / STATE_FILE)
        if state is not None and state.get("pid") == os.getpid():
            return state
        time.sleep(0.05)
    raise RuntimeError(f"{run_dir / STATE_FILE} never named this worker (pid {os.getpid()})")


def failure_message(workspace: Path, exc: BaseException) -> tuple[str, str]:
    error = read_json(workspace / "error.json")
    if error is not None:
        return str(error.get("reason", "PipelineFailed")), str(error.get("message", ""))
    return "PipelineFailed", f"{type(exc).__name__}: {exc}"


def run(run_dir: Path, attempt: int) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    state = _wait_for_own_state(run_dir)
    request = read_json(run_dir / REQUEST_FILE)
    if request is None:
        raise RuntimeError(f"{run_dir / REQUEST_FILE} is missing")
    workspace = Path(request["workspace"])
    workspace.mkdir(parents=True, exist_ok=True)
    # A stale error from an earlier attempt must not explain this one.
    (workspace / "error.json").unlink(missing_ok=True)
    state.update(phase="Running", attempt=attempt, startedAt=utc_now())
    write_json_atomically(run_dir / STATE_FILE, state)
    try:
        warnings.simplefilter("ignore")
        logging.getLogger("kfp").setLevel(logging.WARNING)
        from kfp import local

        from kubetune.pipelines.registry import build_pipeline, options_from_dict, pipeline_arguments

        local.init(
            runner=local.SubprocessRunner(use_venv=False),
            pipeline_root=str(run_dir / "pipeline-root"),
            raise_on_error=True,
        )
        pipeline = build_pipeline(request["kind"], options_from_dict(request.get("pipeline_options", {})))
        pipeline(**pipeline_arguments(request["kind"], request["config"], str(workspace)))
    except _Terminated:
        state.update(phase="Interrupted", message="the worker was terminated", finishedAt=utc_now())
        write_json_atomically(run_dir / STATE_FILE, state)
        return 143
    except Exception as exc:  # the run failed: record why, for the resource's status
        reason, message = failure_message(workspace, exc)
        state.update(phase="Failed", reason=reason, message=message, finishedAt=utc_now())
        write_json_atomically(run_dir / STATE_FILE, state)
        print(f"run failed: {reason}: {message}", file=sys.stderr)
        return 1
    state.update(phase="Succeeded", message="", finishedAt=utc_now())
    write_json_atomically(run_dir / STATE_FILE, state)
    return 0


def main() -> None:
    sys.exit(run(Path(sys.argv[1]), int(sys.argv[2])))


if __name__ == "__main__":
    main()
