"""The BentoML service of many LoRA versions on one base model (`adapters`, `shared_api`).

    KUBETUNE_ADAPTERS='{"tuned": "/models/router/v3", "tuned-2": "/models/router/v4"}' \\
    KUBETUNE_DEPLOYMENT=support-bot \\
        bentoml serve kubetune_components.serving.shared_service:SharedAdapterService --port 3001

Each version answers under ``/adapters/<version>/v1/...``; ``PUT``/``DELETE /adapters/<version>``
load and unload versions while the others serve. The base and the first adapters load on a
background thread: /livez answers at once, /readyz once they are loaded.

On a cluster ``KUBETUNE_ADAPTERS_FILE`` names a file holding that JSON object instead (the group's
mounted ConfigMap): the server loads what it names at start and then follows its changes
(`adapters_file`), so the operator adds and removes versions without restarting the pods.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml

from kubetune_components.common.errors import ComponentError
from kubetune_components.serving.adapters import SharedAdapters
from kubetune_components.serving.adapters_file import AdaptersFileWatch, parse_adapters, read_adapters_file
from kubetune_components.serving.config import ServingSettings
from kubetune_components.serving.service import GENERATION_TIMEOUT_S
from kubetune_components.serving.shared_api import SharedSlot, create_shared_app
from kubetune_contract.serving import ADAPTERS_ENV, ADAPTERS_FILE_ENV

logger = logging.getLogger(__name__)


def adapters_from_env(env: dict[str, str]) -> dict[str, str]:
    """The versions to load at start (version -> adapter directory), from KUBETUNE_ADAPTERS_FILE when it
    is set, else KUBETUNE_ADAPTERS; ConfigError names the variable or the file."""
    path = env.get(ADAPTERS_FILE_ENV, "").strip()
    if path:
        return read_adapters_file(Path(path))
    return parse_adapters(env.get(ADAPTERS_ENV, ""), ADAPTERS_ENV)


settings = ServingSettings.from_env()
slot = SharedSlot(settings.deployment, settings.model_id)
app = create_shared_app(slot)


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="kubetune-shared-llm", workers=1, traffic={"timeout": GENERATION_TIMEOUT_S})
class SharedAdapterService:
    """OpenAI-compatible endpoints for the LoRA versions of one ModelDeployment that share a base."""

    def __init__(self) -> None:
        try:
            self.adapters = adapters_from_env(dict(os.environ))
        except ComponentError as error:
            logger.error("cannot serve: %s", error.message)
            slot.set_error(error.message)
            return
        self.stop_watching = threading.Event()
        threading.Thread(target=self._load, name="kubetune-model-loader", daemon=True).start()

    def _load(self) -> None:
        try:
            shared = SharedAdapters.load(self.adapters, limits=settings.limits)
        except ComponentError as error:
            logger.error("cannot load the adapters: %s", error.message)
            slot.set_error(error.message)
            return
        except Exception as error:
            logger.exception("cannot load the adapters")
            slot.set_error(f"{type(error).__name__}: {error}")
            return
        slot.set_shared(shared)
        logger.info("serving %s on %s", ", ".join(shared.versions), shared.base_uri)
        if path := os.environ.get(ADAPTERS_FILE_ENV, "").strip():
            watch = AdaptersFileWatch(Path(path), shared, self.adapters)
            threading.Thread(
                target=watch.run, args=(self.stop_watching,), name="kubetune-adapters-watch", daemon=True
            ).start()

    def __is_ready__(self) -> bool:
        return slot.ready

    def __is_alive__(self) -> bool:
        return slot.error is None

    @bentoml.on_shutdown
    def close(self) -> None:
        if hasattr(self, "stop_watching"):
            self.stop_watching.set()
        if slot.shared is not None:
            slot.shared.close()
