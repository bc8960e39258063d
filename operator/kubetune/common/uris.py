"""Model, dataset and workspace locations: local paths, file://, pvc://claim/path, fsspec URLs."""

from __future__ import annotations

from pathlib import Path


def absolute(uri: str, base_dir: Path | None) -> str:
    """Local relative paths resolved against `base_dir` (local mode); URIs and absolute paths as they are."""
    if base_dir is None or "://" in uri:
        return uri
    path = Path(uri)
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def pvc_claims(uris: list[str]) -> list[str]:
    claims = {uri[len("pvc://") :].split("/", 1)[0] for uri in uris if uri.startswith("pvc://")}
    return sorted(claims)


def short_uid(uid: str | None) -> str:
    return (uid or "nouid").replace("-", "")[:8]
