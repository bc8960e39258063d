"""The yardstick of benchmarks/operator_scale.py: the least a Kopf operator can do with a FineTuneJob.

It writes one status field when a FineTuneJob is created, and nothing else: no finalizer, no timer, no
backend. Run as ``python -m kopf run --standalone --namespace NS benchmarks/minimal_kopf_operator.py``.
"""

from __future__ import annotations

from typing import Any

import kopf


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.enabled = False  # no Kubernetes Events for each object handled


@kopf.on.create("kubetune.dev", "v1alpha1", "finetunejobs")
def write_status(patch: kopf.Patch, **_: Any) -> None:
    patch.status["phase"] = "Pending"
