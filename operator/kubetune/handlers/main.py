"""`kubetune operator`: run the Kopf operator with kubetune's handlers."""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import logging
import os
import sys

import kopf

from kubetune.handlers.metrics import port_from_env

# The modules whose Kopf handlers make up the operator (importing one registers its handlers). The
# RBAC integration test runs exactly these, so every API call they make is checked against the rules.
HANDLER_MODULES: tuple[str, ...] = (
    "kubetune.handlers.login",
    "kubetune.handlers.jobs",
    "kubetune.handlers.deployment",
)


class WithoutTimerSuccesses(logging.Filter):
    """Drops Kopf's "Timer '...' succeeded." line: every unfinished job's timer ticks every reconcile
    interval, so with many jobs those lines would bury everything else (failures are still logged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith("Timer '") and message.endswith("' succeeded."))


M_ARENA_MAX = -8  # glibc's <malloc.h>
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (default: 8 per core) before any thread starts; whether it could.

    Each thread that allocates (the handlers' worker threads, the API client's) otherwise gets an arena
    of its own, and the short-lived objects of hundreds of jobs' passes leave each arena's pages
    resident (benchmarks/operator_scale.py, 500 jobs: 335 MB peak without the cap, 236 MB with it).
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def run_operator(
    namespaces: list[str],
    liveness_port: int | None = 8080,
    verbose: bool = False,
) -> int:
    """Run until stopped, serving metrics on $KUBETUNE_METRICS_PORT (default 9090; 0: no metrics)."""
    limit_malloc_arenas()
    for module in HANDLER_MODULES:
        importlib.import_module(module)
    port = port_from_env(os.environ)
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.PLAIN)
    logging.getLogger("kubetune").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.getLogger("kopf.objects").addFilter(WithoutTimerSuccesses())
    # lightkube's HTTP client logs every API call at INFO (a dozen lines per pass): only with --verbose.
    for client_logger in ("httpx", "httpx2"):
        logging.getLogger(client_logger).setLevel(logging.DEBUG if verbose else logging.WARNING)
    liveness = f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None
    settings = kopf.OperatorSettings()
    # With exact namespaces there is nothing to discover at run time, and no reason to need the
    # cluster-wide permission to list and watch namespaces (least privilege).
    settings.scanning.disabled = exact_namespaces(namespaces)
    asyncio.run(
        kopf.operator(
            settings=settings,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=liveness,
            standalone=True,  # one replica (Recreate); no KopfPeering CRD or its RBAC needed
            # The startup handler serves the metrics; the cleanup handler stops them.
            memo=kopf.Memo(metrics_port=port, metrics_address="0.0.0.0"),
        )
    )
    return 0


def exact_namespaces(namespaces: list[str]) -> bool:
    """Whether the operator serves a fixed list of namespaces (no glob patterns, not cluster-wide)."""
    return bool(namespaces) and not any(set("*?[") & set(ns) for ns in namespaces)
