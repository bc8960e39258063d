"""The gateway's watch of its own key Secret: created and revoked keys apply within seconds.

A Secret mounted as a volume reaches the pod only when the kubelet next syncs it (a minute or more),
so on a cluster the gateway also watches that one Secret through the API (a watch with the field
selector ``metadata.name``, which RBAC authorises against a Role naming only that Secret). Each event
hands the Secret's ``keys.json`` (and ``signing.key``) to the key ring; each (re)connection first
gets the Secret, so one deleted while the watch was down is noticed too. An absent or deleted Secret
hands over no keys (with ``auth: required``: every request refused). A watch that fails is
retried with a growing pause (at most :data:`MAX_RETRY_SECONDS`); the key ring
(:class:`kubetune.gateway.access.control.KeyRing`) falls back to the mounted copy only after the watch
has failed for ``WATCH_FALLBACK_SECONDS``, long enough for the kubelet to have refreshed it.

Credentials: the pod's ServiceAccount in a cluster, else ``$KUBECONFIG`` or ``~/.kube/config``
(lightkube's ``KubeConfig.from_env``), so a local process can watch a real cluster's Secret.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Secret

from kubetune.gateway.access.keys import KEY_FILE_NAME, SIGNING_KEY_FILE_NAME

log = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 10.0
# the API server ends a watch after this; lightkube opens the next one from the last resourceVersion
WATCH_SERVER_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class SecretContent:
    """What the gateway takes from its key Secret; ``None`` fields: the key is not in the Secret."""

    keys: bytes | None
    signing_key: bytes | None


def secret_content(data: Mapping[str, str] | None) -> SecretContent:
    """The key file and signing key of a Secret's ``data`` (base64 values)."""
    data = data or {}

    def decoded(name: str) -> bytes | None:
        value = data.get(name)
        return base64.b64decode(value) if value is not None else None

    return SecretContent(decoded(KEY_FILE_NAME), decoded(SIGNING_KEY_FILE_NAME))


SecretListener = Callable[[SecretContent | None], None]
"""Called with each new content of the Secret; ``None`` when it was deleted."""


class KeySecretWatch:
    """Watches Secret ``namespace/name`` until cancelled, reporting its content and its failures."""

    def __init__(
        self,
        namespace: str,
        name: str,
        on_content: SecretListener,
        on_failure: Callable[[str], None],
    ) -> None:
        self.namespace = namespace
        self.name = name
        self._on_content = on_content
        self._on_failure = on_failure

    async def run(self) -> None:
        pause = FIRST_RETRY_SECONDS
        while True:
            try:
                client = _client()
                try:
                    await self._watch(client)
                finally:
                    await client.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                message = (
                    f"cannot watch the key Secret {self.namespace}/{self.name}: {type(exc).__name__}: {exc}"
                )
                self._on_failure(message)
                await asyncio.sleep(pause)
                pause = min(MAX_RETRY_SECONDS, pause * 2)
            else:
                pause = FIRST_RETRY_SECONDS

    async def _watch(self, client: AsyncClient) -> None:
        # a get first: the watch alone would not say that the Secret is absent (deleted while this
        # process was not watching), and it starts from what the get saw
        version: str | None = None
        try:
            current = await client.get(Secret, self.name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            self._on_content(None)
        else:
            version = current.metadata.resourceVersion if current.metadata is not None else None
            self._on_content(secret_content(current.data))
        events = client.watch(
            Secret,
            namespace=self.namespace,
            fields={"metadata.name": self.name},
            server_timeout=WATCH_SERVER_TIMEOUT_SECONDS,
            resource_version=version,
        )
        async for event, secret in events:
            if secret.metadata is None or secret.metadata.name != self.name:
                continue
            if event == "DELETED":
                self._on_content(None)
            else:
                self._on_content(secret_content(secret.data))


def _client() -> AsyncClient:
    # trust_env=False: the API server is never reached through an HTTP proxy of the environment
    return AsyncClient(KubeConfig.from_env(), trust_env=False)
