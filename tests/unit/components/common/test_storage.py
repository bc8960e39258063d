from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from kubetune_components.common import storage
from kubetune_components.common.errors import ComponentError, ConfigError


@pytest.fixture
def memory_root() -> Iterator[str]:
    root = f"memory://kubetune-test-{uuid.uuid4().hex}"
    yield root
    filesystem = fsspec.filesystem("memory")
    path = root.removeprefix("memory://")
    if filesystem.exists(path):
        filesystem.rm(path, recursive=True)


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/data/train.jsonl", Path("/data/train.jsonl")),
        ("relative/train.jsonl", Path("relative/train.jsonl")),
        ("file:///data/train.jsonl", Path("/data/train.jsonl")),
        ("file://relative/train.jsonl", Path("relative/train.jsonl")),
    ],
)
def test_resolve_local_path_for_paths_and_file_uris(uri: str, expected: Path) -> None:
    assert storage.resolve_local_path(uri) == expected


def test_pvc_uris_map_under_the_pvc_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(storage.PVC_ROOT_ENV, raising=False)
    assert storage.resolve_local_path("pvc://datasets/a/b.jsonl") == Path("/mnt/pvc/datasets/a/b.jsonl")
    monkeypatch.setenv(storage.PVC_ROOT_ENV, str(tmp_path))
    assert storage.resolve_local_path("pvc://datasets/a/b.jsonl") == tmp_path / "datasets/a/b.jsonl"
    assert storage.resolve_local_path("pvc://datasets") == tmp_path / "datasets"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://bucket/key", "s3://bucket/key: scheme s3:// is not a local location"),
        ("pvc:///no-claim", "pvc:///no-claim: pvc:// URI has no claim name"),
        ("pvc://claim/../other/x", "pvc://claim/../other/x: pvc:// paths must not contain '..'"),
        ("file://", "file://: file:// URI has no path"),
        ("", "empty URI"),
    ],
)
def test_resolve_local_path_rejects(uri: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        storage.resolve_local_path(uri)
    assert caught.value.message.startswith(message)
    assert caught.value.reason == "InvalidConfig"


def test_read_open_exists_local(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    uri = f"file://{path}"
    assert storage.exists(uri)
    assert not storage.exists(str(tmp_path / "missing"))
    assert storage.read_bytes(uri) == "héllo\nworld\n".encode()
    with storage.open_text(str(path)) as text:
        assert text.readlines() == ["héllo\n", "world\n"]


def test_read_open_exists_through_fsspec(memory_root: str) -> None:
    uri = f"{memory_root}/f.txt"
    assert not storage.exists(uri)
    with fsspec.open(uri, "wb") as handle:
        handle.write("héllo\n".encode())
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == "héllo\n".encode()
    with storage.open_text(uri) as text:
        assert text.read() == "héllo\n"
    assert storage.sha256_of(uri) == hashlib.sha256("héllo\n".encode()).hexdigest()


def test_unknown_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no filesystem available"):
        storage.read_bytes("nosuchscheme://x/y")


def test_atomic_write_json_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    storage.atomic_write_json(target, {"b": 1, "a": [1, 2]})
    storage.atomic_write_json(target, {"c": "ü"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"c": "ü"}
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_atomic_write_text_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    storage.atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        storage.atomic_write_json(target, {"not serialisable": object()})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_sha256_of_local_file(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3_000_000)
    assert storage.sha256_of(str(path)) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_upload_and_download_dir_local(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src", {"a.txt": "a", "nested/b.txt": "b"})
    storage.upload_dir(source, f"file://{tmp_path}/dest")
    assert (tmp_path / "dest/nested/b.txt").read_text() == "b"
    fetched = storage.download_dir(str(tmp_path / "dest"), tmp_path / "copy")
    assert (fetched / "a.txt").read_text() == "a"
    assert (fetched / "nested/b.txt").read_text() == "b"


def test_upload_and_download_dir_through_fsspec(tmp_path: Path, memory_root: str) -> None:
    source = make_tree(tmp_path / "src", {"a.txt": "a", "nested/b.txt": "b"})
    storage.upload_dir(source, f"{memory_root}/model")
    assert storage.read_bytes(f"{memory_root}/model/nested/b.txt") == b"b"
    fetched = storage.download_dir(f"{memory_root}/model", tmp_path / "copy")
    assert sorted(p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()) == [
        "a.txt",
        "nested/b.txt",
    ]


def test_download_dir_of_a_missing_directory(tmp_path: Path, memory_root: str) -> None:
    with pytest.raises(ComponentError, match="not a directory"):
        storage.download_dir(str(tmp_path / "missing"), tmp_path / "copy")
    with pytest.raises(ComponentError, match="not a directory"):
        storage.download_dir(f"{memory_root}/missing", tmp_path / "copy")


def test_publish_dir_atomically_local(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src", {"model.bin": "weights", "meta/info.json": "{}"})
    destination = tmp_path / "store" / "models" / "m1"
    assert storage.publish_dir_atomically(source, str(destination)) == str(destination)
    assert (destination / "meta/info.json").read_text() == "{}"
    assert [p.name for p in destination.parent.iterdir()] == ["m1"]

    # Publishing the same content again (a retried step) is a no-op.
    storage.publish_dir_atomically(source, f"file://{destination}")

    (source / "model.bin").write_text("other weights")
    with pytest.raises(ComponentError) as caught:
        storage.publish_dir_atomically(source, str(destination))
    assert caught.value.reason == "OutputExists"
    assert "already exists with different content" in caught.value.message
    assert (destination / "model.bin").read_text() == "weights"
    assert [p.name for p in destination.parent.iterdir()] == ["m1"]


def test_publish_dir_atomically_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    source = make_tree(tmp_path / "src", {"a": "a"})
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ComponentError) as caught:
        storage.publish_dir_atomically(source, str(tmp_path / "taken"))
    assert caught.value.reason == "OutputExists"


def test_publish_dir_atomically_through_fsspec(tmp_path: Path, memory_root: str) -> None:
    source = make_tree(tmp_path / "src", {"model.bin": "weights", "meta/info.json": "{}"})
    destination = f"{memory_root}/models/m1"
    storage.publish_dir_atomically(source, destination)
    assert storage.exists(f"{destination}/{storage.REMOTE_COMPLETE_MARKER}")
    assert storage.read_bytes(f"{destination}/model.bin") == b"weights"
    storage.publish_dir_atomically(source, destination)

    (source / "model.bin").write_text("other")
    with pytest.raises(ComponentError) as caught:
        storage.publish_dir_atomically(source, destination)
    assert caught.value.reason == "OutputExists"


def test_publish_through_fsspec_replaces_an_interrupted_publish(tmp_path: Path, memory_root: str) -> None:
    destination = f"{memory_root}/models/m1"
    with fsspec.open(f"{destination}/half-written.bin", "wb") as handle:
        handle.write(b"partial")
    source = make_tree(tmp_path / "src", {"model.bin": "weights"})
    storage.publish_dir_atomically(source, destination)
    assert not storage.exists(f"{destination}/half-written.bin")
    assert storage.read_bytes(f"{destination}/model.bin") == b"weights"
