"""Whether ``kubetune up`` can serve a version with ``spec.serving.engine: vllm`` on this machine.

vLLM's engine needs an NVIDIA GPU and the vllm package in the Python that serves the versions; a
machine without them refuses the version (not ready, failed, the message naming the field) instead
of starting a server that cannot run. Asked once per process: neither changes while kubetune up runs.
"""

from __future__ import annotations

import functools
import shutil
import subprocess

ENGINE_FIELD = "spec.serving.engine"
_PROBE_TIMEOUT_S = 30.0


def _gpus() -> list[str]:
    """The GPUs ``nvidia-smi -L`` lists ([] without the tool or a driver)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        listed = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]


def _has_vllm(python: str) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return (
            subprocess.run([python, "-c", probe], capture_output=True, timeout=_PROBE_TIMEOUT_S).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def local_vllm_problem(python: str) -> str | None:
    """Why this machine cannot serve engine vllm with ``python``; None when it can."""
    if not _gpus():
        return (
            f"{ENGINE_FIELD}: vllm needs an NVIDIA GPU and this machine has none (nvidia-smi lists no "
            "GPU); kubetune up serves it only on a GPU machine: use engine transformers and target cpu "
            "here"
        )
    if not _has_vllm(python):
        return (
            f"{ENGINE_FIELD}: vllm is not installed in {python}, which serves the versions; install vllm "
            "there (it brings its own CUDA torch), or use engine transformers"
        )
    return None
