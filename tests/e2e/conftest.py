"""End-to-end fixtures: a scratch project directory laid out like the repo, with the tiny base built.

The tiny pretrained base takes about a minute to build, so it is built once per session and copied
into each project directory (`kubetune dev tiny-base` is what the quickstart runs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KUBETUNE = [sys.executable, "-m", "kubetune"]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # KUBETUNE_TINY_BASE_DIR (set by `make test`) shares one idempotent build with the unit tests
    # and the quickstart; otherwise build into this session's temp dir.
    configured = os.environ.get("KUBETUNE_TINY_BASE_DIR")
    out = Path(configured) if configured else tmp_path_factory.mktemp("models") / "tiny-base"
    subprocess.run([*KUBETUNE, "dev", "tiny-base", "--out", str(out)], check=True, cwd=REPO, timeout=600)
    return out


@pytest.fixture
def project(tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory like the repo root: examples/ and .kubetune/models/tiny-base."""
    (tmp_path / "examples").symlink_to(REPO / "examples")
    models = tmp_path / ".kubetune" / "models"
    models.mkdir(parents=True)
    shutil.copytree(tiny_base, models / "tiny-base")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / ".kubetune"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield tmp_path


class KubetuneCli:
    """Runs the `kubetune` command in the current directory and environment."""

    def __call__(
        self, *args: str, timeout: float = 900, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*KUBETUNE, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubetune {' '.join(args)} exited {result.returncode}\n"
                f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
            )
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*KUBETUNE, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ),
        )


@pytest.fixture
def kubetune(project: Path) -> KubetuneCli:
    return KubetuneCli()
