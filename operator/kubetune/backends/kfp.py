"""Run pipelines on a Kubeflow Pipelines backend through kfp.Client (API v2beta1).

A run's display name is its request key (resource namespace, name, generation and uid), and runs
are grouped in one experiment per resource namespace, so `find` can always answer "was this generation
already submitted?" from the KFP API itself, even after the operator lost its own state.

Built for a multi-user Kubeflow:

- a run executes in its resource's namespace (the user's profile namespace, where the steps find the
  workspace claim and the hub-token Secret they mount by name), or where KUBETUNE_KFP_NAMESPACE_MAP
  sends it;
- the operator never mounts the users' workspaces: each step publishes the workspace's report as its
  ``workspace_report`` output parameter, read here from the run's task details; a run KFP reports
  SUCCEEDED whose final report cannot be read there fails (``ResultsMissing``);
- the workspace and the artifact store must be storage the steps share (``pvc://`` for the workspace,
  ``pvc://`` or an object store for the output): anything else fails the job (``StorageNotShared``)
  before a run is created;
- the client authenticates with a projected ServiceAccount token (audience pipelines.kubeflow.org,
  KFP's ServiceAccountTokenVolumeCredentials), a fixed bearer token, or, only when configured so, none.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from datetime import UTC, datetime
from typing import Any, Literal

from kubetune.config import KFP_AUTH_ENV, KfpAuth, KfpNamespaceMap, OperatorConfig
from kubetune.plan.runs import BackendError, RunPhase, RunRequest, RunStatus
from kubetune_contract.workspace import OBJECT_STORE_SCHEMES, WORKSPACE_REPORT_OUTPUT, WorkspaceReport

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


def shared_storage_problem(request: RunRequest) -> str | None:
    """Why the steps of `request`, pods in the user's namespace, could not share its storage; None if
    they can. The workspace is mounted (``pvc://``); the output may also be an object store."""
    workspace = request.workspace
    if not workspace.startswith("pvc://"):
        return (
            f"workspaceRoot (KUBETUNE_WORKSPACE_ROOT) puts the run's workspace at {workspace}: the kfp "
            "executor needs shared storage (pvc://CLAIM/...), which every step mounts"
        )
    output = str(((request.config.get("spec") or {}).get("output") or {}).get("uri") or "")
    if not output.startswith(("pvc://", *OBJECT_STORE_SCHEMES)):
        return (
            f"spec.output.uri (default: artifactStore, KUBETUNE_ARTIFACT_STORE) is {output or 'empty'}: the "
            "kfp executor needs shared storage (pvc://CLAIM/... or s3://...) to publish the model to"
        )
    return None


def _task_report(task: dict[str, Any]) -> WorkspaceReport | None:
    """The workspace report a task published as its output parameter, if it did and it reads."""
    outputs = task.get("outputs") or {}
    parameters = outputs.get("parameters") if isinstance(outputs, dict) else None
    for parameter in parameters or []:
        if not isinstance(parameter, dict) or parameter.get("parameter_key") != WORKSPACE_REPORT_OUTPUT:
            continue
        value = parameter.get("value")  # a google.protobuf.Value: a string parameter is a JSON string
        try:
            return WorkspaceReport.from_json(value) if isinstance(value, str) else None
        except (ValueError, TypeError):
            return None
    return None


def _end_time(task: dict[str, Any]) -> datetime:
    raw = str(task.get("end_time") or "")
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)  # unfinished: before every finished task


class KfpBackend:
    name: Literal["kfp"] = "kfp"

    def __init__(
        self,
        host: str | None,
        *,
        ui_url: str | None = None,
        namespace: KfpNamespaceMap | None = None,
        auth: KfpAuth | None = None,
        client: Any = None,
        request_timeout: tuple[float, float] = REQUEST_TIMEOUT_S,
    ) -> None:
        if client is None and not host:
            raise BackendError("the kfp executor needs a Kubeflow Pipelines endpoint (KUBETUNE_KFP_HOST)")
        self.host = host
        self.ui_url = (ui_url or host or "").rstrip("/")
        self.namespaces = namespace or KfpNamespaceMap()
        self.auth = auth or KfpAuth()
        self.request_timeout = request_timeout
        self._client = client

    @classmethod
    def from_settings(cls, settings: OperatorConfig) -> KfpBackend:
        """The backend the operator's settings describe."""
        return cls(
            settings.kfp_host,
            ui_url=settings.kfp_ui_url,
            namespace=settings.kfp_namespace,
            auth=settings.kfp_auth,
        )

    def _token(self) -> str | None:
        """The bearer token this call sends, read afresh (the kubelet rotates projected tokens)."""
        if self.auth.mode == "none":
            return None
        if self.auth.mode == "token":
            return self.auth.token
        try:
            with open(self.auth.token_path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            raise BackendError(
                f"the kfp executor cannot read its ServiceAccount token at {self.auth.token_path} "
                f"({exc.strerror or exc}): mount a projected token with audience pipelines.kubeflow.org "
                f"there (the chart does with kfp.auth.mode=serviceAccountToken), or set {KFP_AUTH_ENV}"
            ) from exc
        if not token:
            raise BackendError(
                f"the kfp executor's ServiceAccount token file {self.auth.token_path} is empty"
            )
        return token

    @property
    def client(self) -> Any:
        if self._client is None:
            self._token()  # fail now, with the reason, rather than inside every request
            self._check_health()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                import kfp
                from kfp.client import ServiceAccountTokenVolumeCredentials

                if self.auth.mode == "serviceAccountToken":
                    credentials = ServiceAccountTokenVolumeCredentials(path=self.auth.token_path)
                    client = kfp.Client(host=self.host, credentials=credentials)
                elif self.auth.mode == "token":
                    client = kfp.Client(host=self.host, existing_token=self.auth.token)
                else:
                    client = kfp.Client(host=self.host)
            _default_request_timeout(client, self.request_timeout)
            self._client = client
        return self._client

    def _check_health(self) -> None:
        """Fail fast with the HTTP status: kfp.Client itself retries healthz for 25 s, then says little."""
        import httpx

        url = f"{str(self.host).rstrip('/')}/apis/v2beta1/healthz"
        token = self._token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = httpx.get(
                url,
                headers=headers,
                timeout=httpx.Timeout(self.request_timeout[1], connect=self.request_timeout[0]),
            )
        except httpx.HTTPError as exc:
            raise BackendError(f"Kubeflow Pipelines at {self.host} is unreachable: {exc}") from exc
        if response.status_code >= 400:
            raise BackendError(
                f"Kubeflow Pipelines at {self.host} is unhealthy: "
                f"GET {url} answered HTTP {response.status_code}"
            )

    def _failed(self, doing: str, exc: Exception) -> BackendError:
        """A KFP API error as the one line the operator logs and retries on; refused credentials say so."""
        status = getattr(exc, "status", None)
        if status in (401, 403):
            what = "did not accept" if status == 401 else "does not authorize"
            identity = {
                "serviceAccountToken": f"the ServiceAccount token in {self.auth.token_path}",
                "token": f"the bearer token in {KFP_AUTH_ENV}=token",
                "none": f"a request without credentials ({KFP_AUTH_ENV}=none)",
            }[self.auth.mode]
            return BackendError(
                f"{doing} failed: Kubeflow Pipelines {what} {identity} (HTTP {status}): "
                f"{str(getattr(exc, 'body', '') or exc).strip()}"
            )
        return BackendError(f"{doing} failed: {exc}")

    def kfp_namespace(self, resource_namespace: str) -> str:
        return self.namespaces.for_resource(resource_namespace)

    def run_url(self, run_id: str) -> str:
        return f"{self.ui_url}/#/runs/details/{run_id}"

    def _status(self, run: Any) -> RunStatus:
        state = str(getattr(run, "state", None) or "PENDING").upper()
        error = getattr(run, "error", None)
        message = str(getattr(error, "message", "") or "") if error else ""
        status = RunStatus(
            backend="kfp",
            id=str(run.run_id),
            phase=_PHASES.get(state, "Running"),
            message=message,
            reason="PipelineFailed" if state == "FAILED" else "",
            url=self.run_url(str(run.run_id)),
        )
        if status.phase in ("Running", "Succeeded"):
            return self._with_report(status)
        return status

    def _task_details(self, run_id: str) -> list[dict[str, Any]]:
        """The run's task details as KFP answers them: read raw, since kfp_server_api's models keep only
        artifact ids of a task's outputs, not the output parameters the steps publish."""
        try:
            response = self.client._run_api.run_service_get_run(run_id, _preload_content=False)
            document = json.loads(response.data)
        except BackendError:
            raise
        except Exception as exc:
            raise self._failed(f"reading Kubeflow Pipelines run {run_id}", exc) from exc
        details = document.get("run_details") or {}
        return [task for task in details.get("task_details") or [] if isinstance(task, dict)]

    def _with_report(self, status: RunStatus) -> RunStatus:
        """The status with what the steps published: the newest finished task's report (each holds the
        whole workspace's report when its step ended) and, while running, the task running now."""
        from kubetune.pipelines.finetune import FINAL_TASK  # kfp's DSL: imported once a run exists

        tasks = self._task_details(status.id)
        published = [(task, report) for task in tasks if (report := _task_report(task)) is not None]
        published.sort(key=lambda pair: _end_time(pair[0]))
        report = published[-1][1] if published else WorkspaceReport()
        if status.phase == "Succeeded":
            final = [found for task, found in published if task.get("display_name") == FINAL_TASK]
            if not final:
                return dataclasses.replace(
                    status,
                    phase="Failed",
                    reason="ResultsMissing",
                    message=(
                        f"Kubeflow Pipelines reports run {status.id} SUCCEEDED, but its details have no "
                        f"{WORKSPACE_REPORT_OUTPUT!r} output parameter of task {FINAL_TASK!r}, so the run's "
                        "results (evaluation, gates, published model) cannot be read"
                    ),
                    report=report,
                )
            return dataclasses.replace(status, report=final[-1])
        running = [str(task.get("display_name")) for task in tasks if task.get("state") == "RUNNING"]
        if running:
            report = dataclasses.replace(report, progress={"phase": ", ".join(sorted(running))})
        return dataclasses.replace(status, report=report)

    def _experiment_id(self, resource_namespace: str, create: bool) -> str | None:
        name = experiment_name(resource_namespace)
        namespace = self.kfp_namespace(resource_namespace)
        try:
            experiment = self.client.get_experiment(experiment_name=name, namespace=namespace)
        except ValueError:  # kfp.Client's "no experiment with this name"
            if not create:
                return None
            experiment = self.client.create_experiment(name=name, namespace=namespace)
        return str(experiment.experiment_id)

    def find(self, key: str, namespace: str | None = None) -> RunStatus | None:
        """The run named `key` among the runs of resource namespace `namespace`."""
        kfp_namespace = self._namespace_for_lookup(key, namespace)
        predicate = {"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": key}]}
        try:
            response = self.client.list_runs(
                filter=json.dumps(predicate), namespace=kfp_namespace, page_size=5
            )
        except BackendError:
            raise
        except Exception as exc:
            raise self._failed("listing Kubeflow Pipelines runs", exc) from exc
        runs = [run for run in (response.runs or []) if run.display_name == key]
        if not runs:
            return None
        # Should two ever exist (a second operator racing), the oldest one is the run of record.
        runs.sort(key=lambda run: str(run.created_at or ""))
        return self._status(runs[0])

    def _namespace_for_lookup(self, key: str, namespace: str | None) -> str:
        if namespace:
            return self.kfp_namespace(namespace)
        if self.namespaces.default:
            return self.namespaces.default
        raise BackendError(
            f"finding Kubeflow Pipelines run {key} needs its resource's namespace (runs execute in each "
            "resource's namespace unless KUBETUNE_KFP_NAMESPACE_MAP maps '*')"
        )

    def submit(self, request: RunRequest) -> RunStatus:
        resource_namespace = str(request.config.get("metadata", {}).get("namespace", "default"))
        problem = shared_storage_problem(request)
        if problem is not None:
            return RunStatus(backend="kfp", id="", phase="Failed", reason="StorageNotShared", message=problem)
        existing = self.find(request.key, resource_namespace)
        if existing is not None:
            return existing
        from kubetune.pipelines.registry import build_pipeline, options_from_dict, pipeline_arguments

        pipeline = build_pipeline(request.kind, options_from_dict(request.pipeline_options))
        try:
            experiment_id = self._experiment_id(resource_namespace, create=True)
            result = self.client.create_run_from_pipeline_func(
                pipeline,
                arguments=pipeline_arguments(request.kind, request.config, request.workspace),
                run_name=request.key,
                experiment_id=experiment_id,
                namespace=self.kfp_namespace(resource_namespace),
                enable_caching=False,
            )
        except BackendError:
            raise
        except Exception as exc:
            raise self._failed("creating the Kubeflow Pipelines run", exc) from exc
        log.info("submitted kfp run %s for %s", result.run_id, request.key)
        return RunStatus(
            backend="kfp", id=str(result.run_id), phase="Pending", url=self.run_url(result.run_id)
        )

    def resume(self, key: str, namespace: str | None = None) -> RunStatus:
        current = self.find(key, namespace)
        if current is None:
            raise BackendError(f"no Kubeflow Pipelines run named {key}")
        return current  # KFP retries failed pods itself; there is no interrupted state to resume

    def cancel(self, key: str, namespace: str | None = None) -> None:
        current = self.find(key, namespace)
        if current is None or current.finished:
            return
        try:
            self.client.terminate_run(current.id)
        except BackendError:
            raise
        except Exception as exc:
            raise self._failed(f"terminating Kubeflow Pipelines run {current.id}", exc) from exc
