"""Errors a pipeline step reports back to the operator.

Each error carries a CamelCase `reason` that ends up in the resource's status condition and a
human-readable `message` that says what to fix.
"""

from __future__ import annotations


class ComponentError(Exception):
    """A failure that a user can act on; `reason` is machine-readable, `message` is for people."""

    default_reason = "ComponentFailed"
    reason: str
    message: str

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason

    def __str__(self) -> str:
        return self.message


class DatasetError(ComponentError):
    default_reason = "InvalidDataset"


class ModelLoadError(ComponentError):
    default_reason = "ModelLoadFailed"


class GateFailedError(ComponentError):
    default_reason = "QualityGateFailed"


class ConfigError(ComponentError):
    default_reason = "InvalidConfig"
