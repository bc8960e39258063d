"""The gateway's configuration file (``gateway.json``) and its live reloader.

The operator renders this file from a ModelDeployment (ConfigMap key ``gateway.json`` on a cluster,
a plain file locally); the gateway re-reads it when it changes, so weights move during a rollout
without a restart. Unlike a resource ``spec`` it may hold floats. Field names are camelCase on the
wire and unknown fields are rejected, so a typo never silently does nothing.

Version weights are relative shares (``weight / sum(weights)``); the operator writes them summing
to 100, and a version with weight 0 only receives requests pinned to it with the override header.
A version is routed to only while it is ready: the operator marks a version whose server does not
answer yet ``ready: false``, and the gateway itself takes a version it cannot connect to out of
routing for ``health.markDownSeconds``. Every wait on a version is bounded by a ``timeouts`` setting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import httpx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from kubetune.gateway.access.keys import KEY_FILE_NAME
from kubetune_contract.deployment import GENERATED_PROMPT_PARTS, ContextWindow
from kubetune_contract.guardrails import Guardrails

log = logging.getLogger(__name__)

VERSION_NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
HEADER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
TEMPLATE_VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
INPUT_VARIABLE = "input"
DEFAULT_MAX_PROMPT_TOKENS = ContextWindow().max_prompt_tokens


class GatewayConfigError(ValueError):
    """The gateway config file is missing, not JSON, or not a valid GatewayConfig."""


def _check_version_name(name: str) -> str:
    if len(name) > 20 or not VERSION_NAME_PATTERN.match(name):
        raise ValueError(
            f"{name!r} is not a valid version name (a DNS label of at most 20 characters: "
            "lowercase letters, digits and '-', starting and ending with a letter or digit)"
        )
    return name


def _check_header_name(name: str) -> str:
    if not HEADER_NAME_PATTERN.match(name):
        raise ValueError(f"{name!r} is not a valid HTTP header name")
    return name.lower()


def _check_upstream_url(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"{url!r} is not a valid URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{url!r} must be an absolute http:// or https:// URL")
    if parsed.query or parsed.fragment:
        raise ValueError(f"{url!r} must not have a query or fragment")
    return url.rstrip("/")


VersionName = Annotated[str, AfterValidator(_check_version_name)]
HeaderName = Annotated[str, AfterValidator(_check_header_name)]
UpstreamUrl = Annotated[str, AfterValidator(_check_upstream_url)]


class GatewayModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields rejected, immutable."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Pricing(GatewayModel):
    """A version's price, which turns its tokens into cost (usage metrics, cost budgets)."""

    input_per_million: float = Field(default=0, ge=0, description="Price of 1M prompt tokens.")
    output_per_million: float = Field(default=0, ge=0, description="Price of 1M completion tokens.")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / 1e6


class ModelCardLinks(GatewayModel):
    """The model card a kubetune-published model carries (MODEL_CARD.md and model-card.json beside it)."""

    markdown: str = Field(min_length=1, description="URI of MODEL_CARD.md.")
    json_uri: str = Field(min_length=1, alias="json", description="URI of model-card.json.")


class VersionConfig(GatewayModel):
    name: VersionName
    url: UpstreamUrl = Field(description="Base URL of the version's OpenAI-compatible server.")
    weight: int = Field(ge=0, le=100)
    prompt: str | None = Field(default=None, description="Name of a prompts[] entry.")
    ready: bool = Field(
        default=True,
        description="False while the version's server does not answer: it gets no traffic, its share "
        "goes to the ready versions, and with none ready the gateway answers 503 with Retry-After.",
    )
    pricing: Pricing | None = Field(default=None, description="Cost of the version's tokens; none: free.")
    model_card: ModelCardLinks | None = Field(
        default=None, description="Where the model card of the version's published model is."
    )


class RoutingConfig(GatewayModel):
    sticky_by: Literal["user", "header"] = "user"
    header: HeaderName | None = None
    override_header: HeaderName = "x-kubetune-version"

    @model_validator(mode="after")
    def _header_when_sticky_by_header(self) -> RoutingConfig:
        if self.sticky_by == "header" and self.header is None:
            raise ValueError("header is required when stickyBy is 'header'")
        return self


class GenerationDefaults(GatewayModel):
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)


class GenerationLimits(GatewayModel):
    max_temperature: float | None = Field(default=None, ge=0)
    max_top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)


class GenerationConfig(GatewayModel):
    defaults: GenerationDefaults = GenerationDefaults()
    limits: GenerationLimits = GenerationLimits()
    max_prompt_tokens: int = Field(
        default=DEFAULT_MAX_PROMPT_TOKENS,
        ge=1,
        description="Most prompt tokens sent to a version; few-shot examples from a pool are left out "
        "rather than go past it.",
    )

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> GenerationConfig:
        checks = [
            ("temperature", self.defaults.temperature, "maxTemperature", self.limits.max_temperature),
            ("topP", self.defaults.top_p, "maxTopP", self.limits.max_top_p),
            ("maxTokens", self.defaults.max_tokens, "maxTokens", self.limits.max_tokens),
        ]
        for default_name, default, limit_name, limit in checks:
            if default is not None and limit is not None and default > limit:
                raise ValueError(f"defaults.{default_name} {default} is above limits.{limit_name} {limit}")
        return self


class PromptExample(GatewayModel):
    user: str
    assistant: str


class FewShotConfig(GatewayModel):
    """Examples chosen per request from a JSONL pool (the gateway's ``fewshot`` module)."""

    uri: str = Field(min_length=1, description="A local path or file:// URI of the pool.")
    k: int = Field(default=3, ge=1, description="Most examples a request gets.")
    select: Literal["similar", "random", "fixed"] = "similar"


class ReasoningConfig(GatewayModel):
    """Markers around reasoning the version's model server keeps from the client."""

    open: str = Field(min_length=1)
    close: str = Field(min_length=1)


class SystemPartConfig(GatewayModel):
    """One part of a composed system message: a promptParts entry's text (resolved by the operator),
    or, without text, a part the gateway generates per request (``GENERATED_PROMPT_PARTS``)."""

    name: str = Field(min_length=1)
    text: str | None = None

    @model_validator(mode="after")
    def _text_or_generated(self) -> SystemPartConfig:
        if self.text is None and self.name not in GENERATED_PROMPT_PARTS:
            raise ValueError(
                f"part {self.name!r} needs text (only {', '.join(GENERATED_PROMPT_PARTS)} are generated)"
            )
        return self


class PrincipleConfig(GatewayModel):
    name: str = Field(min_length=1)
    text: str = Field(min_length=1)


class ConstitutionConfig(GatewayModel):
    """Critique and revise (the gateway's ``constitution`` module)."""

    principles: list[PrincipleConfig] = Field(min_length=1)
    revise: bool = True


class PromptConfig(GatewayModel):
    """A version's prompt: system message, few-shot examples and a template for the last user turn."""

    name: str = Field(min_length=1)
    system_parts: list[SystemPartConfig] = Field(
        default=[], description="Parts of the system message, before system."
    )
    system: str | None = None
    template: str | None = Field(
        default=None,
        description="Applied to the last user message; {{input}} is that message, other {{vars}} come "
        "from the request's metadata object.",
    )
    examples: list[PromptExample] = []
    few_shot: FewShotConfig | None = None
    reasoning: ReasoningConfig | None = None
    constitution: ConstitutionConfig | None = None

    @model_validator(mode="after")
    def _template_uses_input(self) -> PromptConfig:
        if self.template is not None and INPUT_VARIABLE not in self.template_variables():
            raise ValueError(
                "template must contain {{input}} (the user's message), otherwise the message would be dropped"
            )
        return self

    def template_variables(self) -> list[str]:
        """Variable names the template uses, in order of first use."""
        if self.template is None:
            return []
        return list(dict.fromkeys(TEMPLATE_VARIABLE.findall(self.template)))


class CacheConfig(GatewayModel):
    enabled: bool = False
    ttl_seconds: float = Field(default=300, gt=0)
    max_entries: int = Field(default=1024, ge=1)


class FallbackConfig(GatewayModel):
    version: VersionName
    timeout_seconds: float = Field(
        default=30,
        gt=0,
        description="While a fallback can step in, a version that has not answered within this time is "
        "given up on; the fallback's own attempt is bounded by it too, so a request that falls back "
        "waits at most twice this.",
    )


class TimeoutsConfig(GatewayModel):
    """Every wait on a version, bounded; a 504 names the setting that ran out."""

    connect_seconds: float = Field(default=5, gt=0, description="Opening a connection to a version.")
    first_byte_seconds: float = Field(
        default=60,
        gt=0,
        description="From sending a request to the answer's headers (a stream's: its first chunk).",
    )
    response_seconds: float = Field(default=60, gt=0, description="A whole non-streaming answer.")
    stream_idle_seconds: float = Field(default=60, gt=0, description="A stream's silence between two chunks.")


class HealthConfig(GatewayModel):
    mark_down_seconds: float = Field(
        default=5,
        gt=0,
        description="A version the gateway cannot connect to gets no traffic for this long (its share "
        "goes to the others); also the Retry-After of a 503 while no version is ready.",
    )


class ScaleFromZeroConfig(GatewayModel):
    """Versions scale to zero (spec.serving.autoscaling.minReplicas 0): requests for a version that is not
    ready are held until it is (kubetune.gateway.cold_start), not routed elsewhere."""

    max_held_requests: int = Field(default=100, ge=1, description="Most requests held per version.")
    hold_seconds: float = Field(default=120, gt=0, description="Longest a request is held, then 503.")


class RateLimits(GatewayModel):
    """Limits on one key or tenant; unset: no limit of that kind."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1, description="Prompt + completion tokens.")
    tokens_per_day: int | None = Field(default=None, ge=1, description="Per UTC day.")
    tokens_per_month: int | None = Field(default=None, ge=1, description="Per UTC calendar month.")
    cost_per_day: float | None = Field(default=None, gt=0, description="In the versions' pricing unit.")
    cost_per_month: float | None = Field(default=None, gt=0, description="In the versions' pricing unit.")

    @property
    def any(self) -> bool:
        return any(value is not None for value in self.model_dump().values())


class LimitsConfig(GatewayModel):
    per_key: RateLimits = Field(default_factory=RateLimits, description="Applies to every key on its own.")
    per_tenant: RateLimits = Field(
        default_factory=RateLimits, description="Applies to all keys of a tenant together."
    )
    tenants: dict[str, RateLimits] = Field(
        default_factory=dict, description="Per-tenant limits that replace perTenant for that tenant."
    )

    @property
    def any(self) -> bool:
        return self.per_key.any or self.per_tenant.any or any(limits.any for limits in self.tenants.values())


REDIS_PASSWORD_ENV = "KUBETUNE_REDIS_PASSWORD"


class SecretKeySelector(GatewayModel):
    """A key of a Secret in the gateway's namespace."""

    name: str = Field(min_length=1, description="The Secret's name.")
    key: str = Field(min_length=1, description="The key within the Secret.")


class LimitStoreConfig(GatewayModel):
    redis_url: str | None = Field(
        default=None,
        pattern=r"^(redis|rediss|unix)://",
        description="Redis the replicas share the counters in; none: counters in this process.",
    )
    redis_password_file: str | None = Field(default=None, description="File holding Redis's password.")
    redis_password_secret: SecretKeySelector | None = Field(
        default=None,
        description=f"The Secret key holding Redis's password. The gateway reads the password from "
        f"${REDIS_PASSWORD_ENV}, which a cluster sets from this Secret (locally: export it); unset "
        "there, the store is reported unavailable rather than asked without a password.",
    )
    key_prefix: str = Field(default="kubetune", min_length=1, description="Prefix of every Redis key.")
    on_unavailable: Literal["failOpen", "failClosed"] = Field(
        default="failClosed",
        description="When Redis cannot be asked: failClosed answers 503, failOpen serves unlimited; "
        "either way it is logged, counted and shown by /healthz.",
    )
    timeout_seconds: float = Field(default=0.25, gt=0, description="Bound on one Redis call.")


class AuditConfig(GatewayModel):
    path: str | None = Field(default=None, description="Audit log file (JSON lines, hash-chained).")
    stdout: bool = Field(default=False, description="Also write every audit line to stdout.")
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="Rotate the file past this size.")
    keep_files: int = Field(default=10, ge=1, description="Rotated files kept (path.1 is the newest).")
    log_content: bool = Field(
        default=False,
        description="Also write the prompt and completion, PII-redacted (never unredacted).",
    )

    @property
    def enabled(self) -> bool:
        return self.path is not None or self.stdout


class AccessConfig(GatewayModel):
    """Who may call the gateway, how much, and the record of what they did."""

    auth: Literal["required", "disabled", "whenKeysExist"] = Field(
        default="whenKeysExist",
        description="required: every request needs a key; disabled: none does; whenKeysExist: keys "
        "are required once the key file holds one (local mode: open until the first key).",
    )
    keys_file: str | None = Field(
        default=None,
        description="The key file (hashes only); reloaded on change. Absent or empty with auth "
        "required: every request is refused (401), never let through.",
    )
    keys_secret: str | None = Field(
        default=None,
        description=f"The Secret (in the gateway's namespace) whose key {KEY_FILE_NAME!r} is the key "
        "file, watched through the Kubernetes API (in-cluster or $KUBECONFIG) so a created or revoked "
        "key applies within seconds; keysFile, its mounted copy, is the start state and the fallback "
        "while the watch fails.",
    )
    signing_key_file: str | None = Field(
        default=None,
        description="HMAC key signing response ids, shared by replicas so any accepts feedback; "
        "none: a key of this process.",
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    store: LimitStoreConfig = Field(default_factory=LimitStoreConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)


class FeedbackCaptureConfig(GatewayModel):
    """spec.feedback: the content of rated completions kept (kubetune.gateway.capture)."""

    capture: bool = Field(default=False, description="Keep prompt and completion of rated completions.")
    max_records: int = Field(default=10_000, ge=1, description="Most rated records kept.")
    max_age_seconds: float = Field(default=30 * 24 * 3600.0, gt=0, description="Rated records' lifetime.")
    window_seconds: float = Field(default=3600.0, gt=0, description="How long content waits for feedback.")
    path: str | None = Field(
        default=None,
        description="File of the rated records when access.store has no Redis (local: under "
        "$KUBETUNE_HOME); none and no Redis: this process's memory.",
    )


class GatewayConfig(GatewayModel):
    deployment: str = Field(min_length=1)
    namespace: str = "default"
    versions: list[VersionConfig] = Field(min_length=1)
    control: VersionName | None = Field(
        default=None, description="Version the experiments compare against (default: the first)."
    )
    routing: RoutingConfig = RoutingConfig()
    generation: GenerationConfig = GenerationConfig()
    prompts: list[PromptConfig] = []
    cache: CacheConfig = CacheConfig()
    fallback: FallbackConfig | None = None
    timeouts: TimeoutsConfig = TimeoutsConfig()
    health: HealthConfig = HealthConfig()
    scale_from_zero: ScaleFromZeroConfig | None = Field(
        default=None, description="Set when the versions scale to zero: hold their requests while they start."
    )
    access: AccessConfig = Field(default_factory=AccessConfig)
    feedback: FeedbackCaptureConfig = Field(default_factory=FeedbackCaptureConfig)
    guardrails: Guardrails | None = Field(
        default=None, description="The deployment's spec.guardrails as written (the guards package runs it)."
    )

    @model_validator(mode="after")
    def _references_resolve(self) -> GatewayConfig:
        version_names = [version.name for version in self.versions]
        duplicates = sorted({name for name in version_names if version_names.count(name) > 1})
        if duplicates:
            raise ValueError(f"versions: names must be unique, repeated: {', '.join(duplicates)}")
        if sum(version.weight for version in self.versions) == 0:
            raise ValueError("versions: at least one version needs a weight above 0")
        prompt_names = [prompt.name for prompt in self.prompts]
        repeated_prompts = sorted({name for name in prompt_names if prompt_names.count(name) > 1})
        if repeated_prompts:
            raise ValueError(f"prompts: names must be unique, repeated: {', '.join(repeated_prompts)}")
        known = ", ".join(version_names)
        if self.control is not None and self.control not in version_names:
            raise ValueError(f"control: {self.control!r} is not a version (known: {known})")
        if self.fallback is not None and self.fallback.version not in version_names:
            raise ValueError(f"fallback.version: {self.fallback.version!r} is not a version (known: {known})")
        for index, version in enumerate(self.versions):
            if version.prompt is not None and version.prompt not in prompt_names:
                raise ValueError(
                    f"versions[{index}].prompt: {version.prompt!r} is not in prompts "
                    f"(known: {', '.join(prompt_names) or 'none'})"
                )
        return self

    @property
    def control_version(self) -> str:
        return self.control if self.control is not None else self.versions[0].name

    def version(self, name: str) -> VersionConfig:
        for version in self.versions:
            if version.name == name:
                return version
        raise KeyError(name)

    def prompt_for(self, version_name: str) -> PromptConfig | None:
        prompt_name = self.version(version_name).prompt
        if prompt_name is None:
            return None
        return next(prompt for prompt in self.prompts if prompt.name == prompt_name)


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        lines.append(f"{location}: {item['msg']}" if location else item["msg"])
    return "; ".join(lines)


def parse_gateway_config(text: str | bytes, source: str = "gateway config") -> GatewayConfig:
    """Parse and validate the JSON text of a gateway config; errors name the source and the field."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GatewayConfigError(f"{source}: not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise GatewayConfigError(f"{source}: must be a JSON object, got {type(document).__name__}")
    try:
        return GatewayConfig.model_validate(document)
    except ValidationError as exc:
        raise GatewayConfigError(f"{source}: {_format_validation_error(exc)}") from exc


def load_gateway_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate a gateway config file."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise GatewayConfigError(f"{path}: cannot read gateway config: {exc.strerror or exc}") from exc
    return parse_gateway_config(text, str(path))


@dataclass(frozen=True)
class _FileSignature:
    mtime_ns: int
    size: int
    inode: int


def _signature(path: Path) -> _FileSignature:
    # stat follows symlinks, so a ConfigMap update (an atomic swap of the ..data link) shows up here.
    stat = path.stat()
    return _FileSignature(stat.st_mtime_ns, stat.st_size, stat.st_ino)


ConfigListener = Callable[[GatewayConfig], None]


class ConfigReloader:
    """Holds the current config of a file and re-reads it when the file changes.

    ``poll()`` checks the file once (stat, then a read only when size, mtime or inode changed);
    ``run()`` polls every ``interval_seconds`` until cancelled. A new file that is not a valid config
    is logged and the last good config kept, so a bad edit never takes the gateway down.
    """

    def __init__(self, path: str | os.PathLike[str], interval_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.interval_seconds = interval_seconds
        # one read: the config in use and the content compared on later polls are the same bytes
        self._signature = _signature(self.path)
        try:
            self._content = self.path.read_bytes()
        except OSError as exc:
            raise GatewayConfigError(
                f"{self.path}: cannot read gateway config: {exc.strerror or exc}"
            ) from exc
        self._current = parse_gateway_config(self._content, str(self.path))
        self._listeners: list[ConfigListener] = []
        self.last_error: str | None = None

    @property
    def current(self) -> GatewayConfig:
        return self._current

    def subscribe(self, listener: ConfigListener) -> None:
        """Call ``listener(config)`` after every successful reload."""
        self._listeners.append(listener)

    def poll(self) -> bool:
        """Check the file once; True when a new config was loaded."""
        try:
            signature = _signature(self.path)
        except OSError as exc:
            self._report(
                f"{self.path}: cannot stat gateway config ({exc.strerror}); keeping the last good one"
            )
            return False
        if signature == self._signature:
            return False
        try:
            content = self.path.read_bytes()
        except OSError as exc:
            self._report(
                f"{self.path}: cannot read gateway config ({exc.strerror}); keeping the last good one"
            )
            return False
        self._signature = signature
        if content == self._content:
            return False
        self._content = content
        try:
            config = parse_gateway_config(content, str(self.path))
        except GatewayConfigError as exc:
            self._report(f"{exc}; keeping the last good config")
            return False
        self._current = config
        self.last_error = None
        log.info("reloaded gateway config %s", self.path)
        for listener in self._listeners:
            listener(config)
        return True

    def _report(self, message: str) -> None:
        if message != self.last_error:
            log.error("%s", message)
        self.last_error = message

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_seconds)
            try:
                self.poll()
            except Exception:
                log.exception("gateway config reload of %s failed; keeping the last good config", self.path)
