"""An emulated Kubeflow Pipelines API server: the v2beta1 REST subset that ``kfp.Client`` 2.17 calls.

Not a mock of ``kfp.Client``: the real client (and ``kfp_server_api`` underneath it) talks HTTP to a
stateful Starlette app served by uvicorn on ``127.0.0.1:<free port>`` in a background thread.

Endpoints (paths and parameters as in ``kfp_server_api.api.*``)::

    GET  /apis/v2beta1/healthz                     {"multi_user": false, "pipeline_store": "database"}
    GET  /apis/v2beta1/experiments                 ?filter=&namespace=&page_size=&page_token=&sort_by=
    POST /apis/v2beta1/experiments                 body: V2beta1Experiment (display_name, namespace)
    GET  /apis/v2beta1/experiments/{experiment_id}
    GET  /apis/v2beta1/runs                        ?filter=&namespace=&experiment_id=&page_size=&...
    POST /apis/v2beta1/runs                        body: V2beta1Run (experiment_id, display_name,
                                                   pipeline_spec, runtime_config.parameters, ...)
    GET  /apis/v2beta1/runs/{run_id}
    POST /apis/v2beta1/runs/{run_id}:terminate     -> CANCELING, then ``terminate_state``

Authentication and authorization follow a multi-user KFP: with ``tokens`` set, every call but healthz
needs ``Authorization: Bearer <token>`` (missing or unknown: 401 Unauthenticated), and the token's
identity must be allowed the namespace it touches (else 403 PermissionDenied), as KFP's TokenReview +
SubjectAccessReview answer. Runs carry ``run_details.task_details``; a task's output parameters are
``outputs.parameters[{parameter_key, value}]``, the shape of PipelineTaskDetail.outputs in
kubeflow/pipelines' current v2beta1 API (released 2.x API servers list only artifact ids there, often
none: kubeflow/pipelines#9858), set by tests with :meth:`KfpEmulator.set_task`.

Semantics follow the KFP API server where the client can tell: JSON with proto field names, unset
fields and empty lists left out (``{}`` for an empty list response), ``filter`` is a JSON
``Filter`` message read like protojson does (``string_value`` or ``stringValue``, operations by name
or number), unknown filter keys are a 400, experiment names are unique per namespace (409),
``created_at`` has second precision, errors are ``google.rpc.Status``-shaped JSON. In multi-user
mode (``KfpEmulator(multi_user=True)``) lists need a namespace and are scoped to it. Simplifications:
a run's runtime parameters are checked against the pipeline's root inputs at creation (KFP only
fails the run later), and terminating a finished run is a 400.

Tests drive runs with :meth:`KfpEmulator.set_state`, inject failures with :meth:`KfpEmulator.fail`,
seed runs with :meth:`KfpEmulator.seed_run`, and read what the client sent from
:attr:`KfpEmulator.calls`, :meth:`KfpEmulator.runs_named`, :meth:`KfpEmulator.experiment_named`.

Example::

    emulator = KfpEmulator()
    with emulator.serve() as url:
        client = kfp.Client(host=url)
        ...
        emulator.set_state(run_id, "FAILED", error="step finetune: OOMKilled")
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

API = "/apis/v2beta1"
Json = dict[str, Any]

RUNTIME_STATES = frozenset(
    {
        "RUNTIME_STATE_UNSPECIFIED",
        "PENDING",
        "RUNNING",
        "SUCCEEDED",
        "SKIPPED",
        "FAILED",
        "CANCELING",
        "CANCELED",
        "PAUSED",
    }
)
FINISHED_STATES = frozenset({"SUCCEEDED", "SKIPPED", "FAILED", "CANCELED"})

# google.rpc.Code values, as the KFP API server (grpc-gateway) puts them into error bodies.
_GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 412: 9, 500: 13, 501: 12, 503: 14}

# filter.proto's Predicate.Operation, by number as kfp.Client sends them, and by name.
_OPERATIONS = {
    1: "EQUALS",
    2: "NOT_EQUALS",
    3: "GREATER_THAN",
    5: "GREATER_THAN_EQUALS",
    6: "LESS_THAN",
    7: "LESS_THAN_EQUALS",
    8: "IN",
    9: "IS_SUBSTRING",
}

# What the API server lets one filter and sort on (model/run.go, model/experiment.go).
_RUN_KEYS = frozenset(
    {"run_id", "display_name", "created_at", "description", "scheduled_at", "storage_state", "state"}
)
_EXPERIMENT_KEYS = frozenset(
    {"experiment_id", "display_name", "created_at", "description", "namespace", "storage_state"}
)
_DEFAULT_PAGE_SIZE = 20


class ApiError(Exception):
    """Answered as a google.rpc.Status body with this HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Call:
    """One request the emulator received (before any injected failure)."""

    method: str
    path: str
    query: dict[str, str]
    body: Any

    @property
    def filter(self) -> Json | None:
        raw = self.query.get("filter")
        return json.loads(raw) if raw else None


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int
    message: str
    times: int
    after: bool


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _field(message: Mapping[str, Any], name: str) -> Any:
    """A field of a JSON proto message under its proto name or its lowerCamel JSON name (protojson)."""
    if name in message:
        return message[name]
    head, *rest = name.split("_")
    return message.get(head + "".join(part.title() for part in rest))


@dataclass
class _Predicate:
    key: str
    operation: str
    value: Any

    @classmethod
    def parse(cls, raw: Any, allowed: frozenset[str]) -> _Predicate:
        if not isinstance(raw, Mapping):
            raise ApiError(400, f"Invalid filter predicate: {raw!r}")
        key = str(_field(raw, "key") or "")
        if key not in allowed:
            raise ApiError(400, f"Invalid filter: key {key!r} is not supported (one of {sorted(allowed)})")
        op = _field(raw, "operation")
        operation = _OPERATIONS.get(op, "") if isinstance(op, int) else str(op or "")
        if operation not in _OPERATIONS.values():
            raise ApiError(400, f"Invalid filter: operation {op!r} is not supported")
        value: Any = None
        for name in ("string_value", "int_value", "long_value", "timestamp_value"):
            if (found := _field(raw, name)) is not None:
                value = found
        for name in ("string_values", "int_values", "long_values"):
            if (found := _field(raw, name)) is not None:
                value = list(found.get("values") or []) if isinstance(found, Mapping) else None
        if value is None:
            raise ApiError(400, f"Invalid filter: predicate on {key!r} has no value")
        if (operation == "IN") != isinstance(value, list):
            raise ApiError(
                400,
                f"Invalid filter: {operation} on {key!r} needs "
                + ("a list of values" if operation == "IN" else "a single value"),
            )
        return cls(key, operation, value)

    def matches(self, obj: Mapping[str, Any]) -> bool:
        actual = obj.get(self.key)
        if self.key in ("created_at", "scheduled_at"):
            actual = int(datetime.datetime.fromisoformat(str(actual).replace("Z", "+00:00")).timestamp())
        value = self.value
        if isinstance(actual, int) and not isinstance(value, list):
            value = _as_seconds(value)
        match self.operation:
            case "EQUALS":
                return bool(actual == value)
            case "NOT_EQUALS":
                return bool(actual != value)
            case "IN":
                return actual in value or str(actual) in [str(v) for v in value]
            case "IS_SUBSTRING":
                return str(value) in str(actual or "")
            case "GREATER_THAN":
                return bool(actual > value)
            case "GREATER_THAN_EQUALS":
                return bool(actual >= value)
            case "LESS_THAN":
                return bool(actual < value)
            case _:  # LESS_THAN_EQUALS
                return bool(actual <= value)


def _as_seconds(value: Any) -> Any:
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        return int(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    return int(value) if isinstance(value, str) else value


def _parse_filter(raw: str | None, allowed: frozenset[str]) -> list[_Predicate]:
    if not raw:
        return []
    try:
        message = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"Invalid filter: not JSON: {exc}") from exc
    if not isinstance(message, Mapping):
        raise ApiError(400, "Invalid filter: not a Filter message")
    return [_Predicate.parse(p, allowed) for p in message.get("predicates") or []]


def _page(items: list[Json], query: Mapping[str, str], allowed: frozenset[str]) -> tuple[list[Json], str]:
    """Sort (``sort_by``: ``"field"`` or ``"field desc"``, default creation order) and paginate."""
    sort_by = (query.get("sort_by") or "").strip()
    if sort_by:
        name, _, direction = sort_by.partition(" ")
        if name not in allowed or direction.strip() not in ("", "asc", "desc"):
            raise ApiError(400, f"Invalid sorting field: {sort_by!r}")
        items = sorted(items, key=lambda item: str(item.get(name) or ""), reverse=direction.strip() == "desc")
    try:
        size = int(query.get("page_size") or 0) or _DEFAULT_PAGE_SIZE
        start = int(base64.urlsafe_b64decode(query["page_token"]).decode()) if query.get("page_token") else 0
    except ValueError as exc:
        raise ApiError(400, f"Invalid page_size or page_token: {exc}") from exc
    end = start + size
    token = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(items) else ""
    return items[start:end], token


def _list_response(name: str, items: list[Json], total: int, token: str) -> Json:
    body: Json = {}
    if items:
        body[name] = items
    if total:
        body["total_size"] = total
    if token:
        body["next_page_token"] = token
    return body


def _root_inputs(spec: Mapping[str, Any]) -> dict[str, Json]:
    root = spec.get("root") or {}
    definitions = _field(root, "input_definitions") or {}
    return dict(definitions.get("parameters") or {})


class KfpEmulator:
    """The state of one emulated Kubeflow Pipelines deployment, and its ASGI app."""

    def __init__(
        self,
        *,
        multi_user: bool = False,
        terminate_state: str = "CANCELED",
        tokens: Mapping[str, Collection[str] | None] | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self.url: str | None = None
        self.multi_user = False
        self.terminate_state = "CANCELED"
        self.tokens: dict[str, frozenset[str] | None] = {}
        self.experiments: dict[str, Json] = {}
        self.runs: dict[str, Json] = {}
        self.calls: list[Call] = []
        self._faults: list[Fault] = []
        self.reset(multi_user=multi_user, terminate_state=terminate_state, tokens=tokens)
        self.app = self._build_app()

    # ---- for tests ------------------------------------------------------------------------------

    def reset(
        self,
        *,
        multi_user: bool = False,
        terminate_state: str = "CANCELED",
        tokens: Mapping[str, Collection[str] | None] | None = None,
    ) -> None:
        """Forget everything (experiments, runs, calls, pending faults) and set the deployment's mode.

        ``multi_user``: what healthz reports, and whether lists need and are scoped to a namespace.
        ``terminate_state``: where a terminated run ends up, CANCELED or (stuck in) CANCELING.
        ``tokens``: the bearer tokens accepted, each with the namespaces its identity may use (None:
        all); empty or None: no authentication, as a KFP without it.
        """
        if terminate_state not in ("CANCELING", "CANCELED"):
            raise ValueError("terminate_state is CANCELING or CANCELED")
        with self._lock:
            self.multi_user = multi_user
            self.terminate_state = terminate_state
            self.tokens = {
                token: None if namespaces is None else frozenset(namespaces)
                for token, namespaces in (tokens or {}).items()
            }
            self.experiments.clear()
            self.runs.clear()
            self.calls.clear()
            self._faults.clear()

    def calls_to(self, method: str, path: str) -> list[Call]:
        """The calls with this method whose path matches the regular expression ``path`` (search)."""
        with self._lock:
            return [c for c in self.calls if c.method == method and re.search(path, c.path)]

    def run(self, run_id: str) -> Json:
        with self._lock:
            return copy.deepcopy(self.runs[run_id])

    def runs_named(self, display_name: str) -> list[Json]:
        with self._lock:
            return [copy.deepcopy(r) for r in self.runs.values() if r["display_name"] == display_name]

    def experiment_named(self, display_name: str, namespace: str | None = None) -> Json | None:
        with self._lock:
            for experiment in self.experiments.values():
                if experiment["display_name"] == display_name and (
                    namespace is None or experiment.get("namespace", "") == namespace
                ):
                    return copy.deepcopy(experiment)
        return None

    def set_state(self, run_id: str, state: str, *, error: str | None = None) -> None:
        """Move a run to ``state`` (as the persistence agent would), with an error message if failed."""
        if state not in RUNTIME_STATES:
            raise ValueError(f"unknown runtime state {state!r}")
        with self._lock:
            run = self.runs[run_id]
            self._transition(run, state, error)

    def set_task(
        self,
        run_id: str,
        display_name: str,
        state: str = "SUCCEEDED",
        *,
        parameters: Mapping[str, str] | None = None,
    ) -> None:
        """Record (or update) a task of the run in its details, with the output parameters it published,
        as KFP's persistence agent would once the task's pod ran."""
        if state not in RUNTIME_STATES:
            raise ValueError(f"unknown runtime state {state!r}")
        with self._lock:
            details = self.runs[run_id].setdefault("run_details", {"task_details": []})
            tasks: list[Json] = details["task_details"]
            task = next((t for t in tasks if t["display_name"] == display_name), None)
            if task is None:
                task = {"run_id": run_id, "task_id": str(uuid.uuid4()), "display_name": display_name}
                task["create_time"] = task["start_time"] = _rfc3339(_now())
                tasks.append(task)
            task["state"] = state
            if state in FINISHED_STATES:
                # Microseconds: tasks of a run end in order within one second of a test.
                task["end_time"] = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
            if parameters:
                task["outputs"] = {
                    "parameters": [
                        {"parameter_key": key, "value": value, "type": "OUTPUT"}
                        for key, value in sorted(parameters.items())
                    ]
                }

    def seed_run(
        self,
        display_name: str,
        *,
        state: str = "PENDING",
        error: str | None = None,
        experiment_id: str | None = None,
        namespace: str = "",
        created_at: datetime.datetime | None = None,
    ) -> str:
        """Store a run as if some other client had created it; returns its id."""
        with self._lock:
            experiment = (
                self.experiments[experiment_id] if experiment_id else self._default_experiment(namespace)
            )
            run = self._new_run(display_name, experiment["experiment_id"], {}, {}, created_at or _now())
            self._transition(run, state, error)
            return str(run["run_id"])

    def fail(
        self,
        method: str,
        path: str,
        status: int = 503,
        *,
        times: int = 1,
        after: bool = False,
        message: str = "injected failure",
    ) -> None:
        """Answer the next ``times`` requests matching ``method`` and ``path`` (a regex, matched with
        ``re.search``) with an error. ``after=True`` carries the request out first and loses only the
        response (a proxy timing out after the server acted)."""
        with self._lock:
            self._faults.append(Fault(method, re.compile(path), status, message, times, after))

    @contextlib.contextmanager
    def serve(self, host: str = "127.0.0.1") -> Iterator[str]:
        """Serve the app with uvicorn on a free port in a background thread; yields the base URL."""
        server = EmulatorServer(self, host)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()

    # ---- state ----------------------------------------------------------------------------------

    def _transition(self, run: Json, state: str, error: str | None) -> None:
        now = _rfc3339(_now())
        run["state"] = state
        history: Json = {"update_time": now, "state": state}
        if state == "FAILED":
            run["error"] = {"code": 2, "message": error or "pipeline failed", "details": []}
            history["error"] = run["error"]
        elif error:
            run["error"] = {"code": 2, "message": error, "details": []}
        else:
            run.pop("error", None)
        run.setdefault("state_history", []).append(history)
        if state in FINISHED_STATES:
            run["finished_at"] = now
        else:
            run.pop("finished_at", None)

    def _default_experiment(self, namespace: str) -> Json:
        existing = self._find_experiment("Default", namespace)
        return existing if existing is not None else self._new_experiment("Default", "", namespace)

    def _find_experiment(self, display_name: str, namespace: str) -> Json | None:
        for experiment in self.experiments.values():
            if experiment["display_name"] == display_name and experiment.get("namespace", "") == namespace:
                return experiment
        return None

    def _new_experiment(self, display_name: str, description: str, namespace: str) -> Json:
        experiment: Json = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": display_name,
            "created_at": _rfc3339(_now()),
            "storage_state": "AVAILABLE",
        }
        if description:
            experiment["description"] = description
        if namespace:
            experiment["namespace"] = namespace
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _new_run(
        self,
        display_name: str,
        experiment_id: str,
        pipeline_spec: Json,
        runtime_config: Json,
        created_at: datetime.datetime,
    ) -> Json:
        run: Json = {
            "run_id": str(uuid.uuid4()),
            "experiment_id": experiment_id,
            "display_name": display_name,
            "storage_state": "AVAILABLE",
            "pipeline_spec": pipeline_spec,
            "runtime_config": runtime_config,
            "created_at": _rfc3339(created_at),
            "scheduled_at": _rfc3339(created_at),
        }
        self.runs[run["run_id"]] = run
        return run

    def _namespace_of(self, run: Json) -> str:
        experiment = self.experiments.get(run["experiment_id"]) or {}
        return str(experiment.get("namespace", ""))

    def _scope(self, query: Mapping[str, str], *, required: bool) -> str | None:
        """The namespace a list is limited to: only in multi-user mode, where one is required."""
        if not self.multi_user:
            return None
        namespace = query.get("namespace") or ""
        if required and not namespace:
            raise ApiError(400, "Invalid input error: namespace is required in multi-user mode")
        return namespace

    def _authorize(self, request: Request, namespace: str) -> None:
        """401 without an accepted bearer token; 403 when its identity may not use `namespace`."""
        if not self.tokens:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "Unauthenticated: Request header error: there is no user identity header and no "
                "bearer token in Authorization",
            )
        if token.strip() not in self.tokens:
            raise ApiError(
                401, "Unauthenticated: Failed to authenticate token review: the token is not valid"
            )
        allowed = self.tokens[token.strip()]
        if self.multi_user and allowed is not None and namespace not in allowed:
            raise ApiError(
                403,
                f"PermissionDenied: Failed to authorize with API: User is not authorized to access "
                f"resources in namespace {namespace!r}",
            )

    # ---- endpoints ------------------------------------------------------------------------------

    def _healthz(self, request: Request, body: Any) -> Json:
        return {"multi_user": self.multi_user, "pipeline_store": "database"}

    def _list_experiments(self, request: Request, body: Any) -> Json:
        query = dict(request.query_params)
        namespace = self._scope(query, required=True)
        self._authorize(request, namespace or "")
        predicates = _parse_filter(query.get("filter"), _EXPERIMENT_KEYS)
        matched = [
            e
            for e in self.experiments.values()
            if (namespace is None or e.get("namespace", "") == namespace)
            and all(p.matches(e) for p in predicates)
        ]
        page, token = _page(matched, query, _EXPERIMENT_KEYS)
        return _list_response("experiments", copy.deepcopy(page), len(matched), token)

    def _create_experiment(self, request: Request, body: Any) -> Json:
        if not isinstance(body, Mapping):
            raise ApiError(400, "Invalid input error: the body must be an Experiment")
        name = str(_field(body, "display_name") or "")
        if not name:
            raise ApiError(
                400, "Invalid input error: Experiment display_name is empty. Please specify a valid name"
            )
        namespace = str(body.get("namespace") or "")
        if self.multi_user and not namespace:
            raise ApiError(400, "Invalid input error: namespace is required in multi-user mode")
        self._authorize(request, namespace)
        if self._find_experiment(name, namespace) is not None:
            raise ApiError(
                409,
                f"Failed to create a new experiment. The name {name} already exist. "
                "Please specify a new name",
            )
        return copy.deepcopy(self._new_experiment(name, str(body.get("description") or ""), namespace))

    def _get_experiment(self, request: Request, body: Any) -> Json:
        experiment_id = request.path_params["experiment_id"]
        if experiment_id not in self.experiments:
            raise ApiError(404, f"Experiment {experiment_id} not found")
        self._authorize(request, str(self.experiments[experiment_id].get("namespace", "")))
        return copy.deepcopy(self.experiments[experiment_id])

    def _list_runs(self, request: Request, body: Any) -> Json:
        query = dict(request.query_params)
        experiment_id = query.get("experiment_id") or ""
        if experiment_id and experiment_id not in self.experiments:
            raise ApiError(404, f"Experiment {experiment_id} not found")
        namespace = self._scope(query, required=not experiment_id)
        if namespace is None and experiment_id:  # authorized against the experiment's namespace
            self._authorize(request, str(self.experiments[experiment_id].get("namespace", "")))
        else:
            self._authorize(request, namespace or "")
        predicates = _parse_filter(query.get("filter"), _RUN_KEYS)
        matched = [
            r
            for r in self.runs.values()
            if (not experiment_id or r["experiment_id"] == experiment_id)
            and (namespace is None or self._namespace_of(r) == namespace)
            and all(p.matches(r) for p in predicates)
        ]
        page, token = _page(matched, query, _RUN_KEYS)
        return _list_response("runs", copy.deepcopy(page), len(matched), token)

    def _create_run(self, request: Request, body: Any) -> Json:
        if not isinstance(body, Mapping):
            raise ApiError(400, "Invalid input error: the body must be a Run")
        name = str(_field(body, "display_name") or "")
        if not name:
            raise ApiError(400, "Invalid input error: Run display_name cannot be empty")
        spec = _field(body, "pipeline_spec")
        reference = _field(body, "pipeline_version_reference") or _field(body, "pipeline_version_id")
        if bool(spec) == bool(reference):
            raise ApiError(
                400, "Invalid input error: a run needs either a pipeline_spec or a pipeline_version_reference"
            )
        if reference:
            raise ApiError(501, "the emulator runs inline pipeline specs only")
        assert isinstance(spec, Mapping)
        # A spec with Kubernetes platform config comes as {"pipeline_spec": ..., "platform_spec": ...}.
        pipeline = spec.get("pipeline_spec", spec)
        if (
            not isinstance(pipeline, Mapping)
            or "root" not in pipeline
            or not _field(pipeline, "pipeline_info")
        ):
            raise ApiError(
                400, "Invalid input error: pipeline_spec is not a PipelineSpec (no root/pipelineInfo)"
            )
        runtime_config = dict(_field(body, "runtime_config") or {})
        parameters = dict(runtime_config.get("parameters") or {})
        inputs = _root_inputs(pipeline)
        unknown = sorted(set(parameters) - set(inputs))
        missing = sorted(
            key
            for key, definition in inputs.items()
            if key not in parameters
            and _field(definition, "default_value") is None
            and not _field(definition, "is_optional")
        )
        if unknown or missing:
            raise ApiError(
                400, f"Invalid input error: runtime parameters unknown {unknown}, missing {missing}"
            )
        experiment_id = str(_field(body, "experiment_id") or request.query_params.get("experiment_id") or "")
        if experiment_id:
            if experiment_id not in self.experiments:
                raise ApiError(404, f"Experiment {experiment_id} not found")
            self._authorize(request, str(self.experiments[experiment_id].get("namespace", "")))
        else:
            self._authorize(request, str(body.get("namespace") or ""))
            experiment_id = self._default_experiment(str(body.get("namespace") or ""))["experiment_id"]
        run = self._new_run(name, experiment_id, copy.deepcopy(dict(spec)), runtime_config, _now())
        for key in ("description", "service_account"):
            if value := _field(body, key):
                run[key] = value
        self._transition(run, "PENDING", None)
        return copy.deepcopy(run)

    def _get_run(self, request: Request, body: Any) -> Json:
        run_id = request.path_params["run_id"]
        if run_id not in self.runs:
            raise ApiError(404, f"Run {run_id} not found")
        self._authorize(request, self._namespace_of(self.runs[run_id]))
        return copy.deepcopy(self.runs[run_id])

    def _terminate_run(self, request: Request, body: Any) -> Json:
        run_id = request.path_params["run_id"]
        run = self.runs.get(run_id)
        if run is None:
            raise ApiError(404, f"Run {run_id} not found")
        self._authorize(request, self._namespace_of(run))
        if run["state"] in FINISHED_STATES:
            raise ApiError(400, f"Failed to terminate run {run_id}: it is already {run['state']}")
        self._transition(run, "CANCELING", None)
        if self.terminate_state == "CANCELED":
            self._transition(run, "CANCELED", None)
        return {}

    async def _not_found(self, request: Request) -> JSONResponse:
        self._record(request, await _read_json(request))
        return _error(404, f"Not Found: {request.method} {request.url.path}")

    # ---- plumbing -------------------------------------------------------------------------------

    def _record(self, request: Request, body: Any) -> None:
        with self._lock:
            self.calls.append(Call(request.method, request.url.path, dict(request.query_params), body))

    def _fault(self, request: Request, after: bool) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if (
                    fault.times > 0
                    and fault.after == after
                    and fault.method == request.method
                    and fault.path.search(request.url.path)
                ):
                    fault.times -= 1
                    return fault
        return None

    def _endpoint(
        self, handler: Callable[[Request, Any], Json]
    ) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def endpoint(request: Request) -> JSONResponse:
            body = await _read_json(request)
            self._record(request, body)
            if (fault := self._fault(request, after=False)) is not None:
                return _error(fault.status, fault.message)
            try:
                with self._lock:
                    result = handler(request, body)
            except ApiError as exc:
                return _error(exc.status, exc.message)
            if (fault := self._fault(request, after=True)) is not None:
                return _error(fault.status, fault.message)
            return JSONResponse(result)

        return endpoint

    def _build_app(self) -> Starlette:
        routes = [
            Route(f"{API}/healthz", self._endpoint(self._healthz), methods=["GET"]),
            Route(f"{API}/experiments", self._endpoint(self._list_experiments), methods=["GET"]),
            Route(f"{API}/experiments", self._endpoint(self._create_experiment), methods=["POST"]),
            Route(
                f"{API}/experiments/{{experiment_id}}", self._endpoint(self._get_experiment), methods=["GET"]
            ),
            Route(f"{API}/runs", self._endpoint(self._list_runs), methods=["GET"]),
            Route(f"{API}/runs", self._endpoint(self._create_run), methods=["POST"]),
            Route(f"{API}/runs/{{run_id}}:terminate", self._endpoint(self._terminate_run), methods=["POST"]),
            Route(f"{API}/runs/{{run_id}}", self._endpoint(self._get_run), methods=["GET"]),
            Route("/{path:path}", self._not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ]
        return Starlette(routes=routes)


async def _read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw.decode(errors="replace")


def _error(status: int, message: str) -> JSONResponse:
    code = _GRPC_CODES.get(status, 2)
    return JSONResponse(
        {"error": message, "code": code, "message": message, "details": []}, status_code=status
    )


@dataclass
class EmulatorServer:
    """uvicorn serving a :class:`KfpEmulator` on ``host:<free port>`` in a daemon thread."""

    emulator: KfpEmulator
    host: str = "127.0.0.1"
    url: str = ""
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _socket: socket.socket | None = field(default=None, repr=False)

    def start(self, timeout: float = 10.0) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.emulator.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = server = uvicorn.Server(config)
        self._socket = sock
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"kfp-emulator-{port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the KFP emulator's server exited on startup")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the KFP emulator did not start within {timeout}s")
            time.sleep(0.01)
        self.url = f"http://{self.host}:{port}"
        self.emulator.url = self.url
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the KFP emulator did not stop within {timeout}s")
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
        self.emulator.url = None
