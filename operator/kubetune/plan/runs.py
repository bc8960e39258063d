"""The runs planning decides on, and what a pipeline backend offers to carry them out: idempotent submit,
find, resume, cancel. Backends (kubetune.backends) implement :class:`Backend`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from kubetune_contract.workspace import WorkspaceReport

RunPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Cancelled", "Interrupted"]
FINISHED_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed", "Cancelled"})


@dataclass(frozen=True)
class RunRequest:
    """One pipeline run for one generation of one resource.

    `key` is derived from the resource's uid and generation; a backend never starts two runs with
    the same key, which is what makes submission exactly-once across restarts and repeated events.
    """

    key: str
    kind: str
    display_name: str
    config: dict[str, Any]
    workspace: str
    experiment: str
    labels: dict[str, str] = field(default_factory=dict)
    pipeline_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunStatus:
    backend: Literal["kfp", "local"]
    id: str
    phase: RunPhase
    message: str = ""
    reason: str = ""
    url: str | None = None
    attempt: int = 1
    report: WorkspaceReport | None = None
    """What the steps reported, when the backend reads it itself (kfp: from the run's task outputs,
    since the operator cannot mount a workspace in another namespace); None: read the run's workspace."""

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES


class Backend(Protocol):
    @property
    def name(self) -> Literal["kfp", "local"]:
        """Which executor this backend is."""

    def find(self, key: str, namespace: str | None = None) -> RunStatus | None:
        """The run submitted under this key, if any. `namespace`: the resource's, for a backend that
        keeps runs per namespace (kfp: each resource's runs execute in its namespace)."""

    def submit(self, request: RunRequest) -> RunStatus:
        """Start the run unless one exists under the same key; either way return it."""

    def resume(self, key: str, namespace: str | None = None) -> RunStatus:
        """Start another attempt of an interrupted run (steps resume from their checkpoints)."""

    def cancel(self, key: str, namespace: str | None = None) -> None:
        """Stop the run; a no-op when it is finished or unknown."""


class BackendError(RuntimeError):
    """The backend could not be reached or refused the request (retried by the caller)."""
