"""Published artifacts: where a version goes, its lineage manifest, and the atomic publish itself.

Every publish step (fine-tune and quantize) exports into a staging directory of the workspace, writes
`kubetune-manifest.json` (where the model came from: source, data, method, metrics, gates, file digests,
library versions) and the model card generated from it (MODEL_CARD.md, model-card.json) next to the
files, and moves the whole directory to `{spec.output.uri}/{namespace}/{name}/v{generation}/` in one step.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kubetune_components import __version__ as components_version
from kubetune_components.common import storage
from kubetune_components.common.errors import ComponentError, ConfigError
from kubetune_components.common.model_card import write_model_card
from kubetune_contract.common import ObjectMeta
from kubetune_contract.workspace import MODEL_CARD_FILE, MODEL_CARD_JSON_FILE, WorkspaceLayout

MANIFEST_FILE = "kubetune-manifest.json"
MANIFEST_SCHEMA = "kubetune.dev/manifest/v1"


def destination_uri(metadata: ObjectMeta, output_uri: str | None) -> tuple[str, str]:
    """`{output.uri}/{namespace}/{name}/v{generation}` and the version `v{generation}`."""
    if not output_uri:
        raise ConfigError("spec.output.uri is not set; the operator fills it in from its artifact store")
    if metadata.generation is None:
        raise ConfigError("metadata.name and metadata.generation are needed to name the published version")
    version = f"v{metadata.generation}"
    return f"{output_uri.rstrip('/')}/{metadata.namespace}/{metadata.name}/{version}", version


def resource_record(metadata: ObjectMeta) -> dict[str, Any]:
    """The resource a manifest was published by."""
    return {
        "namespace": metadata.namespace,
        "name": metadata.name,
        "uid": metadata.uid,
        "generation": metadata.generation,
    }


DERIVED_FILES = frozenset({MANIFEST_FILE, MODEL_CARD_FILE, MODEL_CARD_JSON_FILE})
"""Files written from the manifest (and the manifest itself), which its digests therefore leave out."""


def file_digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): storage.sha256_of(str(path))
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name not in DERIVED_FILES
    }


def library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "peft": str(peft.__version__),
        "kubetune_components": components_version,
    }


def read_json(path: Path) -> Any:
    """A workspace file as JSON, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def existing_manifest(dest_uri: str) -> dict[str, Any] | None:
    manifest_uri = f"{dest_uri}/{MANIFEST_FILE}"
    try:
        if not storage.exists(manifest_uri):
            return None
        existing = json.loads(storage.read_bytes(manifest_uri))
    except (OSError, ValueError, ComponentError):
        return None
    return existing if isinstance(existing, dict) else None


def _without_time(manifest: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps({key: value for key, value in manifest.items() if key != "createdAt"}))


@contextlib.contextmanager
def export_staging(workspace_dir: Path) -> Iterator[Path]:
    """A fresh directory to export into, removed afterwards (published or not)."""
    staging_root = workspace_dir / WorkspaceLayout.EXPORT_STAGING
    staging_root.mkdir(parents=True, exist_ok=True)
    export_dir = Path(tempfile.mkdtemp(prefix="artifact-", dir=staging_root))
    try:
        yield export_dir
    finally:
        shutil.rmtree(export_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            staging_root.rmdir()  # only when no other export is in progress


def publish_with_manifest(export_dir: Path, dest_uri: str, manifest: dict[str, Any]) -> None:
    """Write the manifest and the model card generated from it into `export_dir`, and publish the
    directory to `dest_uri` atomically.

    Publishing the same thing again keeps the first `createdAt`, so the published content is identical.
    """
    existing = existing_manifest(dest_uri)
    if existing is not None and _without_time(existing) == _without_time(manifest):
        manifest["createdAt"] = existing.get("createdAt")
    storage.atomic_write_json(export_dir / MANIFEST_FILE, manifest)
    write_model_card(export_dir, manifest)
    storage.publish_dir_atomically(export_dir, dest_uri)
