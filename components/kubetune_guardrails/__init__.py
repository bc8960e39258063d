"""The guard library: detectors and redactors shared by the gateway and the data-curation step.

It depends only on the contract (kubetune_contract); the gateway (kubetune.gateway.guards) and the
curation step (kubetune_components) build on it.
"""

from kubetune_guardrails.decisions import (
    GuardAction,
    GuardDecision,
    GuardErrorCode,
    PassThroughStreamGuard,
    StreamTextGuard,
    TextGuard,
    most_severe,
)

__all__ = [
    "GuardAction",
    "GuardDecision",
    "GuardErrorCode",
    "PassThroughStreamGuard",
    "StreamTextGuard",
    "TextGuard",
    "most_severe",
]
