"""Where the operator's Kubernetes credentials come from, for Kopf and for kubetune's own client.

kubetune's API calls (server-side apply of a ModelDeployment's children, lists, deletes) go through
lightkube's :class:`~lightkube.AsyncClient`; Kopf keeps its own session for its watches, patches and
events. Both are configured from one :func:`cluster_config`: the in-cluster service account when
there is one, else ``$KUBECONFIG`` or ``~/.kube/config`` (lightkube's ``KubeConfig.from_env``).
Kopf gets it through the operator's login handler (:func:`connection_info`), so the two clients
always talk to the same API server as the same user.

A kubeconfig whose user authenticates through an exec plugin or an auth provider has no credentials
Kopf can use: the login says so instead of connecting anonymously.
"""

from __future__ import annotations

import kopf
from lightkube import AsyncClient, ConfigError, KubeConfig
from lightkube.config.kubeconfig import SingleConfig
from lightkube.config.models import User

FIELD_MANAGER = "kubetune"


def cluster_config() -> SingleConfig:
    """The current context of the in-cluster service account, ``$KUBECONFIG`` or ``~/.kube/config``."""
    try:
        config = KubeConfig.from_env().get()
    except ConfigError as error:
        raise kopf.LoginError(f"no Kubernetes credentials: {error}") from error
    if config is None:
        raise kopf.LoginError("the kubeconfig has no current context")
    return config


def connection_info(config: SingleConfig) -> kopf.ConnectionInfo:
    """The same server and credentials as Kopf's ConnectionInfo (Kopf's session reads no kubeconfig)."""
    cluster, user = config.cluster, config.user or User()
    if user.exec is not None or user.auth_provider is not None:
        raise kopf.LoginError(
            f"the kubeconfig context {config.context_name!r} authenticates through an exec plugin or an "
            "auth provider, which the operator cannot use: give it a token or a client certificate"
        )
    token = user.token
    if token is None and user.token_file is not None:
        with open(config.abs_file(user.token_file), encoding="utf-8") as token_file:
            token = token_file.read().strip()
    return kopf.ConnectionInfo(
        server=cluster.server,
        ca_path=config.abs_file(cluster.certificate_auth) if cluster.certificate_auth else None,
        ca_data=cluster.certificate_auth_data,
        insecure=cluster.insecure or None,
        token=token or None,
        username=user.username,
        password=user.password,
        certificate_path=config.abs_file(user.client_cert) if user.client_cert else None,
        certificate_data=user.client_cert_data,
        private_key_path=config.abs_file(user.client_key) if user.client_key else None,
        private_key_data=user.client_key_data,
        default_namespace=config.namespace,
    )


def async_client(config: SingleConfig) -> AsyncClient:
    """kubetune's client: applies as :data:`FIELD_MANAGER`; ignores proxy variables, as Kopf does."""
    return AsyncClient(config, field_manager=FIELD_MANAGER, trust_env=False)
