from pathlib import Path


def resolve_local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))
