"""``serving/processes.json``: every process local serving runs, with its start time and the
descendants it was seen to have, so that what a `kubetune up` killed outright left behind is
stopped by the next one (the kernel's SIGTERM on a parent's death covers Linux; this covers the
rest, and descendants that left the process group)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubetune.common.files import read_json, write_json_atomically
from kubetune.common.supervision import ManagedProcess, create_time, process_alive, stop_recorded


def recorded_members(record: Mapping[str, Any]) -> list[tuple[int, float | None]]:
    """(pid, start time) of a recorded process and of each of its descendants."""
    members: list[tuple[int, float | None]] = []
    pid, created = record.get("pid"), record.get("created")
    if isinstance(pid, int):
        members.append((pid, created))
    members += [(int(pid), created) for pid, created in (record.get("descendants") or {}).items()]
    return members


class ProcessRecord:
    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, processes: Sequence[ManagedProcess]) -> None:
        """Record ``processes`` as this process's (no file when there are none)."""
        if not processes:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(
            self.path,
            {
                "owner": os.getpid(),
                "ownerCreated": create_time(os.getpid()),
                "processes": [process.record() for process in processes],
            },
        )

    def reap_leftovers(self) -> int:
        """Stop the processes recorded by an owner that is gone; returns how many still ran."""
        registry = read_json(self.path) or {}
        owner, owner_created = registry.get("owner"), registry.get("ownerCreated")
        if owner != os.getpid() and process_alive(owner, owner_created):
            return 0  # that `kubetune up` still runs: its processes are its own
        stopped = sum(stop_recorded(recorded_members(record)) for record in (registry.get("processes") or []))
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        return stopped
