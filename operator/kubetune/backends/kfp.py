"""Run pipelines on a Kubeflow Pipelines backend through kfp.Client (API v2beta1).

A run's display name is its request key (resource namespace, name, generation and uid), and runs
are grouped in one experiment per namespace, so `find` can always answer "was this generation
already submitted?" from the KFP API itself, even after the operator lost its own state.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any, Literal

from kubetune.plan.runs import BackendError, RunPhase, RunRequest, RunStatus

log = logging.getLogger(__name__)

_PHASES: dict[str, RunPhase] = {
    "RUNTIME_STATE_UNSPECIFIED": "Pending",
    "PENDING": "Pending",
    "RUNNING": "Running",
    "PAUSED": "Running",
    "SUCCEEDED": "Succeeded",
    "SKIPPED": "Succeeded",
    "FAILED": "Failed",
    "CANCELING": "Cancelled",
    "CANCELED": "Cancelled",
}


# (connect, read) seconds: kfp_server_api waits forever by default, which would wedge a reconcile.
REQUEST_TIMEOUT_S = (5.0, 30.0)


def _default_request_timeout(client: Any, timeout: tuple[float, float]) -> None:
    """Give every call of the generated KFP API client a timeout unless the caller set one."""
    rest_client = client._run_api.api_client.rest_client  # shared by all the generated APIs
    original = rest_client.request

    def request(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = timeout
        return original(*args, **kwargs)

    rest_client.request = request


def experiment_name(namespace: str) -> str:
    return f"kubetune-{namespace}"


class KfpBackend:
    name: Literal["kfp"] = "kfp"

    def __init__(
        self,
        host: str | None,
        *,
        ui_url: str | None = None,
        namespace: str = "kubeflow",
        client: Any = None,
        request_timeout: tuple[float, float] = REQUEST_TIMEOUT_S,
    ) -> None:
        if client is None and not host:
            raise BackendError("the kfp executor needs a Kubeflow Pipelines endpoint (KUBETUNE_KFP_HOST)")
        self.host = host
        self.ui_url = (ui_url or host or "").rstrip("/")
        self.namespace = namespace
        self.request_timeout = request_timeout
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._check_health()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                import kfp

                client = kfp.Client(host=self.host, namespace=self.namespace)
            _default_request_timeout(client, self.request_timeout)
            self._client = client
        return self._client

    def _check_health(self) -> None:
        """Fail fast with the HTTP status: kfp.Client itself retries healthz for 25 s, then says little."""
        import httpx

        url = f"{str(self.host).rstrip('/')}/apis/v2beta1/healthz"
        try:
            response = httpx.get(
                url, timeout=httpx.Timeout(self.request_timeout[1], connect=self.request_timeout[0])
            )
        except httpx.HTTPError as exc:
            raise BackendError(f"Kubeflow Pipelines at {self.host} is unreachable: {exc}") from exc
        if response.status_code >= 400:
            raise BackendError(
                f"Kubeflow Pipelines at {self.host} is unhealthy: "
                f"GET {url} answered HTTP {response.status_code}"
            )

    def run_url(self, run_id: str) -> str:
        return f"{self.ui_url}/#/runs/details/{run_id}"

    def _status(self, run: Any) -> RunStatus:
        state = str(getattr(run, "state", None) or "PENDING").upper()
        error = getattr(run, "error", None)
        message = str(getattr(error, "message", "") or "") if error else ""
        return RunStatus(
            backend="kfp",
            id=str(run.run_id),
            phase=_PHASES.get(state, "Running"),
            message=message,
            reason="PipelineFailed" if state == "FAILED" else "",
            url=self.run_url(str(run.run_id)),
        )

    def _experiment_id(self, namespace: str, create: bool) -> str | None:
        name = experiment_name(namespace)
        try:
            experiment = self.client.get_experiment(experiment_name=name, namespace=self.namespace)
        except ValueError:  # kfp.Client's "no experiment with this name"
            if not create:
                return None
            experiment = self.client.create_experiment(name=name, namespace=self.namespace)
        return str(experiment.experiment_id)

    def find(self, key: str) -> RunStatus | None:
        predicate = {"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": key}]}
        try:
            response = self.client.list_runs(
                filter=json.dumps(predicate), namespace=self.namespace, page_size=5
            )
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"listing Kubeflow Pipelines runs failed: {exc}") from exc
        runs = [run for run in (response.runs or []) if run.display_name == key]
        if not runs:
            return None
        # Should two ever exist (a second operator racing), the oldest one is the run of record.
        runs.sort(key=lambda run: str(run.created_at or ""))
        return self._status(runs[0])

    def submit(self, request: RunRequest) -> RunStatus:
        existing = self.find(request.key)
        if existing is not None:
            return existing
        from kubetune.pipelines.registry import build_pipeline, options_from_dict

        pipeline = build_pipeline(request.kind, options_from_dict(request.pipeline_options))
        namespace = str(request.config.get("metadata", {}).get("namespace", "default"))
        try:
            experiment_id = self._experiment_id(namespace, create=True)
            result = self.client.create_run_from_pipeline_func(
                pipeline,
                arguments={
                    "config_json": json.dumps(request.config, sort_keys=True),
                    "workspace": request.workspace,
                },
                run_name=request.key,
                experiment_id=experiment_id,
                namespace=self.namespace,
                enable_caching=False,
            )
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"creating the Kubeflow Pipelines run failed: {exc}") from exc
        log.info("submitted kfp run %s for %s", result.run_id, request.key)
        return RunStatus(
            backend="kfp", id=str(result.run_id), phase="Pending", url=self.run_url(result.run_id)
        )

    def resume(self, key: str) -> RunStatus:
        current = self.find(key)
        if current is None:
            raise BackendError(f"no Kubeflow Pipelines run named {key}")
        return current  # KFP retries failed pods itself; there is no interrupted state to resume

    def cancel(self, key: str) -> None:
        current = self.find(key)
        if current is None or current.finished:
            return
        try:
            self.client.terminate_run(current.id)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"terminating Kubeflow Pipelines run {current.id} failed: {exc}") from exc
