"""The LoRA versions of one ModelDeployment that share a base model, served locally by one process.

``bentoml serve kubetune_components.serving.shared_service:SharedAdapterService`` on a loopback port,
started with the versions of the group (``KUBETUNE_ADAPTERS``), probed until ready and restarted with
a growing backoff when it crashes, like a version's own server. A version that joins the group, or
whose adapter changes, is loaded into the running server (``PUT /adapters/<version>``); one that
leaves it is unloaded (``DELETE``) once the gateway has stopped routing to it. Each version's URL is
``<server>/adapters/<version>`` (``shared_api``), so the gateway reaches it as it reaches any other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

import httpx

from kubetune.common.supervision import Backoff, ManagedProcess, describe_exit, stop_processes
from kubetune.kube.adapter_group import group_id
from kubetune.local.serving_host import LOOPBACK, ServingHost
from kubetune.local.version_server import cpu_threads, local_model_dir
from kubetune.plan.versions import DeploymentRef, VersionObservation, VersionServing
from kubetune_contract.serving import ADAPTERS_ENV, ADAPTERS_PATH, VERSION_ENV

SERVICE = "kubetune_components.serving.shared_service:SharedAdapterService"
ADAPTER_LOAD_TIMEOUT_S = 120.0
RETIRE_GRACE_S = 5.0  # a version leaving the group serves on until the gateway has reloaded (1 s)


def group_name(base_model_uri: str) -> str:
    """The directory of a group's logs: ``adapters-<hash of the base model URI>``."""
    return group_id(base_model_uri)


class SharedAdapterServer:
    """One base model's LoRA versions in one `bentoml serve` process, stepped once per reconcile pass."""

    def __init__(self, deployment: DeploymentRef, base_model_uri: str, *, host: ServingHost) -> None:
        self.deployment = deployment
        self.base_model_uri = base_model_uri
        self.host = host
        self.directory = host.root / deployment.namespace / deployment.name / group_name(base_model_uri)
        self.port = host.ports.allocate()
        self.server: ManagedProcess | None = None
        self.backoff = Backoff()
        self.ready_since: float | None = None
        self.loaded: dict[str, str] = {}
        """Version -> the model directory the running server holds for it."""
        self.leaving: dict[str, float] = {}
        """Versions no longer in the group -> when to unload them."""
        self.problems: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def role(self) -> str:
        return f"the shared adapter server of modeldeployment/{self.deployment.name} ({self.base_model_uri})"

    def version_url(self, version: str) -> str:
        return f"{self.url}{ADAPTERS_PATH}/{version}"

    def processes(self) -> list[ManagedProcess]:
        return [self.server] if self.server is not None else []

    # -- one pass --------------------------------------------------------------------------------------

    def step(self, members: Sequence[VersionServing]) -> dict[str, VersionObservation]:
        now = time.monotonic()
        wanted = {member.name: _model_dir(member) for member in members}
        for name in self.loaded:
            if name not in wanted and name not in self.leaving:
                self.leaving[name] = now + RETIRE_GRACE_S
        for name in wanted:
            self.leaving.pop(name, None)
        if self.server is not None and (code := self.server.exit_code()) is not None:
            problem = f"bentoml serve {describe_exit(code)}"
            if code > 0:
                problem += f": {self.server.last_problem()}"
            self._crashed(problem)
        if self.server is None:
            if not members:
                return {}
            wait = self.backoff.waiting(now)
            if wait > 0:
                message = f"{self.backoff.problem}; restarting it in {wait:.0f}s (log: {self._log})"
                return self._all(members, False, message)
            self._start(members)
            return self._all(members, False, f"starting {self.role} on {self.url} (log: {self._log})")
        if not self._ready(now):
            return self._all(
                members, False, f"starting: {self.role} is loading the base model (log: {self._log})"
            )
        self._sync(wanted, now)
        observations: dict[str, VersionObservation] = {}
        for name, model_dir in wanted.items():
            failure = self.problems.get(name)
            if self.loaded.get(name) == model_dir:
                observations[name] = VersionObservation(url=self.version_url(name), ready=True)
            else:
                message = failure or f"loading the adapter {model_dir} into {self.role}"
                observations[name] = VersionObservation(
                    url=self.version_url(name), ready=False, message=message, failed=failure is not None
                )
        return observations

    def _all(
        self, members: Sequence[VersionServing], ready: bool, message: str
    ) -> dict[str, VersionObservation]:
        return {
            member.name: VersionObservation(url=self.version_url(member.name), ready=ready, message=message)
            for member in members
        }

    @property
    def _log(self) -> str:
        return str(self.directory / "server.log")

    def _ready(self, now: float) -> bool:
        assert self.server is not None
        if self.server.track():
            self.host.processes_changed()
        status, detail = self.host.probe(f"{self.url}/readyz")
        if status == 200:
            if self.ready_since is None:
                self.ready_since = now
                self.host.notify(
                    f"{self.role} is ready at {self.url} (pid {self.server.pid}, log {self._log})"
                )
            else:
                self.backoff.settle(self.ready_since, now)
            return True
        if self.ready_since is not None:
            self.host.notify(f"{self.role} stopped answering {self.url}/readyz ({detail}); log: {self._log}")
            self.ready_since = None
        live_status, _ = self.host.probe(f"{self.url}/livez")
        if live_status is not None and live_status != 200:
            self._crashed(
                f"the model server cannot serve (/livez {live_status}): {self.server.last_problem()}"
            )
        return False

    def _sync(self, wanted: Mapping[str, str], now: float) -> None:
        """Load the versions the server lacks (or holds another adapter for), unload the leavers."""
        for name, model_dir in wanted.items():
            if self.loaded.get(name) == model_dir or self.problems.get(name, "").startswith(model_dir):
                continue
            try:
                response = self.host.http.put(
                    self.version_url(name), json={"modelDir": model_dir}, timeout=ADAPTER_LOAD_TIMEOUT_S
                )
            except httpx.HTTPError as exc:
                self.host.notify(f"{self.role}: loading version {name} failed ({exc}); retrying")
                continue
            if response.status_code == 200:
                self.loaded[name] = model_dir
                self.problems.pop(name, None)
                self.host.notify(f"{self.role}: loaded version {name} from {model_dir}")
            else:
                self.problems[name] = f"{model_dir}: {_error_message(response)}"
                self.host.notify(f"{self.role}: cannot load version {name}: {self.problems[name]}")
        for name, when in list(self.leaving.items()):
            if when > now:
                continue
            try:
                self.host.http.delete(self.version_url(name), timeout=ADAPTER_LOAD_TIMEOUT_S)
            except httpx.HTTPError as exc:
                self.host.notify(f"{self.role}: unloading version {name} failed ({exc}); retrying")
                continue
            del self.leaving[name]
            self.loaded.pop(name, None)
            self.host.notify(f"{self.role}: unloaded version {name}")

    # -- the process -----------------------------------------------------------------------------------

    def _start(self, members: Sequence[VersionServing]) -> None:
        self.port = self.host.free_port_for(self.role, self.port)
        adapters = {member.name: _model_dir(member) for member in members}
        env = self.host.base_env()
        env.update({key: value for key, value in members[0].env.items() if key != VERSION_ENV})
        env[ADAPTERS_ENV] = json.dumps(adapters)
        resources = members[0].serving.resources
        threads = cpu_threads(resources.limits) or cpu_threads(resources.requests)
        if threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            self.host.python,
            "-m",
            "bentoml",
            "serve",
            SERVICE,
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
        ]
        self.server = ManagedProcess(
            f"bentoml serve for {self.role}",
            command,
            env=env,
            log=self.directory / "server.log",
            cwd=self.directory,
        )
        self.loaded = dict(adapters)
        self.leaving.clear()
        self.problems.clear()
        self.ready_since = None
        self.host.processes_changed()
        self.host.notify(
            f"started {self.role} with versions {', '.join(adapters)} on {self.url} "
            f"(pid {self.server.pid}, log {self._log})"
        )

    def _crashed(self, problem: str) -> None:
        self.stop_server()
        delay = self.backoff.fail(problem, time.monotonic())
        self.host.notify(
            f"{self.role}: {problem}; restarting it in {delay:g}s "
            f"(failure {self.backoff.failures} in a row; log: {self._log})"
        )

    def stop_server(self) -> None:
        if self.server is not None:
            stop_processes([self.server], self.host.stop_grace_s)
        self.server, self.ready_since = None, None
        self.loaded.clear()
        self.host.processes_changed()

    def stop(self) -> None:
        """Stop the server and give back its port."""
        self.stop_server()
        self.host.ports.release(self.port)

    def forget(self) -> None:
        """Give back its port; its process is stopped by the caller."""
        self.host.ports.release(self.port)


def _model_dir(member: VersionServing) -> str:
    directory = local_model_dir(member.model_uri)
    assert directory is not None, "only local adapters are grouped (LocalServing checks)"
    return directory


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"
