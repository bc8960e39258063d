"""The serving runtime's settings, read from the environment of the serving process."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

from kubetune_components.common.errors import ConfigError
from kubetune_contract.serving import (
    CONTEXT_OVERFLOW_ENV,
    DEPLOYMENT_ENV,
    MAX_BATCH_SIZE_ENV,
    MAX_LATENCY_MS_ENV,
    MAX_PROMPT_TOKENS_ENV,
    MODEL_DIR_ENV,
    MODEL_ID_ENV,
    VERSION_ENV,
)

UNKNOWN = "unknown"

ContextOverflow = Literal["truncate", "refuse"]
CONTEXT_OVERFLOWS: tuple[str, ...] = ("truncate", "refuse")
DEFAULT_MAX_BATCH_SIZE = 1
DEFAULT_MAX_LATENCY_MS = 50


def _int_env(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    """The integer in `name`, None when unset or empty."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class RuntimeLimits:
    """How prompts are fitted into the context window and how requests are batched."""

    max_prompt_tokens: int | None = None
    """None: as many as the model's context holds (leaving room for one generated token)."""
    context_overflow: ContextOverflow = "truncate"
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    """1 turns batching off."""
    max_latency_ms: int = DEFAULT_MAX_LATENCY_MS
    """How long a request waits for others to join its batch."""


@dataclass(frozen=True)
class ServingSettings:
    model_dir: str | None
    deployment: str
    version: str
    model_id: str
    limits: RuntimeLimits

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        default_deployment: str = UNKNOWN,
        default_version: str = UNKNOWN,
    ) -> ServingSettings:
        """Every variable is optional; a malformed one raises ConfigError naming it."""
        source = os.environ if env is None else env
        overflow = source.get(CONTEXT_OVERFLOW_ENV, "").strip() or "truncate"
        if overflow not in CONTEXT_OVERFLOWS:
            raise ConfigError(
                f"{CONTEXT_OVERFLOW_ENV} must be one of {', '.join(CONTEXT_OVERFLOWS)}, got {overflow!r}"
            )
        max_batch_size = _int_env(source, MAX_BATCH_SIZE_ENV, 1)
        max_latency_ms = _int_env(source, MAX_LATENCY_MS_ENV, 0)
        limits = RuntimeLimits(
            max_prompt_tokens=_int_env(source, MAX_PROMPT_TOKENS_ENV, 1),
            context_overflow=cast(ContextOverflow, overflow),
            max_batch_size=DEFAULT_MAX_BATCH_SIZE if max_batch_size is None else max_batch_size,
            max_latency_ms=DEFAULT_MAX_LATENCY_MS if max_latency_ms is None else max_latency_ms,
        )
        deployment = source.get(DEPLOYMENT_ENV, "").strip() or default_deployment
        return cls(
            model_dir=source.get(MODEL_DIR_ENV, "").strip() or None,
            deployment=deployment,
            version=source.get(VERSION_ENV, "").strip() or default_version,
            model_id=source.get(MODEL_ID_ENV, "").strip() or deployment,
            limits=limits,
        )
