"""Kopf's login: the credentials kubetune's own Kubernetes client uses (see :mod:`kubetune.kube.client`)."""

from __future__ import annotations

from typing import Any

import kopf

from kubetune.kube.client import cluster_config, connection_info


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """The in-cluster service account, else the current context of $KUBECONFIG or ~/.kube/config."""
    return connection_info(cluster_config())
