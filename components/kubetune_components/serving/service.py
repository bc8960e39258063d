"""The BentoML service of one model version: the OpenAI-compatible API, mounted on BentoML's server.

    KUBETUNE_MODEL_DIR=/models/support-router/v3 KUBETUNE_DEPLOYMENT=support-bot KUBETUNE_VERSION=tuned \\
        bentoml serve kubetune_components.serving.service:LLMService --host 127.0.0.1 --port 3001

or, from a Bento built by `kubetune_components.serving.bento.build_bento`:

    BENTOML_HOME=/bentoml bentoml serve support-bot-tuned:<version-id> --host 0.0.0.0 --port 3000

The model is KUBETUNE_MODEL_DIR when it is set, otherwise the Bento's model (alias
`kubetune-model`). It loads on a background thread when the worker starts: /livez answers at once,
/readyz only once the model is loaded (and /livez fails if loading failed, so Kubernetes restarts
the pod). BentoML's /metrics carries the kubetune_serving_* series.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

# BentoML reports usage to bentoml.com unless told not to; a model server stays quiet (and offline).
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml
from bentoml.exceptions import NotFound

from kubetune_components.common import storage
from kubetune_components.common.errors import ComponentError, ConfigError
from kubetune_components.serving.config import UNKNOWN, ServingSettings
from kubetune_components.serving.openai_api import RuntimeSlot, ServingIdentity, create_app
from kubetune_components.serving.runtime import ModelRuntime
from kubetune_contract.serving import DEPLOYMENT_LABEL, MODEL_ALIAS, MODEL_DIR_ENV, VERSION_LABEL

logger = logging.getLogger(__name__)

GENERATION_TIMEOUT_S = 600
"""BentoML cuts requests off after its traffic timeout; long generations on CPUs need minutes."""

slot = RuntimeSlot()
app = create_app(slot)


def bento_model() -> tuple[Path, dict[str, str]] | None:
    """(directory, labels) of the Bento's model when this service runs from a kubetune Bento."""
    try:
        model = bentoml.models.get(MODEL_ALIAS)
    except NotFound:
        return None
    return Path(model.path), {str(key): str(value) for key, value in model.info.labels.items()}


def resolve_model(env: dict[str, str] | None = None) -> tuple[Path, ServingSettings]:
    """The model directory to serve and the settings, from the environment and the Bento."""
    source = dict(os.environ) if env is None else env
    from_bento = bento_model()
    labels = from_bento[1] if from_bento is not None else {}
    settings = ServingSettings.from_env(
        source,
        default_deployment=labels.get(DEPLOYMENT_LABEL, UNKNOWN),
        default_version=labels.get(VERSION_LABEL, UNKNOWN),
    )
    if settings.model_dir is not None:
        path = storage.resolve_local_path(settings.model_dir)
        if not path.is_dir():
            raise ConfigError(f"{MODEL_DIR_ENV}={settings.model_dir} is not a directory")
        return path, settings
    if from_bento is not None:
        return from_bento[0], settings
    raise ConfigError(
        f"{MODEL_DIR_ENV} is not set and this service does not run from a kubetune Bento "
        f"(no model with alias {MODEL_ALIAS}); set it to a published model directory"
    )


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="kubetune-llm", workers=1, traffic={"timeout": GENERATION_TIMEOUT_S})
class LLMService:
    """An OpenAI-compatible endpoint for one version of a kubetune ModelDeployment."""

    def __init__(self) -> None:
        try:
            self.model_dir, self.settings = resolve_model()
        except ComponentError as error:
            # Misconfigured: stay up to say why (requests get 503 with it, /livez fails).
            logger.error("cannot serve: %s", error.message)
            slot.set_error(error.message)
            return
        slot.identity = ServingIdentity(
            self.settings.deployment, self.settings.version, self.settings.model_id
        )
        self.loader = threading.Thread(target=self._load, name="kubetune-model-loader", daemon=True)
        self.loader.start()

    def _load(self) -> None:
        logger.info("loading %s for %s/%s", self.model_dir, self.settings.deployment, self.settings.version)
        try:
            runtime = ModelRuntime.load(self.model_dir, limits=self.settings.limits)
        except ComponentError as error:
            logger.error("cannot load the model in %s: %s", self.model_dir, error.message)
            slot.set_error(error.message)
            return
        except Exception as error:
            logger.exception("cannot load the model in %s", self.model_dir)
            slot.set_error(f"{type(error).__name__}: {error}")
            return
        slot.set_runtime(runtime)
        logger.info("model loaded; serving %s", slot.identity)

    def __is_ready__(self) -> bool:
        return slot.ready

    def __is_alive__(self) -> bool:
        return slot.error is None

    @bentoml.on_shutdown
    def close(self) -> None:
        if slot.runtime is not None:
            slot.runtime.close()
