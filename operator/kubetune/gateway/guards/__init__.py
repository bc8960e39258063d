"""The gateway's guard pipeline, built from a deployment's ``spec.guardrails`` (see ``pipeline``)."""

from kubetune.gateway.guards.pipeline import GuardPipeline, GuardRefusal, StreamGuard

__all__ = ["GuardPipeline", "GuardRefusal", "StreamGuard"]
