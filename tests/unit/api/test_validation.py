"""Offline validation: exact messages with field paths, files and directories, parse_resource."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from kubetune.api.registry import all_definitions
from kubetune.api.validation import (
    ManifestError,
    ResourceInvalid,
    ValidationIssue,
    format_issues,
    parse_resource,
    read_manifests,
    validate_documents,
    validate_paths,
)
from kubetune_contract.finetune import FineTuneJob, LoraOptions


def quickstart() -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo"},
        "spec": {
            "baseModel": {"uri": "hf://sshleifer/tiny-gpt2@main"},
            "dataset": {"uri": "file:///data/train.jsonl"},
            "training": {"epochs": 1, "learningRate": "3e-4"},
            "evaluation": {"gates": [{"metric": "evalLoss", "max": "4.0"}]},
        },
    }


def edit(path: str, value: Any, doc: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = copy.deepcopy(doc or quickstart())
    *parents, leaf = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[leaf] = value
    return doc


def messages(doc: dict[str, Any]) -> list[str]:
    return [str(issue) for issue in validate_documents([doc])]


def test_valid_document_has_no_issues() -> None:
    result = validate_documents([quickstart()])
    assert result == [] and result.ok
    assert (result.resources, result.invalid, result.skipped) == (1, 0, 0)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            "spec.training.learningRate",
            "fast",
            'spec.training.learningRate: must be a decimal number as a string, e.g. "3e-4" (got "fast")',
        ),
        (
            "spec.training.learningRate",
            0.0003,
            'spec.training.learningRate: must be a decimal number as a string, e.g. "3e-4" '
            "(got the number 0.0003; put it in quotes)",
        ),
        (
            "spec.method.type",
            "qlora",
            "spec.method.type: must be one of: lora, prefix-tuning, prompt-tuning, ia3, full, distillation, "
            'dpo, kto (got "qlora")',
        ),
        (
            "spec.training.learningrate",
            "1e-3",
            "spec.training.learningrate: unknown field (did you mean learningRate?)",
        ),
        ("spec.training.colour", "red", "spec.training.colour: unknown field"),
        (
            "spec.evaluation.gates",
            [{"metric": "evalLoss", "max": "4"}, {"metric": "perplexity"}],
            "spec.evaluation.gates[1]: a gate needs min, max or minImprovement",
        ),
        (
            "spec.evaluation.gates",
            [{"metric": "evalLoss"}, {"metric": "perplexity", "max": "20"}],
            "spec.evaluation.gates[0]: a gate needs min, max or minImprovement",
        ),
        (
            "spec.method",
            {"type": "lora", "prefixTuning": {"numVirtualTokens": 8}},
            "spec.method: prefixTuning is set but type is 'lora'; only lora may be set",
        ),
        (
            "spec.dataset.curation",
            {"minTokens": 64, "maxTokens": 32},
            "spec.dataset.curation: minTokens must not exceed maxTokens",
        ),
        (
            "spec.dataset.validationSplit",
            "1.5",
            "spec.dataset.validationSplit: "
            'must be a ratio between 0 and 1 as a string, e.g. "0.1" (got "1.5")',
        ),
        ("spec.training.batchSize", "8", 'spec.training.batchSize: must be an integer (got "8")'),
        ("spec.training.epochs", 0, "spec.training.epochs: must be at least 1 (got the number 0)"),
        ("spec.method.lora", {"r": 2048}, "spec.method.lora.r: must be at most 1024 (got the number 2048)"),
        ("spec.dataset.uri", "", "spec.dataset.uri: must not be empty"),
        (
            "spec.evaluation.gates",
            {"metric": "evalLoss"},
            "spec.evaluation.gates: must be a list (got an object)",
        ),
        ("spec.training", "fast", 'spec.training: must be an object (got "fast")'),
        ("spec.output.mergeAdapter", "yes", 'spec.output.mergeAdapter: must be true or false (got "yes")'),
        (
            "spec.baseModel.uri",
            "hf://org/model@v1@v2",
            "spec.baseModel.uri: must be a model URI: hf://org/name@revision, file:///path, pvc://claim/path "
            'or a plain path (got "hf://org/model@v1@v2")',
        ),
    ],
)
def test_messages(path: str, value: Any, expected: str) -> None:
    assert messages(edit(path, value)) == [f"FineTuneJob/demo: {expected}"]


def test_several_issues_in_field_order() -> None:
    doc = edit("spec.training.learningRate", "fast")
    doc = edit("spec.method.type", "qlora", doc)
    del doc["spec"]["dataset"]
    assert messages(doc) == [
        "FineTuneJob/demo: spec.dataset: required field is missing",
        "FineTuneJob/demo: spec.method.type: "
        'must be one of: lora, prefix-tuning, prompt-tuning, ia3, full, distillation, dpo, kto (got "qlora")',
        "FineTuneJob/demo: spec.training.learningRate: "
        'must be a decimal number as a string, e.g. "3e-4" (got "fast")',
    ]


def test_metadata_and_kind() -> None:
    doc = quickstart()
    del doc["metadata"]
    assert messages(doc) == ["FineTuneJob/<unnamed>: metadata.name: required field is missing"]
    assert messages(edit("metadata", {"namespace": "x"})) == [
        "FineTuneJob/<unnamed>: metadata.name: required field is missing"
    ]
    assert messages(edit("metadata.name", "a" * 64)) == [
        f"FineTuneJob/{'a' * 64}: metadata.name: must be at most 63 characters long (got 64)"
    ]
    assert messages(edit("metadata.name", "Tiny_SQL")) == [
        "FineTuneJob/Tiny_SQL: metadata.name: must be lower case letters, digits, '-' or '.', "
        "and start and end with a letter or digit"
    ]
    known = ", ".join(d.kind for d in all_definitions())  # FineTuneJob, QuantizeJob, ...
    assert messages(edit("kind", "TrainJob")) == [
        f'TrainJob/demo: kind: unknown kind "TrainJob" in kubetune.dev; known kinds: {known}'
    ]
    assert messages(edit("kind", "finetunejob")) == [
        'finetunejob/demo: kind: unknown kind "finetunejob" in kubetune.dev (did you mean FineTuneJob?); '
        f"known kinds: {known}"
    ]
    assert messages(edit("apiVersion", "kubetune.dev/v1")) == [
        'FineTuneJob/demo: apiVersion: unsupported version "kubetune.dev/v1"; use kubetune.dev/v1alpha1'
    ]


def test_other_groups_are_skipped_and_counted() -> None:
    docs: list[Any] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}},
        {"apiVersion": "kubeflow.org/v1", "kind": "FineTuneJob"},  # another group's kind of the same name
        None,
        quickstart(),
        edit("spec.training.learningRate", "fast"),
        {"apiVersion": "v1", "kind": "List", "items": [quickstart(), {"apiVersion": "v1", "kind": "Secret"}]},
    ]
    result = validate_documents(docs)
    assert (result.resources, result.invalid, result.skipped) == (3, 1, 3)
    assert len(result) == 1
    assert result.summary() == "3 kubetune resources checked, 1 invalid, 3 other documents skipped"


def test_issue_str_and_format() -> None:
    issue = ValidationIssue("FineTuneJob", "demo", "spec.training.learningRate", "bad", source="jobs.yaml:3")
    assert str(issue) == "FineTuneJob/demo: spec.training.learningRate: bad"
    assert issue.detail == "spec.training.learningRate: bad"
    assert format_issues([issue]) == "jobs.yaml:3: FineTuneJob/demo: spec.training.learningRate: bad"
    assert format_issues([issue, issue], sources=False) == "\n".join([str(issue)] * 2)


def test_parse_resource() -> None:
    job = parse_resource(quickstart(), FineTuneJob)
    assert isinstance(job, FineTuneJob)
    assert isinstance(job.spec.method.options(), LoraOptions)  # own block filled with defaults
    assert job.spec.training.epochs == 1
    # kopf bodies are mappings, not dicts
    frozen = MappingProxyType({**quickstart(), "metadata": MappingProxyType({"name": "demo", "uid": "u"})})
    assert parse_resource(frozen).metadata.uid == "u"  # type: ignore[attr-defined]


def test_parse_resource_raises_with_every_issue() -> None:
    doc = edit("spec.training.learningRate", "fast")
    doc = edit("spec.dataset.curation", {"minTokens": 9, "maxTokens": 3}, doc)
    with pytest.raises(ResourceInvalid) as caught:
        parse_resource(doc)
    exc = caught.value
    assert [i.path for i in exc.issues] == ["spec.dataset.curation", "spec.training.learningRate"]
    assert exc.condition_message == (
        "spec.dataset.curation: minTokens must not exceed maxTokens; "
        'spec.training.learningRate: must be a decimal number as a string, e.g. "3e-4" (got "fast")'
    )
    assert str(exc).startswith(
        "FineTuneJob/demo: spec.dataset.curation: minTokens must not exceed maxTokens; "
    )
    with pytest.raises(ResourceInvalid, match=r'"v1" is not a kubetune\.dev API version'):
        parse_resource({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})


GOOD_YAML = """\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: demo
spec:
  baseModel:
    uri: hf://sshleifer/tiny-gpt2@main
  dataset:
    uri: file:///data/train.jsonl
  training:
    learningRate: "3e-4"
"""


def test_validate_paths(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "all.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n---\n"
        + GOOD_YAML
        + "---\n"
        + GOOD_YAML.replace('learningRate: "3e-4"', "learningRate: 3e-4").replace(
            "name: demo", "name: unquoted"
        )  # unquoted: kubectl reads a number
        + "---\n"
    )
    (tmp_path / "jobs" / "job.json").write_text(
        json.dumps(edit("metadata.name", "in-json", edit("spec.method.type", "qlora")))
    )
    (tmp_path / "jobs" / "broken.yml").write_text("kind: [unclosed\n")
    (tmp_path / "jobs" / "notes.txt").write_text("not a manifest")
    (tmp_path / "jobs" / ".hidden").mkdir()
    (tmp_path / "jobs" / ".hidden" / "x.yaml").write_text("kind: [unclosed\n")
    result = validate_paths([tmp_path / "jobs", tmp_path / "missing.yaml"])
    lines = format_issues(result).replace(str(tmp_path) + "/", "").splitlines()
    assert lines == [
        "jobs/all.yaml:18: FineTuneJob/unquoted: spec.training.learningRate: "
        'must be a decimal number as a string, e.g. "3e-4" (got the number 0.0003; put it in quotes)',
        "jobs/broken.yml: invalid YAML: expected ',' or ']', but got '<stream end>' (line 2, column 1)",
        "jobs/job.json: FineTuneJob/in-json: spec.method.type: "
        'must be one of: lora, prefix-tuning, prompt-tuning, ia3, full, distillation, dpo, kto (got "qlora")',
        "missing.yaml: no such file or directory",
    ]
    assert (result.files, result.resources, result.invalid, result.skipped) == (3, 3, 2, 1)
    assert validate_paths(tmp_path / "jobs" / "notes.txt")[0].message == "document is not a mapping"


def test_read_manifests(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD_YAML + "---\n---\napiVersion: v1\nkind: List\nitems:\n- kind: X\n")
    (tmp_path / "b.json").write_text(json.dumps([quickstart()]))
    docs = read_manifests(tmp_path)
    assert [d["kind"] for d in docs] == ["FineTuneJob", "X", "FineTuneJob"]
    assert docs[0]["spec"]["training"]["learningRate"] == "3e-4"
    (tmp_path / "c.yaml").write_text("kind: [\n")
    with pytest.raises(ValueError, match=r"c\.yaml: invalid YAML"):
        read_manifests([tmp_path / "c.yaml"])


def test_a_path_without_kubetune_resources_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "other.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    (tmp_path / "empty-dir").mkdir()
    result = validate_paths([tmp_path / "empty.yaml", tmp_path / "other.yaml", tmp_path / "empty-dir"])
    assert [str(issue) for issue in result] == [
        f"{tmp_path / 'empty.yaml'}: no kubetune resource found",
        f"{tmp_path / 'other.yaml'}: no kubetune resource found",
        f"{tmp_path / 'empty-dir'}: no kubetune resource found",
    ]
    # a file named twice (or inside a directory also named) is read once, so it is no duplicate
    (tmp_path / "job.yaml").write_text(GOOD_YAML)
    assert validate_paths([tmp_path / "job.yaml", tmp_path / "job.yaml"]) == []


def test_a_resource_defined_twice_is_refused_naming_both_places(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD_YAML)
    (tmp_path / "b.yaml").write_text("---\n" + GOOD_YAML)
    (tmp_path / "c.yaml").write_text(GOOD_YAML.replace("name: demo", "name: demo\n  namespace: team-b"))
    lines = format_issues(validate_paths(tmp_path)).splitlines()
    assert lines == [
        f"{tmp_path / 'b.yaml'}:2: FineTuneJob/demo: metadata.name: FineTuneJob default/demo is also "
        f"defined at {tmp_path / 'a.yaml'}:1; define each resource once"
    ]


def test_files_that_are_not_manifests_are_named_with_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (tmp_path / "bad.json").write_text('{"kind": ')
    lines = [str(issue) for issue in validate_paths([tmp_path / "model.bin", tmp_path / "bad.json"])]
    assert lines == [
        f"{tmp_path / 'model.bin'}: not a UTF-8 text file (byte 0x89 at offset 0)",
        f"{tmp_path / 'bad.json'}: invalid JSON: Expecting value (line 1)",
    ]
    with pytest.raises(ManifestError, match=r"model\.bin: not a UTF-8 text file"):
        read_manifests(tmp_path / "model.bin")
