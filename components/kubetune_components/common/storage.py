"""Reading and writing the URIs a pipeline step is given.

Local locations (plain paths, `file://`, `pvc://claim/path`) take a fast path through the local
filesystem; everything else (`s3://`, `gs://`, `memory://`, ...) goes through fsspec.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

import fsspec

from kubetune_components.common.errors import ComponentError, ConfigError
from kubetune_contract.workspace import PVC_MOUNT_ROOT, PVC_ROOT_ENV

REMOTE_COMPLETE_MARKER = ".kubetune-complete"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL_SCHEMES = frozenset({"file", "pvc"})
_CHUNK = 1 << 20


def scheme_of(uri: str) -> str:
    """The URI scheme in lower case, or "" for a plain path."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else ""


def is_local(uri: str) -> bool:
    return scheme_of(uri) in _LOCAL_SCHEMES or scheme_of(uri) == ""


def pvc_root() -> Path:
    return Path(os.environ.get(PVC_ROOT_ENV) or PVC_MOUNT_ROOT)


def resolve_local_path(uri: str) -> Path:
    """Map a local URI to a filesystem path; `pvc://claim/p` maps to `$KUBETUNE_PVC_ROOT/claim/p`."""
    if not uri:
        raise ConfigError("empty URI")
    scheme = scheme_of(uri)
    if scheme == "":
        return Path(uri)
    rest = uri[len(scheme) + 3 :]
    if scheme == "file":
        if not rest:
            raise ConfigError(f"{uri}: file:// URI has no path")
        # file:///abs keeps its leading slash; file://rel is relative to the working directory.
        return Path(rest)
    if scheme == "pvc":
        claim, _, sub_path = rest.partition("/")
        if not claim:
            raise ConfigError(f"{uri}: pvc:// URI has no claim name")
        parts = PurePosixPath(sub_path).parts
        if ".." in parts:
            raise ConfigError(f"{uri}: pvc:// paths must not contain '..'")
        return pvc_root().joinpath(claim, *parts)
    raise ConfigError(f"{uri}: scheme {scheme}:// is not a local location (use a path, file:// or pvc://)")


def _remote(uri: str) -> tuple[Any, str]:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as error:
        raise ConfigError(f"{uri}: no filesystem available for this URI ({error})") from error
    return fs, str(path)


def read_bytes(uri: str) -> bytes:
    if is_local(uri):
        return resolve_local_path(uri).read_bytes()
    fs, path = _remote(uri)
    data = fs.cat_file(path)
    assert isinstance(data, bytes)
    return data


@contextlib.contextmanager
def open_text(uri: str, encoding: str = "utf-8") -> Iterator[IO[str]]:
    if is_local(uri):
        with resolve_local_path(uri).open(encoding=encoding) as local_file:
            yield local_file
        return
    fs, path = _remote(uri)
    with fs.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding=encoding) as text:
        yield text


def exists(uri: str) -> bool:
    if is_local(uri):
        return resolve_local_path(uri).exists()
    fs, path = _remote(uri)
    return bool(fs.exists(path))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write so that readers see either the old file or the complete new one, never a partial one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp_file:
            tmp_file.write(text)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _local_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _remote_files(fs: Any, root: str) -> list[str]:
    prefix = root.rstrip("/") + "/"
    return sorted(str(found)[len(prefix) :] for found in fs.find(root) if str(found).startswith(prefix))


def upload_dir(local_dir: str | os.PathLike[str], uri: str) -> None:
    """Copy a local directory tree to `uri`, merging into what is already there."""
    source = Path(local_dir)
    if not source.is_dir():
        raise ComponentError(f"{source}: not a directory")
    if is_local(uri):
        shutil.copytree(source, resolve_local_path(uri), dirs_exist_ok=True)
        return
    fs, root = _remote(uri)
    root = root.rstrip("/")
    for relative in _local_files(source):
        fs.put_file(str(source / relative), f"{root}/{relative}")


def download_dir(uri: str, local_dir: str | os.PathLike[str]) -> Path:
    """Copy the tree at `uri` into `local_dir` (created if missing) and return it."""
    target = Path(local_dir)
    if is_local(uri):
        source = resolve_local_path(uri)
        if not source.is_dir():
            raise ComponentError(f"{uri}: not a directory")
        shutil.copytree(source, target, dirs_exist_ok=True)
        return target
    fs, root = _remote(uri)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise ComponentError(f"{uri}: not a directory")
    target.mkdir(parents=True, exist_ok=True)
    for relative in _remote_files(fs, root):
        if relative == REMOTE_COMPLETE_MARKER:
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{root}/{relative}", str(destination))
    return target


def _sha256_stream(stream: IO[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_of(uri: str) -> str:
    """Hex SHA-256 of the file at `uri`, read in chunks."""
    if is_local(uri):
        with resolve_local_path(uri).open("rb") as local_file:
            return _sha256_stream(local_file)
    fs, path = _remote(uri)
    with fs.open(path, "rb") as remote_file:
        return _sha256_stream(remote_file)


def _tree_digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def local_tree_digest(root: Path) -> str:
    """Digest over the relative paths and contents of every file under `root`."""
    return _tree_digest({rel: sha256_of(str(root / rel)) for rel in _local_files(root)})


def _remote_tree_digest(fs: Any, root: str) -> str:
    files = {}
    for relative in _remote_files(fs, root):
        if relative == REMOTE_COMPLETE_MARKER:
            continue
        with fs.open(f"{root}/{relative}", "rb") as remote_file:
            files[relative] = _sha256_stream(remote_file)
    return _tree_digest(files)


def _output_exists(dest_uri: str) -> ComponentError:
    return ComponentError(
        f"{dest_uri} already exists with different content; refusing to overwrite it",
        reason="OutputExists",
    )


def publish_dir_atomically(src_dir: Path, dest_uri: str) -> str:
    """Publish `src_dir` at `dest_uri` so readers never see a half-written directory.

    Local destinations are staged in a temporary sibling and renamed into place. Object stores
    have no directory rename, so the files are uploaded and a completion marker is written last.
    Publishing identical content again is a no-op; different content raises OutputExists.
    """
    source = Path(src_dir)
    if not source.is_dir():
        raise ComponentError(f"{source}: not a directory")
    source_digest = local_tree_digest(source)
    if is_local(dest_uri):
        destination = resolve_local_path(dest_uri)
        if destination.exists():
            if destination.is_dir() and local_tree_digest(destination) == source_digest:
                return dest_uri
            raise _output_exists(dest_uri)
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
        )
        try:
            shutil.copytree(source, staging, dirs_exist_ok=True)
            try:
                # rename (not replace) fails when a concurrent publisher got there first.
                os.rename(staging, destination)
            except OSError as error:
                if destination.is_dir() and local_tree_digest(destination) == source_digest:
                    return dest_uri
                raise _output_exists(dest_uri) from error
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest_uri
    fs, root = _remote(dest_uri)
    root = root.rstrip("/")
    if fs.exists(root) and _remote_files(fs, root):
        if not fs.exists(f"{root}/{REMOTE_COMPLETE_MARKER}"):
            # Without the marker this is the leftover of an interrupted publish: start over.
            fs.rm(root, recursive=True)
        elif _remote_tree_digest(fs, root) == source_digest:
            return dest_uri
        else:
            raise _output_exists(dest_uri)
    upload_dir(source, dest_uri)
    fs.pipe_file(f"{root}/{REMOTE_COMPLETE_MARKER}", source_digest.encode())
    return dest_uri
