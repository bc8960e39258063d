"""A ModelDeployment's API keys on a cluster (``kubetune keys ... --cluster``).

The keys live in the Secret ``<deployment>-gateway-access`` (:func:`~kubetune.kube.children.
gateway_access_secret_name`): ``keys.json``, the same key file as locally (salted hashes only, never a
key), and ``signing.key``, the HMAC key every gateway replica signs response ids with. The gateway
mounts it and watches it through the API as its ServiceAccount (``<deployment>-gateway``, rendered by
the operator), so a created or revoked key applies on every replica within seconds.

The first ``kubetune keys create`` creates the Secret (with a new signing key) and the Role and
RoleBinding that let the gateway's ServiceAccount get, list and watch that one Secret
(:func:`~kubetune.kube.permissions.gateway_key_secret_rules`). They are created here, by a user who
may manage Secrets, because the operator reads no Secrets and RBAC lets nobody grant a right it does
not hold. All three carry the ModelDeployment as their owner (not their controller), so they go with
it. Each change is a read-modify-replace with the Secret's ``resourceVersion``: two concurrent
``kubetune keys`` never lose each other's key (the loser of a race re-reads and tries again).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from lightkube import ApiError, AsyncClient
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Secret
from lightkube.resources.rbac_authorization_v1 import Role, RoleBinding

from kubetune.api.registry import get_definition
from kubetune.gateway.access.keys import (
    KEY_FILE_NAME,
    SIGNING_KEY_FILE_NAME,
    CreatedKey,
    KeyRecord,
    KeySet,
    Scope,
    new_key,
    revoked_record,
)
from kubetune.kube.children import (
    gateway_access_secret_name,
    gateway_labels,
    gateway_service_account_name,
)
from kubetune.kube.permissions import gateway_key_secret_rules

KEYS_FIELD_MANAGER = "kubetune-keys"
CONFLICT_RETRIES = 8
SIGNING_KEY_BYTES = 32


class ClusterKeysError(RuntimeError):
    """What ``kubetune keys`` could not do on the cluster; the message says what and why."""


@dataclass(frozen=True)
class Owner:
    """The ModelDeployment the key objects belong to."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        definition = get_definition("ModelDeployment")
        return {
            "apiVersion": definition.api_version,
            "kind": definition.kind,
            "name": self.name,
            "uid": self.uid,
        }

    def metadata(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": gateway_labels(self.name),
            "ownerReferences": [self.reference()],
        }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def build_gateway_access_secret(owner: Owner, keys: KeySet, signing_key: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": owner.metadata(gateway_access_secret_name(owner.name)),
        "data": {
            KEY_FILE_NAME: _b64(keys.to_json_text().encode()),
            SIGNING_KEY_FILE_NAME: _b64(signing_key),
        },
    }


def build_gateway_access_role(owner: Owner) -> dict[str, Any]:
    """Get, list and watch of the deployment's key Secret, by name: nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": owner.metadata(gateway_access_secret_name(owner.name)),
        "rules": gateway_key_secret_rules(gateway_access_secret_name(owner.name)),
    }


def build_gateway_access_role_binding(owner: Owner) -> dict[str, Any]:
    """That Role, for the gateway's ServiceAccount only."""
    name = gateway_access_secret_name(owner.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": owner.metadata(name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": gateway_service_account_name(owner.name),
                "namespace": owner.namespace,
            }
        ],
    }


def _keys_of(secret: Secret, where: str) -> KeySet:
    text = (secret.data or {}).get(KEY_FILE_NAME)
    if text is None:
        return KeySet()
    return KeySet.parse(base64.b64decode(text), f"{where}: {KEY_FILE_NAME}")


def _refused(error: ApiError, what: str) -> ClusterKeysError:
    status = error.status
    return ClusterKeysError(
        f"{what}: the API server answered {status.code} {status.reason}: {status.message}"
    )


class ClusterKeys:
    """The keys of ModelDeployment ``namespace/name`` in its gateway's Secret."""

    def __init__(self, client: AsyncClient, namespace: str, deployment: str) -> None:
        self.client = client
        self.namespace = namespace
        self.deployment = deployment
        self.secret_name = gateway_access_secret_name(deployment)

    @property
    def where(self) -> str:
        return f"Secret {self.namespace}/{self.secret_name}"

    async def _owner(self) -> Owner:
        definition = get_definition("ModelDeployment")
        resource = create_namespaced_resource(
            definition.group, definition.version, definition.kind, definition.plural
        )
        try:
            found = await self.client.get(resource, self.deployment, namespace=self.namespace)
        except ApiError as error:
            if error.status.code == 404:
                raise ClusterKeysError(
                    f'ModelDeployment "{self.deployment}" not found in namespace {self.namespace}'
                ) from error
            raise _refused(error, f"reading ModelDeployment {self.namespace}/{self.deployment}") from error
        uid = found.metadata.uid if found.metadata is not None else None
        if not uid:
            raise ClusterKeysError(f"ModelDeployment {self.namespace}/{self.deployment} has no uid")
        return Owner(self.deployment, self.namespace, uid)

    async def _secret(self) -> Secret | None:
        try:
            return await self.client.get(Secret, self.secret_name, namespace=self.namespace)
        except ApiError as error:
            if error.status.code == 404:
                return None
            raise _refused(error, f"reading {self.where}") from error

    async def read(self) -> KeySet:
        """The deployment's keys; none when its Secret does not exist yet."""
        secret = await self._secret()
        return KeySet() if secret is None else _keys_of(secret, self.where)

    async def create(
        self, tenant: str, scopes: Iterable[Scope], description: str = ""
    ) -> tuple[CreatedKey, str | None]:
        """A new key in the Secret (created, with its signing key and the gateway's Role, when missing),
        and what went wrong granting the gateway that Role, if anything: the key is stored by then,
        so that is a warning to show beside the key, which must still be shown."""
        if not tenant or not tenant.strip():
            raise ValueError("tenant: must not be empty")
        scopes = frozenset(scopes)
        for _ in range(CONFLICT_RETRIES):
            secret = await self._secret()
            if secret is None:
                owner = await self._owner()
                created = new_key(tenant, scopes, (), description)
                document = build_gateway_access_secret(
                    owner, KeySet({created.record.id: created.record}), secrets.token_bytes(SIGNING_KEY_BYTES)
                )
                try:
                    await self.client.create(
                        cast(Secret, Secret.from_dict(document)), field_manager=KEYS_FIELD_MANAGER
                    )
                except ApiError as error:
                    if error.status.code == 409:  # created meanwhile: add to that one
                        continue
                    raise _refused(error, f"creating {self.where}") from error
                return created, await self.grant_gateway(owner)
            keys = _keys_of(secret, self.where)
            created = new_key(tenant, scopes, keys.records.keys(), description)
            if await self._replace(secret, KeySet({**keys.records, created.record.id: created.record})):
                return created, None
        raise ClusterKeysError(f"{self.where} kept changing under {CONFLICT_RETRIES} attempts; try again")

    async def revoke(self, key_id: str) -> KeyRecord:
        """Mark ``key_id`` revoked (kept, so the id is never reused); KeyError naming the known ids."""
        for _ in range(CONFLICT_RETRIES):
            secret = await self._secret()
            keys = KeySet() if secret is None else _keys_of(secret, self.where)
            record = keys.records.get(key_id)
            if record is None:
                known = ", ".join(keys.records) or "none"
                raise KeyError(f"no key {key_id!r} in {self.where} (known: {known})")
            if record.revoked is not None or secret is None:
                return record
            revoked = revoked_record(record)
            if await self._replace(secret, KeySet({**keys.records, key_id: revoked})):
                return revoked
        raise ClusterKeysError(f"{self.where} kept changing under {CONFLICT_RETRIES} attempts; try again")

    async def _replace(self, secret: Secret, keys: KeySet) -> bool:
        """Write ``keys`` into the Secret as read (its resourceVersion); False when it changed since."""
        document = secret.to_dict()
        document["data"] = {**(document.get("data") or {}), KEY_FILE_NAME: _b64(keys.to_json_text().encode())}
        try:
            await self.client.replace(
                cast(Secret, Secret.from_dict(document)), field_manager=KEYS_FIELD_MANAGER
            )
        except ApiError as error:
            if error.status.code == 409:
                return False
            raise _refused(error, f"writing {self.where}") from error
        return True

    async def grant_gateway(self, owner: Owner) -> str | None:
        """Apply the Role and RoleBinding that let the gateway watch its Secret (idempotent); what
        failed, or None."""
        for document, kind in (
            (build_gateway_access_role(owner), Role),
            (build_gateway_access_role_binding(owner), RoleBinding),
        ):
            try:
                await self.client.apply(
                    cast(Role | RoleBinding, kind.from_dict(document)),
                    field_manager=KEYS_FIELD_MANAGER,
                    force=True,
                )
            except ApiError as error:
                return str(
                    _refused(
                        error,
                        f"{self.where} holds the key, but granting the gateway's ServiceAccount "
                        f"{gateway_service_account_name(owner.name)!r} the right to watch it "
                        f"({kind.__name__} {document['metadata']['name']}) failed, so its gateways see key "
                        "changes only when the kubelet refreshes the mounted Secret (a minute or more)",
                    )
                )
        return None
