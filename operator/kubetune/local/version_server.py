"""One version of a ModelDeployment served locally: its Bento built, `bentoml serve` started on a
loopback port, probed until ready, and restarted with a growing backoff when it crashes.

The model is packaged with ``kubetune_components.serving.bento`` (``build_bento``, run as a
subprocess so the reconcile loop never blocks on it, one build at a time) into a BentoML home under
the kubetune home, then served with ``bentoml serve <tag>`` and the contract's environment plus
``KUBETUNE_MODEL_DIR`` (the published model directory itself, when it is local). A version is
ready when its ``/readyz`` answers 200.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from kubetune.common.supervision import Backoff, ManagedProcess, describe_exit, stop_processes
from kubetune.local.demand import VersionDemand
from kubetune.local.serving_host import LOOPBACK, ServingHost
from kubetune.local.vllm_check import local_vllm_problem
from kubetune.plan.versions import DeploymentRef, VersionObservation, VersionServing
from kubetune_contract.deployment import Autoscaling
from kubetune_contract.serving import MODEL_DIR_ENV

BENTO_MODULE = "kubetune_components.serving.bento"
# A version scaling to zero is reported not ready this long before its server stops: the gateway
# reloads its config within a second and holds the version's requests from then on.
SCALE_DOWN_GRACE_S = 3.0


def local_model_dir(model_uri: str) -> str | None:
    """The directory of a local model URI (a path or file://), None for remote ones (hf://, s3://…):
    those are served from the copy the Bento build downloaded into the model store."""
    if model_uri.startswith("file://"):
        return model_uri.removeprefix("file://")
    if "://" in model_uri:
        return None
    return model_uri


def cpu_threads(resources: Mapping[str, str]) -> int | None:
    """Whole CPUs in a Kubernetes quantity ("2", "1500m" -> 2; "500m" -> 1), None when unset."""
    raw = resources.get("cpu")
    if raw is None:
        return None
    try:
        cpus = Decimal(raw[:-1]) / 1000 if raw.endswith("m") else Decimal(raw)
    except InvalidOperation:
        return None
    return max(1, int(cpus.to_integral_value(rounding="ROUND_CEILING")))


def built_tag(build: ManagedProcess, name: str) -> str | None:
    """The tag the build printed (its last line of the form ``<name>:<version id>``)."""
    try:
        with build.log.open("rb") as handle:
            handle.seek(build.log_offset)
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    tags = re.findall(rf"^({re.escape(name)}:[0-9a-z]+)\s*$", text, re.MULTILINE)
    return tags[-1] if tags else None


def model_fingerprint(model_uri: str) -> tuple[tuple[str, int, int], ...]:
    """What tells a changed local model from the one built before: the name, size and modification
    time of the directory's entries (the directory itself when it is a file); empty for a remote URI
    or a path that does not exist."""
    directory = local_model_dir(model_uri)
    if directory is None:
        return ()
    root = Path(directory)
    try:
        entries = sorted(root.iterdir()) if root.is_dir() else [root]
        stats = [(entry.name, entry.stat()) for entry in entries]
    except OSError:
        return ()
    return tuple((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats)


@dataclass(frozen=True)
class BuildAttempt:
    """A failed Bento build: which model (and its files as they were) and what went wrong."""

    model_uri: str
    fingerprint: tuple[tuple[str, int, int], ...]
    problem: str


@dataclass
class BuildSlot:
    """Bento builds run one at a time (each loads a model): the version building now, if any."""

    holder: VersionServer | None = None


class VersionServer:
    """The Bento build and the `bentoml serve` process of one version, stepped once per reconcile pass."""

    def __init__(
        self,
        deployment: DeploymentRef,
        spec: VersionServing,
        *,
        host: ServingHost,
        builds: BuildSlot,
    ) -> None:
        self.deployment = deployment
        self.spec = spec
        self.host = host
        self.builds = builds
        self.directory = host.root / deployment.namespace / deployment.name / spec.name
        self.port = host.ports.allocate()
        self.tag: str | None = None  # the Bento built for `built_from`
        self.built_from: str | None = None
        self.build: ManagedProcess | None = None
        self.building_from: str | None = None
        self.build_backoff = Backoff()
        self.last_failed_build: BuildAttempt | None = None
        self.build_failure: BuildAttempt | None = None  # failed twice alike: not retried until a change
        self.server: ManagedProcess | None = None
        self.server_identity: tuple[str, ...] | None = None
        self.server_backoff = Backoff()
        self.ready_since: float | None = None
        self.asleep = False  # scaled to zero (spec.serving.autoscaling.minReplicas 0)
        self.active_at = 0.0  # when the gateway last showed a request for it (monotonic)
        self.attempts_seen: float | None = None  # the gateway's count of requests sent it, then
        self.scaling_down_since: float | None = None  # reported not ready, so the gateway holds

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def role(self) -> str:
        return f"version {self.spec.name} of modeldeployment/{self.deployment.name}"

    def processes(self) -> list[ManagedProcess]:
        return [process for process in (self.server, self.build) if process is not None]

    # -- one pass --------------------------------------------------------------------------------------

    def step(self, demand: VersionDemand | None = None) -> VersionObservation:
        """One pass; ``demand`` is what the gateway says of the version's requests (None: unknown),
        which a version scaling to zero stops and starts on."""
        now = time.monotonic()
        spec = self.spec
        self._explain_local_limits()
        if spec.serving.engine == "vllm" and (problem := local_vllm_problem(self.host.python)) is not None:
            return VersionObservation(url=None, ready=False, message=problem, failed=True)
        if spec.serving.replicas == 0:
            if self.server is not None:
                self._stop_server()
                self.host.notify(f"stopped {self.role}: spec.serving.replicas is 0")
            return VersionObservation(
                url=None, ready=False, message="spec.serving.replicas is 0, so no server runs for it"
            )
        if self.built_from != spec.model_uri:
            # The server of a previous model keeps running until the new model's Bento is built.
            waiting = self._step_build(now)
            if self.build_failure is not None:
                return VersionObservation(url=self.url, ready=False, message=waiting, failed=True)
            if waiting is not None:
                return VersionObservation(url=self.url, ready=False, message=waiting)
        assert self.tag is not None
        autoscaling = spec.serving.autoscaling
        if autoscaling is not None and autoscaling.scales_to_zero:
            asleep = self._step_scale_to_zero(autoscaling, demand, now)
            if asleep is not None:
                return asleep
        elif self.asleep:
            self.asleep = False  # minReplicas is no longer 0: it serves again
        identity = self._server_identity()
        if self.server is not None and self.server_identity != identity:
            self.host.notify(f"restarting {self.role}: now serving Bento {self.tag} ({spec.model_uri})")
            self._stop_server()
            self.server_backoff.reset()
        if self.server is not None and (code := self.server.exit_code()) is not None:
            problem = f"bentoml serve {describe_exit(code)}"
            if code > 0:
                problem += f": {self.server.last_problem()}"
            self._crashed(problem)
        if self.server is None:
            wait = self.server_backoff.waiting(now)
            if wait > 0:
                log = self.directory / "server.log"
                message = f"{self.server_backoff.problem}; restarting it in {wait:.0f}s (log: {log})"
                return VersionObservation(url=self.url, ready=False, message=message)
            server = self._start_server()
            return VersionObservation(
                url=self.url,
                ready=False,
                message=f"starting bentoml serve {self.tag} on {self.url} (log: {server.log})",
            )
        return self._step_readiness(self.server, now)

    def _step_scale_to_zero(
        self, autoscaling: Autoscaling, demand: VersionDemand | None, now: float
    ) -> VersionObservation | None:
        """Stop the server after scaleToZeroAfter without requests; start it again when the gateway
        holds one. Returns the observation of a version going or gone to zero, None to carry on.

        The server is first reported not ready and stopped only :data:`SCALE_DOWN_GRACE_S` later, once
        the gateway has reloaded its config: from then on it holds the version's requests instead of
        sending them to a server that is stopping (a request in that window is served and keeps it up).
        """
        if demand is not None and (demand.open > 0 or demand.attempts != self.attempts_seen):
            self.attempts_seen = demand.attempts
            self.active_at = now
            self.scaling_down_since = None
            if self.asleep:
                self.asleep = False
                self.host.notify(f"waking {self.role}: the gateway holds a request for it")
            return None
        idle_s = autoscaling.idle_seconds_before_zero
        if not self.asleep:
            if self.server is None or self.ready_since is None or demand is None:
                return None  # the idle time counts from when it is ready, and from what the gateway says
            if now - max(self.active_at, self.ready_since) < idle_s:
                return None
            if self.scaling_down_since is None:
                self.scaling_down_since = now
            if now - self.scaling_down_since < SCALE_DOWN_GRACE_S:
                return VersionObservation(
                    url=self.url,
                    ready=False,
                    message=f"scaling to zero: no request for {idle_s:g}s; its server stops once the "
                    "gateway holds its requests",
                )
            self._stop_server()
            self.asleep, self.scaling_down_since = True, None
            self.host.notify(
                f"scaled {self.role} to zero: no request for {idle_s:g}s (scaleToZeroAfter); "
                "the next request starts it again"
            )
        return VersionObservation(
            url=self.url,
            ready=False,
            message=f"scaled to zero (spec.serving.autoscaling.minReplicas 0): no request for {idle_s:g}s; "
            "the gateway holds the next one while it starts",
            scaled_to_zero=True,
        )

    def _step_readiness(self, server: ManagedProcess, now: float) -> VersionObservation:
        if server.track():
            self.host.processes_changed()
        status, detail = self.host.probe(f"{self.url}/readyz")
        if status == 200:
            if self.ready_since is None:
                self.ready_since = now
                self.host.notify(f"{self.role} is ready at {self.url} (pid {server.pid}, log {server.log})")
            else:
                self.server_backoff.settle(self.ready_since, now)
            return VersionObservation(url=self.url, ready=True)
        if self.ready_since is not None:
            self.host.notify(f"{self.role} stopped answering {self.url}/readyz ({detail}); log: {server.log}")
            self.ready_since = None
        live_status, _ = self.host.probe(f"{self.url}/livez")
        if live_status is not None and live_status != 200:
            # The service is up but says it cannot serve (its model failed to load): like a failing
            # liveness probe on a cluster, it is restarted with a backoff.
            self._crashed(f"the model server cannot serve (/livez {live_status}): {server.last_problem()}")
            wait = self.server_backoff.waiting(time.monotonic())
            message = f"{self.server_backoff.problem}; restarting it in {wait:.0f}s (log: {server.log})"
            return VersionObservation(url=self.url, ready=False, message=message)
        elapsed = now - server.started
        return VersionObservation(
            url=self.url,
            ready=False,
            message=f"starting: bentoml serve {self.tag} (pid {server.pid}) is loading the model "
            f"({elapsed:.0f}s; log: {server.log})",
        )

    def _crashed(self, problem: str) -> None:
        assert self.server is not None
        log = self.server.log
        self._stop_server()
        delay = self.server_backoff.fail(problem, time.monotonic())
        self.host.notify(
            f"{self.role}: {problem}; restarting it in {delay:g}s "
            f"(failure {self.server_backoff.failures} in a row; log: {log})"
        )

    # -- the Bento build -------------------------------------------------------------------------------

    def _step_build(self, now: float) -> str | None:
        """Advance the Bento build of the version's model; a message while it is not built."""
        spec = self.spec
        log = self.directory / "build.log"
        if self.build is not None:
            build = self.build
            code = build.exit_code()
            if code is None:
                elapsed = now - build.started
                return (
                    f"building the Bento {spec.bento} for {self.building_from} ({elapsed:.0f}s; log: {log})"
                )
            self.build = None
            self._leave_build_slot()
            self.host.processes_changed()
            tag = built_tag(build, spec.bento) if code == 0 else None
            if self.building_from != spec.model_uri:
                return self._step_build(now)  # the model changed meanwhile: build the new one
            if tag is None:
                problem = (
                    f"building the Bento {spec.bento} for {self.building_from} failed "
                    f"(exit code {code}): {build.last_problem()}"
                )
                attempt = BuildAttempt(spec.model_uri, model_fingerprint(spec.model_uri), problem)
                if attempt == self.last_failed_build:
                    self.build_failure = attempt
                    message = self._build_failure_message(log)
                    self.host.notify(f"{self.role}: {message}")
                    return message
                self.last_failed_build = attempt
                delay = self.build_backoff.fail(problem, now)
                retry = f"retrying in {delay:g}s, attempt {self.build_backoff.failures + 1}"
                self.host.notify(f"{self.role}: {problem}; {retry} (log: {log})")
                return f"{problem}; {retry} (log: {log})"
            self.tag, self.built_from = tag, self.building_from
            self.build_backoff.reset()
            self.last_failed_build = self.build_failure = None
            self.host.notify(f"built Bento {tag} for {self.role} (log: {log})")
            return None
        if self.build_failure is not None:
            fingerprint = model_fingerprint(spec.model_uri)
            if (self.build_failure.model_uri, self.build_failure.fingerprint) == (
                spec.model_uri,
                fingerprint,
            ):
                return self._build_failure_message(log)
            # Another model, or the model's files changed: worth building again.
            self.build_failure = self.last_failed_build = None
            self.build_backoff.reset()
        wait = self.build_backoff.waiting(now)
        if wait > 0:
            next_attempt = self.build_backoff.failures + 1
            return (
                f"{self.build_backoff.problem}; retrying in {wait:.0f}s, attempt {next_attempt} (log: {log})"
            )
        building = self.builds.holder
        if building is not None and building is not self:
            return (
                f"waiting to build the Bento {spec.bento} (one build at a time; {building.role} is building)"
            )
        command = [
            self.host.python,
            "-m",
            BENTO_MODULE,
            "--bentoml-home",
            str(self.host.bentoml_home),
            "build",
            "--model-dir",
            spec.model_uri,
            "--deployment",
            self.deployment.name,
            "--version",
            spec.name,
            "--engine",
            spec.serving.engine,
        ]
        self.build = ManagedProcess(
            f"Bento build for {self.role}", command, env=self.host.base_env(), log=log, cwd=self.directory
        )
        self.building_from = spec.model_uri
        self.builds.holder = self
        self.host.processes_changed()
        self.host.notify(f"building Bento {spec.bento} for {self.role} from {spec.model_uri} (log: {log})")
        return f"building the Bento {spec.bento} for {spec.model_uri} (log: {log})"

    def _build_failure_message(self, log: Path) -> str:
        assert self.build_failure is not None
        return (
            f"{self.build_failure.problem}; it failed the same way twice, so it is not built again "
            f"until the version's model or its files change (log: {log})"
        )

    def _leave_build_slot(self) -> None:
        if self.builds.holder is self:
            self.builds.holder = None

    # -- the server ------------------------------------------------------------------------------------

    def _server_identity(self) -> tuple[str, ...]:
        """What the running server must match, or be restarted: the Bento and the kubetune settings."""
        env = self._server_env()
        return (str(self.tag), *(f"{key}={env[key]}" for key in sorted(env) if key.startswith("KUBETUNE_")))

    def _server_env(self) -> dict[str, str]:
        env = self.host.base_env()
        env.update(self.spec.env)
        model_dir = local_model_dir(self.spec.model_uri)
        if model_dir is not None:
            env[MODEL_DIR_ENV] = model_dir
        resources = self.spec.serving.resources
        threads = cpu_threads(resources.limits) or cpu_threads(resources.requests)
        if threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        return env

    def _start_server(self) -> ManagedProcess:
        self.port = self.host.free_port_for(self.role, self.port)
        command = [
            self.host.python,
            "-m",
            "bentoml",
            "serve",
            str(self.tag),
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
        ]
        log = self.directory / "server.log"
        server = ManagedProcess(
            f"bentoml serve for {self.role}",
            command,
            env=self._server_env(),
            log=log,
            cwd=self.directory,
        )
        self.server = server
        self.server_identity = self._server_identity()
        self.ready_since = None
        self.host.processes_changed()
        self.host.notify(
            f"started bentoml serve {self.tag} for {self.role} on {self.url} (pid {server.pid}, log {log})"
        )
        return server

    def _stop_server(self) -> None:
        if self.server is not None:
            stop_processes([self.server], self.host.stop_grace_s)
        self.server, self.server_identity, self.ready_since = None, None, None
        self.host.processes_changed()

    # -- leaving ---------------------------------------------------------------------------------------

    def stop_build(self) -> None:
        if self.build is not None:
            stop_processes([self.build], self.host.stop_grace_s)
            self.build = None
            self._leave_build_slot()

    def stop(self) -> None:
        """Stop its server and build, and give back its port."""
        stop_processes(self.processes(), self.host.stop_grace_s)
        self.server = self.build = None
        self._leave_build_slot()
        self.host.ports.release(self.port)
        self.host.processes_changed()

    def forget(self) -> None:
        """Give back its port and build slot; its processes are stopped by the caller."""
        self._leave_build_slot()
        self.host.ports.release(self.port)

    def _explain_local_limits(self) -> None:
        """Say once which spec.serving settings only a cluster applies (nothing is dropped silently)."""
        serving = self.spec.serving
        ignored = []
        if serving.replicas > 1:
            ignored.append(f"replicas {serving.replicas} (one server per version)")
        if serving.autoscaling is not None:
            # minReplicas 0 is applied (the server stops when idle and starts on demand); the rest is not
            ignored.append(
                "autoscaling other than minReplicas 0 (one server per version)"
                if serving.autoscaling.scales_to_zero
                else "autoscaling"
            )
        memory = {**serving.resources.requests, **serving.resources.limits}.get("memory")
        if memory is not None:
            ignored.append(f"memory {memory} (not enforced)")
        if self.spec.token_secret is not None:
            ignored.append("tokenSecretRef (the hub token comes from HF_TOKEN in your environment)")
        if ignored:
            self.host.notify_once(
                f"modeldeployment/{self.deployment.name}: local mode ignores spec.serving "
                + ", ".join(ignored)
            )
