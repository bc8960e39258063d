"""The gateway's access control for one deployment: who is calling (keys, scopes), whether they may
(limits and budgets), what it cost (usage metrics) and the record of it (the audit log).

Every request the gateway answers goes through one :class:`Exchange`: ``authenticate`` (401/403),
``admit`` (429/503), ``charge`` when the answer's usage is known, and ``finish``, which writes the
audit line and counts the request. Health and metrics need no key (probes and scraping).

Authentication is on when ``access.auth`` is ``required``, or ``whenKeysExist`` and the key file
holds a key (revoked ones count: revoking every key does not open the gateway). Without it, the
caller is the anonymous principal (key ``-``, tenant ``-``), still limited by ``perKey`` and
``perTenant``: no request escapes the limits, with or without a key; an admin key is limited too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from kubetune.gateway.access.audit import AuditLog
from kubetune.gateway.access.key_watch import KeySecretWatch, SecretContent
from kubetune.gateway.access.keys import (
    KEY_FILE_NAME,
    KEY_RELOAD_SECONDS,
    KeyFileError,
    KeySet,
    Scope,
    read_key_file,
)
from kubetune.gateway.access.limits import (
    LimitStore,
    LimitStoreUnavailable,
    LocalLimitStore,
    Measure,
    RedisLimitStore,
    Rule,
    principal_rules,
)
from kubetune.gateway.config import (
    REDIS_PASSWORD_ENV,
    AccessConfig,
    AuditConfig,
    GatewayConfig,
    LimitStoreConfig,
)
from kubetune.gateway.errors import GatewayError
from kubetune.gateway.experiments import SharedStatistics
from kubetune.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

ANONYMOUS = "-"
# a failing watch of the key Secret is trusted this long; by then the kubelet has refreshed the mount
WATCH_FALLBACK_SECONDS = 120.0


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant: str
    scopes: frozenset[Scope] | None  # None: anonymous, authentication off


ANONYMOUS_PRINCIPAL = Principal(ANONYMOUS, ANONYMOUS, None)


@dataclass
class Exchange:
    """One request as access control sees it, from the key check to the audit line."""

    request_id: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    principal: Principal = ANONYMOUS_PRINCIPAL
    rules: list[Rule] = field(default_factory=list)
    version: str = "-"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    decision: str = "served"
    guards: list[dict[str, Any]] = field(default_factory=list)
    """What the guards did other than pass (kubetune_guardrails.GuardDecision.audit_record)."""
    prompt: Any = None
    """The client's prompt, PII-redacted (kubetune.gateway.capture); set only when content is kept."""
    completion: str | None = None
    """The answer's text as the client got it, PII-redacted; set only when content is kept."""
    finished: bool = False

    def refused(self, error: GatewayError) -> None:
        if error.status_code == 401:
            self.decision = "unauthenticated"
        elif error.status_code == 403:
            self.decision = "forbidden"
        elif error.status_code == 429:
            self.decision = "limited"
        elif error.code == "limit_store_unavailable":
            self.decision = "limit-store-unavailable"
        else:
            self.decision = "rejected" if error.status_code < 500 else "failed"


class KeyRing:
    """The keys in force: the key file, re-read when its size, mtime or inode changed (checked at most
    once a second), or, once the key Secret's watch has reported it, the Secret's (the newer of the two:
    a mounted Secret lags it by a minute or more). The watched keys stay in force while a broken
    watch reconnects; after :data:`WATCH_FALLBACK_SECONDS` of failure the file is used again."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.keys = KeySet()
        self.error: str | None = None
        self.watched: KeySet | None = None
        self.watched_signing_key: bytes | None = None
        self.watch_error: str | None = None
        self._watch_failing_since: float | None = None
        self._signature: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._refresh()

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            stat = self.path.stat()
            signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            signature = None
        if signature == self._signature and self._checked:
            return
        try:
            self.keys = read_key_file(self.path)
            self.error = None
            self._signature = signature
            log.info("loaded %d key(s) from %s", len(self.keys.records), self.path)
        except KeyFileError as exc:
            # keep the last good keys: a torn or bad file must neither open nor lock the gateway
            if str(exc) != self.error:
                log.error("%s; keeping the last good keys", exc)
            self.error = str(exc)

    def watched_secret(self, content: SecretContent | None, source: str) -> None:
        """What the key Secret's watch saw: its content, or None when the Secret does not exist."""
        self._watch_failing_since = None
        self.watch_error = None
        if content is None or content.keys is None:
            if self.watched is None or not self.watched.empty:
                log.warning("%s is absent or holds no %s: no key is valid", source, KEY_FILE_NAME)
            self.watched = KeySet()
        else:
            try:
                keys = KeySet.parse(content.keys, f"{source}: {KEY_FILE_NAME}")
            except KeyFileError as exc:
                log.error("%s; keeping the last good keys", exc)
                self.error = str(exc)
                return
            self.error = None
            if self.watched is None or keys.records != self.watched.records:
                log.info("loaded %d key(s) from %s", len(keys.records), source)
            self.watched = keys
        if content is not None and content.signing_key:
            self.watched_signing_key = content.signing_key

    def watch_failed(self, message: str) -> None:
        if message != self.watch_error:
            log.error("%s; retrying", message)
        self.watch_error = message
        if self._watch_failing_since is None:
            self._watch_failing_since = time.monotonic()

    def current(self) -> KeySet:
        if self.watched is not None and (
            self._watch_failing_since is None
            or time.monotonic() - self._watch_failing_since < WATCH_FALLBACK_SECONDS
        ):
            return self.watched
        now = time.monotonic()
        if now - self._checked >= KEY_RELOAD_SECONDS:
            self._refresh()
            self._checked = now
        return self.keys


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _store(config: LimitStoreConfig, namespace: str, deployment: str) -> LimitStore:
    if config.redis_url is None:
        return LocalLimitStore()
    password, unusable = None, None
    if config.redis_password_file is not None:
        password = Path(config.redis_password_file).read_text().strip()
    if config.redis_password_secret is not None:
        password = os.environ.get(REDIS_PASSWORD_ENV) or None
        if password is None:
            secret = config.redis_password_secret
            unusable = (
                f"its password (Secret {secret.name!r}, key {secret.key!r}) is not in ${REDIS_PASSWORD_ENV}"
            )
    # one deployment's counters never mix with another's that shares the server
    prefix = f"{config.key_prefix}:{namespace}/{deployment}"
    return RedisLimitStore(config.redis_url, prefix, config.timeout_seconds, password, unusable)


def _audit_log(config: AuditConfig) -> AuditLog | None:
    if not config.enabled:
        return None
    path = Path(config.path) if config.path is not None else None
    return AuditLog(path, to_stdout=config.stdout, max_bytes=config.max_bytes, keep_files=config.keep_files)


def _count(usage: Any, field_name: str) -> int:
    value = usage.get(field_name) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class AccessControl:
    """Keys, limits, usage and audit of one gateway process; reconfigured on config reload."""

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.deployment = config.deployment
        self.namespace = config.namespace
        self.settings: AccessConfig = config.access
        self.keyring = KeyRing(Path(config.access.keys_file) if config.access.keys_file else None)
        self.store: LimitStore = _store(config.access.store, config.namespace, config.deployment)
        self.audit_log = _audit_log(config.access.audit)
        self.pricing = {version.name: version.pricing for version in config.versions}
        self.store_problem: str | None = None
        self._retired: list[LimitStore] = []

    def configure(self, config: GatewayConfig) -> None:
        previous = self.settings
        self.settings = config.access
        self.deployment, self.namespace = config.deployment, config.namespace
        self.pricing = {version.name: version.pricing for version in config.versions}
        if config.access.keys_file != previous.keys_file:
            replaced = self.keyring
            self.keyring = KeyRing(Path(config.access.keys_file) if config.access.keys_file else None)
            if config.access.keys_secret == previous.keys_secret:  # what the watch saw stays true
                self.keyring.watched = replaced.watched
                self.keyring.watched_signing_key = replaced.watched_signing_key
        if config.access.store != previous.store:
            self._retired.append(self.store)
            self.store = _store(config.access.store, config.namespace, config.deployment)
        if config.access.audit != previous.audit:
            if self.audit_log is not None:
                self.audit_log.close()
            self.audit_log = _audit_log(config.access.audit)

    def key_watch(self, on_signing_key: Callable[[bytes], None] | None = None) -> KeySecretWatch | None:
        """The watch of the key Secret that ``access.keysSecret`` names; None without one. What it sees
        goes to the key ring in use then (a config reload may replace it), a signing key in the
        Secret to ``on_signing_key``."""
        name = self.settings.keys_secret
        if name is None:
            return None
        source = f"Secret {self.namespace}/{name}"

        def seen(content: SecretContent | None) -> None:
            self.keyring.watched_secret(content, source)
            if on_signing_key is not None and content is not None and content.signing_key:
                on_signing_key(content.signing_key)

        return KeySecretWatch(self.namespace, name, seen, lambda message: self.keyring.watch_failed(message))

    def shared_statistics(self) -> SharedStatistics | None:
        """Where experiment statistics are shared by the replicas: the limit store's Redis, if any."""
        if isinstance(self.store, RedisLimitStore):
            return SharedStatistics(self.store.client, self.store.prefix)
        return None

    def shared_redis(self) -> tuple[Redis, str] | None:
        """The limit store's Redis client and key prefix, when it is Redis (shared by the replicas)."""
        if isinstance(self.store, RedisLimitStore):
            return self.store.client, self.store.prefix
        return None

    @property
    def auth_on(self) -> bool:
        auth = self.settings.auth
        return auth == "required" or (auth == "whenKeysExist" and not self.keyring.current().empty)

    def authenticate(self, exchange: Exchange, authorization: str | None, scope: Scope) -> None:
        """Sets the exchange's principal; 401 for a missing or wrong key, 403 without ``scope``."""
        if not self.auth_on:
            return
        token = _bearer(authorization)
        if token is None:
            raise GatewayError(
                401,
                "no API key: send it as 'Authorization: Bearer kt-...' "
                "(create one with `kubetune keys create`)",
                error_type="invalid_request_error",
                code="invalid_api_key",
            )
        record = self.keyring.current().lookup(token)
        if record is None:
            raise GatewayError(
                401,
                "incorrect API key provided (it is unknown, malformed or revoked)",
                error_type="invalid_request_error",
                code="invalid_api_key",
            )
        exchange.principal = Principal(record.id, record.tenant, record.scopes)
        if not record.allows(scope):
            granted = ", ".join(sorted(s.value for s in record.scopes))
            raise GatewayError(
                403,
                f"the key {record.id} lacks the scope {scope.value!r} this endpoint needs "
                f"(it has: {granted})",
                error_type="invalid_request_error",
                code="insufficient_permissions",
            )

    async def admit(self, exchange: Exchange) -> None:
        """Debit the request rates, or raise 429 (limits) / 503 (store down, failClosed)."""
        limits = self.settings.limits
        if not limits.any:
            return
        principal = exchange.principal
        rules = principal_rules(limits, principal.key_id, principal.tenant)
        if not rules:
            return
        try:
            refusal = await self.store.admit(rules)
        except LimitStoreUnavailable as exc:
            self._store_failed(exc)
            return
        self._store_ok()
        exchange.rules = rules
        if refusal is None:
            return
        rule = refusal.rule
        who = f"key {principal.key_id}" if rule.subject.startswith("key:") else f"tenant {principal.tenant!r}"
        if refusal.is_budget:
            raise GatewayError(
                429,
                f"{who} has used its {rule.name} budget of {rule.limit:g}; "
                f"it renews in {refusal.retry_after_seconds}s",
                error_type="insufficient_quota",
                code="insufficient_quota",
                retry_after=refusal.retry_after_seconds,
            )
        raise GatewayError(
            429,
            f"rate limit reached for {who}: {rule.name} {rule.limit:g}; "
            f"retry in {refusal.retry_after_seconds}s",
            error_type="tokens" if rule.measure is Measure.TOKENS else "requests",
            code="rate_limit_exceeded",
            retry_after=refusal.retry_after_seconds,
        )

    def _store_failed(self, exc: LimitStoreUnavailable) -> None:
        behaviour = self.settings.store.on_unavailable
        if self.store_problem != str(exc):
            log.error(
                "%s; %s",
                exc,
                "refusing requests (failClosed)"
                if behaviour == "failClosed"
                else "serving without limits (failOpen)",
            )
        self.store_problem = str(exc)
        self.metrics.child(self.metrics.limit_store_up, self.deployment).set(0)
        self.metrics.child(self.metrics.limit_store_failures, self.deployment, behaviour).inc()
        if behaviour == "failClosed":
            raise GatewayError(
                503,
                "the gateway cannot check this request's limits now (its limit store is "
                "unreachable); retry shortly",
                error_type="service_unavailable",
                code="limit_store_unavailable",
                retry_after=1,
            )

    async def limit_store_refuses(self) -> str | None:
        """Why requests are refused for want of the limit store now (failClosed, Redis unreachable),
        else None. Asks Redis itself while it is known to be failing, so the answer recovers without
        traffic (an unready gateway gets none)."""
        settings = self.settings
        if not settings.limits.any or not isinstance(self.store, RedisLimitStore):
            return None
        if self.store_problem is not None:
            try:
                await self.store.ping()
            except LimitStoreUnavailable as exc:
                self.store_problem = str(exc)
                self.metrics.child(self.metrics.limit_store_up, self.deployment).set(0)
            else:
                self._store_ok()
        if self.store_problem is None or settings.store.on_unavailable != "failClosed":
            return None
        return f"{self.store_problem}; requests are refused until it answers (failClosed)"

    def _store_ok(self) -> None:
        if self.store_problem is not None:
            log.info("the limit store answers again")
            self.store_problem = None
        self.metrics.child(self.metrics.limit_store_up, self.deployment).set(1)

    async def charge(self, exchange: Exchange, usage: Any) -> None:
        """Record the answer's tokens and cost, and debit them from the rates and budgets."""
        exchange.prompt_tokens = _count(usage, "prompt_tokens")
        exchange.completion_tokens = _count(usage, "completion_tokens")
        pricing = self.pricing.get(exchange.version)
        if pricing is not None:
            exchange.cost = pricing.cost(exchange.prompt_tokens, exchange.completion_tokens)
        tokens = exchange.prompt_tokens + exchange.completion_tokens
        if exchange.rules and (tokens or exchange.cost):
            try:
                await self.store.charge(exchange.rules, tokens, exchange.cost)
            except LimitStoreUnavailable as exc:
                # the answer is already given; the failure is reported, never silent
                self.store_problem = str(exc)
                log.error("%s; the tokens of %s were not counted", exc, exchange.request_id)
                self.metrics.child(self.metrics.limit_store_up, self.deployment).set(0)
                self.metrics.child(self.metrics.limit_store_failures, self.deployment, "uncharged").inc()

    def finish(self, exchange: Exchange, status: int) -> None:
        """Count the request in the usage metrics and write its audit line (once)."""
        if exchange.finished:
            return
        exchange.finished = True
        principal = exchange.principal
        labels = (self.deployment, exchange.version, principal.key_id, principal.tenant)
        metrics = self.metrics
        metrics.child(metrics.usage_requests, *labels, exchange.decision).inc()
        if exchange.prompt_tokens:
            metrics.child(metrics.usage_tokens, *labels, "in").inc(exchange.prompt_tokens)
        if exchange.completion_tokens:
            metrics.child(metrics.usage_tokens, *labels, "out").inc(exchange.completion_tokens)
        if exchange.cost:
            metrics.child(metrics.usage_cost, *labels).inc(exchange.cost)
        if self.audit_log is not None:
            self.audit_log.write(
                {
                    "time": time.time(),
                    "requestId": exchange.request_id,
                    "keyId": principal.key_id,
                    "tenant": principal.tenant,
                    "deployment": self.deployment,
                    "namespace": self.namespace,
                    "version": exchange.version,
                    "endpoint": exchange.endpoint,
                    "decision": exchange.decision,
                    "status": status,
                    "promptTokens": exchange.prompt_tokens,
                    "completionTokens": exchange.completion_tokens,
                    "cost": exchange.cost,
                    "latencyMs": round((time.perf_counter() - exchange.started) * 1000, 3),
                    **({"guards": exchange.guards} if exchange.guards else {}),
                    **self._content(exchange),
                }
            )

    def _content(self, exchange: Exchange) -> dict[str, Any]:
        """The audit line's prompt and completion (already redacted), when access.audit.logContent."""
        if not self.settings.audit.log_content:
            return {}
        content: dict[str, Any] = {}
        if exchange.prompt is not None:
            content["prompt"] = exchange.prompt
        if exchange.completion is not None:
            content["completion"] = exchange.completion
        return content

    async def close(self) -> None:
        for store in [*self._retired, self.store]:
            await store.close()
        if self.audit_log is not None:
            self.audit_log.close()
