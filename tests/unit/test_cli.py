"""The `kubetune` command line: validate, crds, compile, get and delete (no training here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune.cli import main

REPO = Path(__file__).resolve().parents[2]

BAD = """\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: broken}
spec:
  baseModel: {uri: "hf://org/model@main"}
  dataset: {uri: data.jsonl, format: csv}
  training: {learningRate: "fast"}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


def test_validate_names_kind_name_and_field_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yaml").write_text(BAD)
    code, _, err = run(capsys, "validate", "-f", str(tmp_path))
    assert code == 1
    lines = err.splitlines()
    where = f"{tmp_path / 'bad.yaml'}:1: "  # a directory's problems name their file
    assert any(line.startswith(f"{where}FineTuneJob/broken: spec.dataset.format: ") for line in lines), err
    assert any(
        line.startswith(f"{where}FineTuneJob/broken: spec.training.learningRate: ") for line in lines
    ), err


def test_validate_accepts_the_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "validate", "-f", str(REPO / "examples"))
    assert code == 0, err
    assert "valid" in out


def test_crds_prints_what_manifests_hold(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "crds")
    assert code == 0
    printed = [doc for doc in yaml.safe_load_all(out) if doc]
    committed = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "manifests" / "crds").glob("*.yaml"))]
    assert printed == committed
    concatenated = "".join(p.read_text() for p in sorted((REPO / "manifests" / "crds").glob("*.yaml")))
    assert out == concatenated


def test_compile_writes_an_uploadable_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "pipeline.yaml"
    code, _out, err = run(
        capsys,
        "--home",
        str(tmp_path),
        "compile",
        "-f",
        str(REPO / "examples/quickstart/01-finetune.yaml"),
        "-o",
        str(out_file),
    )
    assert code == 0, err
    spec = next(yaml.safe_load_all(out_file.read_text()))
    assert spec["pipelineInfo"]["name"] == "kubetune-finetune-support-router"


def test_compile_refuses_an_invalid_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yaml").write_text(BAD.split("---")[0])
    code, _, err = run(capsys, "compile", "-f", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "o.yaml"))
    assert code == 1
    assert "FineTuneJob/broken: spec.training.learningRate" in err
    assert not (tmp_path / "o.yaml").exists()


def test_get_and_delete_errors_read_like_kubectl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--home", str(tmp_path), "get", "widgets")
    assert code == 2 and "unknown resource 'widgets'" in err
    code, _, err = run(capsys, "--home", str(tmp_path), "get", "ftj")
    assert code == 0 and "No resources found in default namespace." in err
    code, _, err = run(capsys, "--home", str(tmp_path), "delete", "ftj", "nope")
    assert code == 1 and 'FineTuneJob "nope" not found' in err


def test_up_refuses_invalid_resources_before_running_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.yaml").write_text(BAD)
    code, _, err = run(capsys, "--home", str(tmp_path / "home"), "up", "-f", str(tmp_path / "bad.yaml"))
    assert code == 2
    assert "FineTuneJob/broken: spec.dataset.format" in err
    assert not (tmp_path / "home" / "store").exists()
