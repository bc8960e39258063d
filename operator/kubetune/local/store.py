"""The local object store behind `kubetune up/get/delete`: one JSON file per object.

It keeps what the API server would: uid, generation, creationTimestamp, and status apart from spec.
Writes are atomic (temp file + rename), so an interrupted `kubetune up` never leaves a torn object.
Every write (apply, status update, delete) holds an exclusive lock on ``<store>/.lock`` for the whole
read-modify-write, so writers in other processes (a second `kubetune up -f`, `kubetune delete`) or
threads neither lose each other's changes nor bring a deleted object back.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.common.clock import utc_now


class ApplyError(Exception):
    """An apply the API server would refuse (e.g. changing an immutable spec)."""


class DamagedEntry(Exception):
    """A store file that does not hold a stored object (not JSON, or no ``metadata.name``).

    ``str()`` names the file and the command that removes it.
    """

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        plural, namespace, name = path.parent.parent.name, path.parent.name, path.stem
        super().__init__(
            f"{path}: damaged store entry ({problem}); remove it with "
            f"`kubetune delete {plural} {name} -n {namespace}`"
        )


@dataclass(frozen=True)
class ApplyResult:
    obj: dict[str, Any]
    action: str  # created | configured | unchanged


class LocalStore:
    def __init__(self, home: Path) -> None:
        self.root = home / "store"

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the store's write lock. flock locks an open file, so this also excludes other threads here."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _path(self, plural: str, namespace: str, name: str) -> Path:
        return self.root / plural / namespace / f"{name}.json"

    def _write(self, plural: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        path = self._path(plural, meta["namespace"], meta["name"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
        os.replace(tmp, path)

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        """The object stored at `path`; raises :class:`DamagedEntry` when the file holds none."""
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise DamagedEntry(path, "not UTF-8 text") from exc
        except json.JSONDecodeError as exc:
            raise DamagedEntry(path, f"invalid JSON: {exc.msg} at line {exc.lineno}") from exc
        metadata = value.get("metadata") if isinstance(value, dict) else None
        if (
            not isinstance(value, dict)
            or not isinstance(metadata, dict)
            or not isinstance(metadata.get("name"), str)
        ):
            raise DamagedEntry(path, "not an object with metadata.name")
        return value

    def get(self, plural: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        """The stored object, None when there is none; raises :class:`DamagedEntry` for a damaged file."""
        try:
            return self._read(self._path(plural, namespace, name))
        except FileNotFoundError:
            return None

    def finetune_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored FineTuneJob a QuantizeJob names (the job reconcilers' lookup)."""
        return self.get("finetunejobs", name, namespace)

    def list_objects(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        base = self.root / plural
        pattern = f"{namespace}/*.json" if namespace else "*/*.json"
        objects = []
        for path in sorted(base.glob(pattern)):
            try:
                objects.append(self._read(path))
            except FileNotFoundError:
                continue  # deleted since the glob
        objects.sort(key=lambda o: (o["metadata"].get("creationTimestamp", ""), o["metadata"]["name"]))
        return objects

    def all(self, plurals: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        for plural in plurals:
            for obj in self.list_objects(plural):
                yield plural, obj

    def apply(self, plural: str, manifest: dict[str, Any], *, immutable_spec: bool) -> ApplyResult:
        with self._writing():
            meta = dict(manifest.get("metadata") or {})
            namespace = meta.get("namespace") or "default"
            name = meta["name"]
            existing = self.get(plural, name, namespace)
            spec = manifest.get("spec") or {}
            if existing is None:
                obj = {
                    "apiVersion": manifest["apiVersion"],
                    "kind": manifest["kind"],
                    "metadata": {
                        **{k: v for k, v in meta.items() if k in ("labels", "annotations")},
                        "name": name,
                        "namespace": namespace,
                        "uid": str(uuid.uuid4()),
                        "generation": 1,
                        "creationTimestamp": utc_now(),
                    },
                    "spec": spec,
                }
                self._write(plural, obj)
                return ApplyResult(obj, "created")
            if existing.get("spec") == spec:
                return ApplyResult(existing, "unchanged")
            if immutable_spec:
                raise ApplyError(
                    f"{manifest['kind']}/{name}: spec: spec is immutable; "
                    f"delete it first (kubetune delete {manifest['kind'].lower()} {name})"
                )
            existing["spec"] = spec
            existing["metadata"]["generation"] = int(existing["metadata"].get("generation", 1)) + 1
            self._write(plural, existing)
            return ApplyResult(existing, "configured")

    def update_status(self, plural: str, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        with self._writing():
            current = self.get(plural, meta["name"], meta["namespace"])
            if current is None:
                raise KeyError(f"{obj['kind']}/{meta['name']} was deleted")
            current["status"] = status
            self._write(plural, current)
        return current

    def delete(self, plural: str, name: str, namespace: str = "default") -> bool:
        with self._writing():
            try:
                self._path(plural, namespace, name).unlink()
            except FileNotFoundError:
                return False
        return True
