"""Where the operator's Kubernetes credentials come from, for Kopf and for kubetune's own client.

kubetune's API calls (server-side apply of a ModelDeployment's children, lists, deletes) go through
lightkube's :class:`~lightkube.AsyncClient`; Kopf keeps its own session for its watches, patches and
events. Both are configured from one :func:`cluster_config`: the in-cluster service account when
there is one, else ``$KUBECONFIG`` or ``~/.kube/config`` (lightkube's ``KubeConfig.from_env``).
Kopf gets it through the operator's login handler (:func:`connection_info`), so the two clients
always talk to the same API server as the same user.

A kubeconfig user that authenticates through an exec plugin or an auth provider (cloud clusters)
has no static credentials to hand over: lightkube runs the plugin itself, and the login handler
lets Kopf's ``login_via_client`` (the official client, which runs them too) log Kopf in.
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


def uses_credential_plugin(config: SingleConfig) -> bool:
    """Whether the user's credentials come from an exec plugin or an auth provider."""
    user = config.user or User()
    return user.exec is not None or user.auth_provider is not None


def connection_info(config: SingleConfig) -> kopf.ConnectionInfo:
    """The same server and static credentials as Kopf's ConnectionInfo."""
    cluster, user = config.cluster, config.user or User()
    if uses_credential_plugin(config):
        raise kopf.LoginError(
            f"the kubeconfig context {config.context_name!r} gets its credentials from a plugin, "
            "not from the kubeconfig"
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
