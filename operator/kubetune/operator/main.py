"""`kubetune operator`: run the Kopf operator with kubetune's handlers."""

from __future__ import annotations

import asyncio
import logging

import kopf


def run_operator(namespaces: list[str], liveness_port: int | None = 8080, verbose: bool = False) -> int:
    import kubetune.operator.handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.PLAIN)
    logging.getLogger("kubetune").setLevel(logging.DEBUG if verbose else logging.INFO)
    liveness = f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None
    settings = kopf.OperatorSettings()
    # With exact namespaces there is nothing to discover at run time, and no reason to need the
    # cluster-wide permission to list and watch namespaces (least privilege).
    settings.scanning.disabled = bool(namespaces) and not any(set("*?[") & set(ns) for ns in namespaces)
    asyncio.run(
        kopf.operator(
            settings=settings,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=liveness,
            standalone=True,  # one replica (Recreate); no KopfPeering CRD or its RBAC needed
        )
    )
    return 0
