"""The versions of a shared adapter server, read from a file the server watches (a mounted ConfigMap).

On a cluster the operator cannot call every pod of a shared adapter server, so instead of the
``PUT``/``DELETE /adapters/<version>`` calls of local mode it writes the group's versions (version ->
adapter directory, the JSON object of ``KUBETUNE_ADAPTERS``) to a ConfigMap that every pod mounts
(``KUBETUNE_ADAPTERS_FILE``). The kubelet replaces the file in place when the ConfigMap changes;
:class:`AdaptersFileWatch` reads it every few seconds and loads the versions that joined or whose
adapter changed, and unloads those that left, while the others serve on. An adapter that cannot be
loaded is logged and left out (the other versions keep serving); it is tried again when the file
names another directory for it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path

from kubetune_components.common.errors import ComponentError, ConfigError
from kubetune_components.serving.adapters import SharedAdapters

logger = logging.getLogger(__name__)

POLL_S = 2.0
"""How often the server reads the file (the kubelet itself refreshes a mounted ConfigMap within a minute
or so)."""


def parse_adapters(raw: str, source: str) -> dict[str, str]:
    """A JSON object of version name -> adapter directory; ConfigError names ``source``."""
    try:
        value = json.loads(raw) if raw.strip() else None
    except ValueError as error:
        raise ConfigError(f"{source} is not valid JSON: {error}") from error
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{source} must be a JSON object of version name -> adapter directory")
    for version, directory in value.items():
        if not isinstance(directory, str) or not directory:
            raise ConfigError(f"{source}: version {version!r} needs an adapter directory")
    return {str(version): str(directory) for version, directory in value.items()}


def read_adapters_file(path: Path) -> dict[str, str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read the adapters file {path}: {error}") from error
    return parse_adapters(raw, str(path))


class AdaptersFileWatch:
    """Keeps a :class:`SharedAdapters` holding exactly the versions the file names."""

    def __init__(self, path: Path, shared: SharedAdapters, loaded: Mapping[str, str]) -> None:
        self.path = path
        self.shared = shared
        self.loaded: dict[str, str] = dict(loaded)
        """Version -> the adapter directory the server holds for it."""
        self.problems: dict[str, str] = {}
        """Version -> why its adapter could not be loaded from the directory the file names."""

    def sync(self) -> None:
        """Read the file once and load or unload what changed. A file that cannot be read or parsed
        changes nothing (it is logged): the server keeps serving what it holds."""
        try:
            wanted = read_adapters_file(self.path)
        except ConfigError as error:
            logger.error("keeping the loaded versions: %s", error.message)
            return
        for version in [version for version in self.loaded if version not in wanted]:
            self.shared.remove(version)
            del self.loaded[version]
            logger.info("unloaded version %s: %s no longer names it", version, self.path)
        for version in [version for version in self.problems if version not in wanted]:
            del self.problems[version]
        for version, directory in wanted.items():
            if self.loaded.get(version) == directory or self.problems.get(version, "").startswith(directory):
                continue
            try:
                self.shared.add(version, directory)
            except ComponentError as error:
                self.problems[version] = f"{directory}: {error.message}"
                logger.error("cannot load version %s: %s", version, self.problems[version])
                continue
            self.loaded[version] = directory
            self.problems.pop(version, None)
            logger.info("loaded version %s from %s", version, directory)

    def run(self, stop: threading.Event, interval_s: float = POLL_S) -> None:
        """Sync every ``interval_s`` until ``stop`` is set (the server's watcher thread)."""
        while not stop.wait(interval_s):
            try:
                self.sync()
            except Exception:  # a bug here must not kill the watcher: the versions loaded keep serving
                logger.exception("syncing the versions with %s failed", self.path)
