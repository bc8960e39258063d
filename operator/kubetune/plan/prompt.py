"""What a ModelDeployment version sends its model for an input (``kubetune prompt render``).

The gateway's own path: the version's prompt as the gateway config holds it (``prompt_config``), applied
by ``kubetune.gateway.prompts.apply_prompt`` to a chat request with the input as its one user message,
so the messages shown are the ones the gateway sends for that request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune.gateway.config import PromptConfig
from kubetune.gateway.fewshot import PoolCache
from kubetune.gateway.generation import CHAT_ENDPOINT
from kubetune.gateway.prompts import apply_prompt
from kubetune.plan.gateway import prompt_config
from kubetune_contract.deployment import ModelDeployment


class RenderError(ValueError):
    """What to render cannot be found: the message says what is missing."""


class UnknownVersion(RenderError):
    """The deployment has no version of that name (the message lists the versions)."""


def version_prompt(deployment: ModelDeployment, version: str) -> PromptConfig | None:
    """The prompt ``version`` applies, as its gateway holds it; None when it applies none."""
    spec = deployment.spec
    found = next((entry for entry in spec.versions if entry.name == version), None)
    if found is None:
        known = ", ".join(entry.name for entry in spec.versions)
        raise UnknownVersion(
            f"ModelDeployment/{deployment.metadata.name} has no version {version!r} (versions: {known})"
        )
    if found.prompt is None:
        return None
    template = next(prompt for prompt in spec.prompts if prompt.name == found.prompt)
    return PromptConfig.model_validate(prompt_config(template, spec.prompt_parts))


def render_request(
    deployment: ModelDeployment, version: str, user_input: str, fields: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The chat request body the gateway sends ``version`` for ``user_input`` as the one user message,
    with the request's other ``fields`` (``response_format``, ``tools``, ``metadata``, ...)."""
    body: dict[str, Any] = {
        **(fields or {}),
        "model": deployment.metadata.name,
        "messages": [{"role": "user", "content": user_input}],
    }
    applied = apply_prompt(
        CHAT_ENDPOINT,
        body,
        version_prompt(deployment, version),
        version,
        PoolCache(),
        deployment.spec.generation.context_window.max_prompt_tokens,
    )
    return applied.body
