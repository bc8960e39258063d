"""Kopf's login: the credentials kubetune's own Kubernetes client uses (see :mod:`kubetune.kube.client`)."""

from __future__ import annotations

from typing import Any

import kopf

from kubetune.kube.client import cluster_config, connection_info, uses_credential_plugin


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The in-cluster service account, else the current context of $KUBECONFIG or ~/.kube/config."""
    config = cluster_config()
    if uses_credential_plugin(config):
        # The official client runs the plugin (it reads the same kubeconfig) and refreshes its token.
        return kopf.login_via_client(**kwargs)
    return connection_info(config)
