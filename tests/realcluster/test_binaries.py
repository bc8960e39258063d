"""Where the harness finds the control-plane binaries (no API server needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from realcluster.control_plane import (
    ASSETS_ENV,
    REQUIRED_BINARIES,
    BinariesUnavailable,
    find_binaries,
    unpack_binaries,
)


def _executables(directory: Path, names: tuple[str, ...]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text("#!/bin/sh\n")
        (directory / name).chmod(0o755)
    return directory


def test_kubebuilder_assets_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assets = _executables(tmp_path / "assets", REQUIRED_BINARIES)
    monkeypatch.setenv(ASSETS_ENV, str(assets))
    assert find_binaries(tmp_path / "repo") == assets


def test_kubebuilder_assets_without_a_binary_says_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assets = _executables(tmp_path / "assets", ("etcd", "kubectl"))
    monkeypatch.setenv(ASSETS_ENV, str(assets))
    with pytest.raises(BinariesUnavailable, match=r"has no executable kube-apiserver: .*setup-envtest"):
        find_binaries(tmp_path / "repo")


def test_nothing_to_find_says_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ASSETS_ENV, raising=False)
    with pytest.raises(BinariesUnavailable, match=r"no Kubernetes control-plane binaries: .*setup-envtest"):
        find_binaries(tmp_path / "repo")


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is not installed")
def test_shared_binaries_are_unpacked_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ASSETS_ENV, raising=False)
    packed = tmp_path / "shared" / "k8s" / "bin"
    plain = _executables(tmp_path / "plain", REQUIRED_BINARIES)
    packed.mkdir(parents=True)
    for name in REQUIRED_BINARIES:
        subprocess.run(["zstd", "-q", str(plain / name), "-o", str(packed / f"{name}.zst")], check=True)
    cache = tmp_path / "cache"

    unpacked = find_binaries(tmp_path / "repo", cache_root=cache)
    assert unpacked.parent == cache
    for name in REQUIRED_BINARIES:
        assert os.access(unpacked / name, os.X_OK)
        assert (unpacked / name).read_text() == "#!/bin/sh\n"
    first_unpack = (unpacked / "etcd").stat().st_mtime_ns
    assert unpack_binaries(packed, cache) == unpacked
    assert (unpacked / "etcd").stat().st_mtime_ns == first_unpack  # reused, not unpacked again
    assert [p.name for p in cache.iterdir()] == [unpacked.name]  # no staging directory left behind
