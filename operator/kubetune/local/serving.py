"""Local serving of ModelDeployments (`kubetune up`): one `bentoml serve` per version and the gateway,
as processes on free loopback ports.

For each version the model is packaged with ``kubetune_components.serving.bento`` (``build_bento``,
run as a subprocess so the reconcile loop never blocks on it, one build at a time) into a BentoML
home under the kubetune home, then served with ``bentoml serve <tag>`` and the contract's
environment plus ``KUBETUNE_MODEL_DIR`` (the published model directory itself, when it is local).
A version is ready when its ``/readyz`` answers 200. The gateway is ``python -m kubetune.gateway``
reading a config file that is rewritten atomically when the weights change; it reloads the file,
so the version servers and the gateway keep running (same processes) through a weight change.

Every process runs in its own session with its output in a log file; a process that exits on its
own is reported (in the observation's message, so in the ModelDeployment's status, and through
``notify``) and started again with a growing backoff. Stopping sends SIGTERM to the process group,
then SIGKILL to whatever is left, including descendants that left the group (BentoML's workers run
in sessions of their own). On Linux the kernel sends each process SIGTERM when `kubetune up` dies,
however it dies; and ``serving/processes.json`` lists every live process with its start time, so
whatever a `kubetune up` killed outright left behind is stopped by the next one.

Layout under the kubetune home::

    bentoml/                                 BENTOML_HOME: the model and Bento stores
    serving/processes.json                   the processes started, for cleanup after a hard kill
    serving/<namespace>/<deployment>/gateway.json, gateway.log
    serving/<namespace>/<deployment>/<version>/build.log, server.log
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import httpx
import psutil

from kubetune.backends.local import process_alive
from kubetune.common.clock import utc_now
from kubetune.common.files import read_json, write_json_atomically
from kubetune.reconcile.deployment import (
    DeploymentRef,
    GatewayObservation,
    VersionObservation,
    VersionServing,
)
from kubetune_contract.serving import MODEL_DIR_ENV

LOOPBACK = "127.0.0.1"
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)
STABLE_AFTER_S = 60.0  # a process that stays up this long starts its backoff afresh
PROBE_TIMEOUT_S = 1.0
STOP_GRACE_S = 15.0
RELOAD_WAIT_S = 3.0  # the gateway checks its config file every second
RETIRE_GRACE_S = 5.0  # a version taken out of the spec serves on until the gateway has reloaded (1 s)
BENTO_MODULE = "kubetune_components.serving.bento"
GATEWAY_MODULE = "kubetune.gateway"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None

Notify = Callable[[str], None]
# "ValueError: ...", "[ERROR]", "error: ...", "... failed": not a warning that mentions a future error.
ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b:|\bERROR\b|^error:|\bfailed\b|^Traceback")


def _ignore(_: str) -> None:
    pass


def _create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


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


def last_problem_line(log: Path, offset: int = 0) -> str:
    """The last line of ``log`` (after ``offset``) that reads like an error, else its last line."""
    try:
        with log.open("rb") as handle:
            handle.seek(offset)
            lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if ERROR_LINE.search(line):
            return line[:300]
    return lines[-1][:300] if lines else "(the log is empty)"


def _stop_with_parent() -> Callable[[], None] | None:
    """What a child runs before exec so the kernel sends it SIGTERM when `kubetune up` dies, however it
    dies (SIGKILL, the OOM killer): without it a server outlives a killed `up`, holding its port and
    the model's memory until the next `up` reaps it. SIGTERM, not SIGKILL, so that `bentoml serve`
    stops its workers (they run in sessions of their own). Linux only; the signal follows the thread
    that started the child, and `up` starts every child from its main thread."""
    if _LIBC is None:
        return None
    libc, parent = _LIBC, os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # `up` died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class ManagedProcess:
    """A child process in its own session, and every descendant it was seen to have.

    Descendants are remembered because some leave the process group (BentoML starts its workers in
    sessions of their own) and outlive a parent that crashed, still holding the port.
    """

    def __init__(
        self, role: str, command: Sequence[str], *, env: Mapping[str, str], log: Path, cwd: Path
    ) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        cwd.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as output:
            self.log_offset = output.tell()
            output.write(f"\n=== {utc_now()} {shlex.join(command)}\n".encode())
            output.flush()
            self.popen = subprocess.Popen(
                list(command),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_stop_with_parent(),
            )
        self.role = role
        self.log = log
        self.command = list(command)
        self.pid = self.popen.pid
        self.created = _create_time(self.pid)
        self.started = time.monotonic()
        self.descendants: dict[int, float] = {}

    def exit_code(self) -> int | None:
        return self.popen.poll()

    def track(self) -> bool:
        """Remember descendants not seen before; True when there were any."""
        if self.popen.poll() is not None:
            return False
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return False
        changed = False
        for child in children:
            if child.pid in self.descendants:
                continue
            with contextlib.suppress(psutil.Error):
                self.descendants[child.pid] = float(child.create_time())
                changed = True
        return changed

    def alive_descendants(self) -> list[int]:
        return [pid for pid, created in self.descendants.items() if process_alive(pid, created)]

    def running(self) -> bool:
        return self.popen.poll() is None or bool(self.alive_descendants())

    def send(self, signum: int) -> None:
        """``signum`` to the process group; descendants outside it get it directly once the parent is
        gone (while it lives, the parent stops its own workers)."""
        self.track()
        parent_gone = self.popen.poll() is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)
        if parent_gone or signum == signal.SIGKILL:
            for pid in self.alive_descendants():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)

    def record(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "pid": self.pid,
            "created": self.created,
            "descendants": {str(pid): created for pid, created in self.descendants.items()},
            "command": self.command,
        }


def stop_processes(processes: Iterable[ManagedProcess], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to each (all at once), then SIGKILL to whatever still runs after ``grace_s``."""
    pending = list(processes)
    for process in pending:
        process.send(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pending and time.monotonic() < deadline:
        for process in pending:
            if process.popen.poll() is not None:
                # The parent is gone: a descendant that outlived it gets the signal directly.
                for pid in process.alive_descendants():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGTERM)
        pending = [process for process in pending if process.running()]
        if pending:
            time.sleep(0.1)
    for process in pending:
        process.send(signal.SIGKILL)
    kill_deadline = time.monotonic() + 5.0
    while any(process.running() for process in pending) and time.monotonic() < kill_deadline:
        time.sleep(0.05)
    for process in pending:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.popen.wait(timeout=1.0)


def _kill_recorded(record: Mapping[str, Any]) -> bool:
    """Stop a process listed by a previous run (and its descendants), if it still runs. True if it did."""
    members = [(record.get("pid"), record.get("created"))]
    members += [(int(pid), created) for pid, created in (record.get("descendants") or {}).items()]
    alive = [
        (pid, created) for pid, created in members if isinstance(pid, int) and process_alive(pid, created)
    ]
    if not alive:
        return False
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid, _ in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        deadline = time.monotonic() + (10.0 if signum == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            alive = [(pid, created) for pid, created in alive if process_alive(pid, created)]
            if not alive:
                return True
            time.sleep(0.1)
    return True


@dataclass
class Backoff:
    """Consecutive failures of one thing, and when to try it again."""

    failures: int = 0
    retry_at: float = 0.0
    problem: str | None = None

    def fail(self, problem: str, now: float) -> float:
        self.failures += 1
        delay = BACKOFF_S[min(self.failures, len(BACKOFF_S)) - 1]
        self.retry_at = now + delay
        self.problem = problem
        return delay

    def waiting(self, now: float) -> float:
        """Seconds left before the next try (0: try now)."""
        return max(0.0, self.retry_at - now) if self.problem is not None else 0.0

    def reset(self) -> None:
        self.failures, self.retry_at, self.problem = 0, 0.0, None


@dataclass
class _Version:
    deployment: DeploymentRef
    spec: VersionServing
    directory: Path
    port: int
    tag: str | None = None  # the Bento built for `built_from`
    built_from: str | None = None
    build: ManagedProcess | None = None
    building_from: str | None = None
    build_backoff: Backoff = field(default_factory=Backoff)
    server: ManagedProcess | None = None
    server_identity: tuple[str, ...] | None = None
    server_backoff: Backoff = field(default_factory=Backoff)
    ready_since: float | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def role(self) -> str:
        return f"version {self.spec.name} of modeldeployment/{self.deployment.name}"


@dataclass
class _Gateway:
    deployment: DeploymentRef
    directory: Path
    port: int
    written: str | None = None
    expected: dict[str, Any] = field(default_factory=dict)  # the weights of the config written
    routing: dict[str, Any] | None = None  # the weights the gateway last said it routes with
    process: ManagedProcess | None = None
    backoff: Backoff = field(default_factory=Backoff)
    ready_since: float | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / "gateway.json"

    @property
    def log(self) -> Path:
        return self.directory / "gateway.log"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def role(self) -> str:
        return f"the gateway of modeldeployment/{self.deployment.name}"


def _key(ref: DeploymentRef) -> tuple[str, str]:
    return ref.namespace, ref.name


class LocalServing:
    """The :class:`~kubetune.reconcile.deployment.ServingBackend` of `kubetune up`.

    ``notify`` receives a line for everything worth telling the person at the terminal: processes
    started, ready, crashed (with the log to read), restarted, stopped. Call :meth:`close` to stop
    every process (the owner of the ``kubetune up`` lock calls :meth:`reap_leftovers` first).
    """

    def __init__(
        self,
        home: Path,
        *,
        notify: Notify = _ignore,
        python: str = sys.executable,
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.home = home
        self.root = home / "serving"
        self.bentoml_home = home / "bentoml"
        self.notify = notify
        self.python = python
        self.stop_grace_s = stop_grace_s
        self._versions: dict[tuple[str, str], dict[str, _Version]] = {}
        self._gateways: dict[tuple[str, str], _Gateway] = {}
        self._building: _Version | None = None
        self._retiring: list[tuple[float, _Version]] = []  # (when to stop it, the version)
        self._ports: set[int] = set()
        self._notices: set[str] = set()
        self._http = httpx.Client(timeout=PROBE_TIMEOUT_S, trust_env=False)

    @property
    def registry_path(self) -> Path:
        return self.root / "processes.json"

    # -- the ServingBackend protocol -----------------------------------------------------------------

    def ensure_versions(
        self, deployment: DeploymentRef, versions: Sequence[VersionServing]
    ) -> Mapping[str, VersionObservation]:
        current = self._versions.setdefault(_key(deployment), {})
        wanted = {version.name for version in versions}
        for name in [name for name in current if name not in wanted]:
            self._retire(current.pop(name))
        self._stop_retired(lambda when, _: when <= time.monotonic())
        observations: dict[str, VersionObservation] = {}
        for spec in versions:
            state = current.get(spec.name)
            if state is None:
                directory = self.root / deployment.namespace / deployment.name / spec.name
                state = _Version(deployment, spec, directory, self._allocate_port())
                current[spec.name] = state
            state.spec = spec
            observations[spec.name] = self._step_version(state)
        return observations

    def ensure_gateway(self, deployment: DeploymentRef, config: Mapping[str, Any]) -> GatewayObservation:
        key = _key(deployment)
        state = self._gateways.get(key)
        if state is None:
            directory = self.root / deployment.namespace / deployment.name
            state = _Gateway(deployment, directory, self._allocate_port())
            self._gateways[key] = state
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        if text != state.written:
            self._write_config(state, text)
            state.written = text
            state.expected = {str(v["name"]): v["weight"] for v in config.get("versions") or []}
            if state.process is not None and state.routing is not None:
                self._await_reload(state)
        return self._step_gateway(state)

    def _await_reload(self, state: _Gateway) -> None:
        """Wait (a second or so) for a running gateway to route with the weights just written, so the
        status written after this pass never shows weights the gateway does not use yet."""
        deadline = time.monotonic() + RELOAD_WAIT_S
        while time.monotonic() < deadline:
            status, _, response = self._get(f"{state.url}/healthz")
            if status != 200 or response is None:
                return  # not answering: _step_gateway says so
            with contextlib.suppress(ValueError, AttributeError):
                if response.json().get("versions") == state.expected:
                    return
            time.sleep(0.1)

    def remove(self, deployment: DeploymentRef) -> None:
        key = _key(deployment)
        processes: list[ManagedProcess] = []
        gateway = self._gateways.pop(key, None)
        if gateway is not None:
            if gateway.process is not None:
                processes.append(gateway.process)
            self._ports.discard(gateway.port)
            with contextlib.suppress(FileNotFoundError):
                gateway.config_path.unlink()
        for state in self._versions.pop(key, {}).values():
            processes += [p for p in (state.server, state.build) if p is not None]
            if self._building is state:
                self._building = None
            self._ports.discard(state.port)
        retiring = [state for _, state in self._retiring if _key(state.deployment) == key]
        self._retiring = [(when, state) for when, state in self._retiring if state not in retiring]
        processes += [state.server for state in retiring if state.server is not None]
        if processes:
            stop_processes(processes, self.stop_grace_s)
            self.notify(f"stopped the {len(processes)} process(es) serving modeldeployment/{deployment.name}")
        self._save_registry()

    # -- the whole backend ---------------------------------------------------------------------------

    def deployments(self) -> list[DeploymentRef]:
        """The deployments this backend runs something for."""
        refs = {_key(g.deployment): g.deployment for g in self._gateways.values()}
        for versions in self._versions.values():
            for state in versions.values():
                refs.setdefault(_key(state.deployment), state.deployment)
        return list(refs.values())

    def processes(self) -> list[ManagedProcess]:
        """Every process running now: gateways first, then servers, then builds."""
        found = [g.process for g in self._gateways.values() if g.process is not None]
        for versions in self._versions.values():
            found += [s.server for s in versions.values() if s.server is not None]
        found += [state.server for _, state in self._retiring if state.server is not None]
        for versions in self._versions.values():
            found += [s.build for s in versions.values() if s.build is not None]
        return found

    def close(self) -> list[str]:
        """Stop every process; returns what was stopped (one line each)."""
        processes = self.processes()
        stopped = [f"{p.role} (pid {p.pid}, log {p.log})" for p in processes]
        stop_processes(processes, self.stop_grace_s)
        self._versions.clear()
        self._gateways.clear()
        self._retiring.clear()
        self._building = None
        self._ports.clear()
        self._save_registry()
        self._http.close()
        return stopped

    def reap_leftovers(self) -> int:
        """Stop the processes a previous `kubetune up` with this home left running (it was killed
        before it could stop them); returns how many were still running."""
        registry = read_json(self.registry_path) or {}
        owner, owner_created = registry.get("owner"), registry.get("ownerCreated")
        if owner != os.getpid() and process_alive(owner, owner_created):
            return 0  # that `kubetune up` still runs: its processes are its own
        stopped = sum(_kill_recorded(record) for record in (registry.get("processes") or []))
        with contextlib.suppress(FileNotFoundError):
            self.registry_path.unlink()
        return stopped

    # -- versions ------------------------------------------------------------------------------------

    def _step_version(self, state: _Version) -> VersionObservation:
        now = time.monotonic()
        spec = state.spec
        self._explain_local_limits(state)
        if spec.serving.replicas == 0:
            if state.server is not None:
                self._stop_server(state)
                self.notify(f"stopped {state.role}: spec.serving.replicas is 0")
            return VersionObservation(
                url=None, ready=False, message="spec.serving.replicas is 0, so no server runs for it"
            )
        if state.built_from != spec.model_uri:
            # The server of a previous model keeps running until the new model's Bento is built.
            waiting = self._step_build(state, now)
            if waiting is not None:
                return VersionObservation(url=state.url, ready=False, message=waiting)
        assert state.tag is not None
        identity = self._server_identity(state)
        if state.server is not None and state.server_identity != identity:
            self.notify(f"restarting {state.role}: now serving Bento {state.tag} ({spec.model_uri})")
            self._stop_server(state)
            state.server_backoff.reset()
        if state.server is not None and (code := state.server.exit_code()) is not None:
            problem = f"bentoml serve {describe_exit(code)}"
            if code > 0:
                problem += f": {self._problem(state.server)}"
            self._crashed(state, problem)
        if state.server is None:
            wait = state.server_backoff.waiting(now)
            if wait > 0:
                log = state.directory / "server.log"
                message = f"{state.server_backoff.problem}; restarting it in {wait:.0f}s (log: {log})"
                return VersionObservation(url=state.url, ready=False, message=message)
            self._start_server(state)
            assert state.server is not None
            return VersionObservation(
                url=state.url,
                ready=False,
                message=f"starting bentoml serve {state.tag} on {state.url} (log: {state.server.log})",
            )
        server = state.server
        if server.track():
            self._save_registry()
        status, detail = self._probe(f"{state.url}/readyz")
        if status == 200:
            if state.ready_since is None:
                state.ready_since = now
                self.notify(f"{state.role} is ready at {state.url} (pid {server.pid}, log {server.log})")
            elif now - state.ready_since >= STABLE_AFTER_S:
                state.server_backoff.reset()
            return VersionObservation(url=state.url, ready=True)
        if state.ready_since is not None:
            self.notify(f"{state.role} stopped answering {state.url}/readyz ({detail}); log: {server.log}")
            state.ready_since = None
        live_status, _ = self._probe(f"{state.url}/livez")
        if live_status is not None and live_status != 200:
            # The service is up but says it cannot serve (its model failed to load): like a failing
            # liveness probe on a cluster, it is restarted with a backoff.
            self._crashed(
                state, f"the model server cannot serve (/livez {live_status}): {self._problem(server)}"
            )
            wait = state.server_backoff.waiting(time.monotonic())
            message = f"{state.server_backoff.problem}; restarting it in {wait:.0f}s (log: {server.log})"
            return VersionObservation(url=state.url, ready=False, message=message)
        elapsed = now - server.started
        return VersionObservation(
            url=state.url,
            ready=False,
            message=f"starting: bentoml serve {state.tag} (pid {server.pid}) is loading the model "
            f"({elapsed:.0f}s; log: {server.log})",
        )

    def _problem(self, process: ManagedProcess) -> str:
        return last_problem_line(process.log, process.log_offset)

    def _crashed(self, state: _Version, problem: str) -> None:
        assert state.server is not None
        log = state.server.log
        self._stop_server(state)
        delay = state.server_backoff.fail(problem, time.monotonic())
        self.notify(
            f"{state.role}: {problem}; restarting it in {delay:g}s "
            f"(failure {state.server_backoff.failures} in a row; log: {log})"
        )

    def _step_build(self, state: _Version, now: float) -> str | None:
        """Advance the Bento build of the version's model; a message while it is not built."""
        spec = state.spec
        log = state.directory / "build.log"
        if state.build is not None:
            build = state.build
            code = build.exit_code()
            if code is None:
                elapsed = now - build.started
                return (
                    f"building the Bento {spec.bento} for {state.building_from} ({elapsed:.0f}s; log: {log})"
                )
            state.build = None
            if self._building is state:
                self._building = None
            self._save_registry()
            tag = self._built_tag(build, spec.bento) if code == 0 else None
            if state.building_from != spec.model_uri:
                return self._step_build(state, now)  # the model changed meanwhile: build the new one
            if tag is None:
                problem = (
                    f"building the Bento {spec.bento} for {state.building_from} failed "
                    f"(exit code {code}): {self._problem(build)}"
                )
                delay = state.build_backoff.fail(problem, now)
                self.notify(f"{state.role}: {problem}; retrying in {delay:g}s (log: {log})")
                return f"{problem}; retrying in {delay:g}s (log: {log})"
            state.tag, state.built_from = tag, state.building_from
            state.build_backoff.reset()
            self.notify(f"built Bento {tag} for {state.role} (log: {log})")
            return None
        wait = state.build_backoff.waiting(now)
        if wait > 0:
            return f"{state.build_backoff.problem}; retrying in {wait:.0f}s (log: {log})"
        if self._building is not None and self._building is not state:
            return (
                f"waiting to build the Bento {spec.bento} "
                f"(one build at a time; {self._building.role} is building)"
            )
        command = [
            self.python,
            "-m",
            BENTO_MODULE,
            "--bentoml-home",
            str(self.bentoml_home),
            "build",
            "--model-dir",
            spec.model_uri,
            "--deployment",
            state.deployment.name,
            "--version",
            spec.name,
        ]
        state.build = ManagedProcess(
            f"Bento build for {state.role}", command, env=self._base_env(), log=log, cwd=state.directory
        )
        state.building_from = spec.model_uri
        self._building = state
        self._save_registry()
        self.notify(f"building Bento {spec.bento} for {state.role} from {spec.model_uri} (log: {log})")
        return f"building the Bento {spec.bento} for {spec.model_uri} (log: {log})"

    @staticmethod
    def _built_tag(build: ManagedProcess, name: str) -> str | None:
        """The tag the build printed (its last line of the form ``<name>:<version id>``)."""
        try:
            with build.log.open("rb") as handle:
                handle.seek(build.log_offset)
                text = handle.read().decode(errors="replace")
        except OSError:
            return None
        tags = re.findall(rf"^({re.escape(name)}:[0-9a-z]+)\s*$", text, re.MULTILINE)
        return tags[-1] if tags else None

    def _server_identity(self, state: _Version) -> tuple[str, ...]:
        env = self._server_env(state)
        return (str(state.tag), *(f"{key}={env[key]}" for key in sorted(env) if key.startswith("KUBETUNE_")))

    def _server_env(self, state: _Version) -> dict[str, str]:
        env = self._base_env()
        env.update(state.spec.env)
        model_dir = local_model_dir(state.spec.model_uri)
        if model_dir is not None:
            env[MODEL_DIR_ENV] = model_dir
        resources = state.spec.serving.resources
        threads = cpu_threads(resources.limits) or cpu_threads(resources.requests)
        if threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        return env

    def _start_server(self, state: _Version) -> None:
        if not self._port_free(state.port):
            self._ports.discard(state.port)
            old, state.port = state.port, self._allocate_port()
            self.notify(f"{state.role}: port {old} is taken, moving to {state.port}")
        command = [
            self.python,
            "-m",
            "bentoml",
            "serve",
            str(state.tag),
            "--host",
            LOOPBACK,
            "--port",
            str(state.port),
        ]
        log = state.directory / "server.log"
        state.server = ManagedProcess(
            f"bentoml serve for {state.role}",
            command,
            env=self._server_env(state),
            log=log,
            cwd=state.directory,
        )
        state.server_identity = self._server_identity(state)
        state.ready_since = None
        self._save_registry()
        self.notify(
            f"started bentoml serve {state.tag} for {state.role} on {state.url} "
            f"(pid {state.server.pid}, log {log})"
        )

    def _stop_server(self, state: _Version) -> None:
        if state.server is not None:
            stop_processes([state.server], self.stop_grace_s)
        state.server, state.server_identity, state.ready_since = None, None, None
        self._save_registry()

    def _retire(self, state: _Version) -> None:
        """Stop a version that left the spec once the gateway no longer routes to it."""
        if state.build is not None:
            stop_processes([state.build], self.stop_grace_s)
            state.build = None
            if self._building is state:
                self._building = None
        if state.server is None:
            self._stop_version(state)
            return
        self._retiring.append((time.monotonic() + RETIRE_GRACE_S, state))
        self.notify(
            f"{state.role} is no longer in the spec: it stops in {RETIRE_GRACE_S:g}s, "
            "once the gateway routes without it"
        )

    def _stop_retired(self, due: Callable[[float, _Version], bool]) -> None:
        stopping = [state for when, state in self._retiring if due(when, state)]
        self._retiring = [(when, state) for when, state in self._retiring if state not in stopping]
        for state in stopping:
            self._stop_version(state)
            self.notify(f"stopped {state.role}")

    def _stop_version(self, state: _Version) -> None:
        stop_processes([p for p in (state.server, state.build) if p is not None], self.stop_grace_s)
        state.server = state.build = None
        if self._building is state:
            self._building = None
        self._ports.discard(state.port)
        self._save_registry()

    def _explain_local_limits(self, state: _Version) -> None:
        """Say once which spec.serving settings only a cluster applies (nothing is dropped silently)."""
        serving = state.spec.serving
        ignored = []
        if serving.replicas > 1:
            ignored.append(f"replicas {serving.replicas} (one server per version)")
        if serving.autoscaling is not None:
            ignored.append("autoscaling")
        memory = {**serving.resources.requests, **serving.resources.limits}.get("memory")
        if memory is not None:
            ignored.append(f"memory {memory} (not enforced)")
        if state.spec.token_secret is not None:
            ignored.append("tokenSecretRef (the hub token comes from HF_TOKEN in your environment)")
        notice = f"modeldeployment/{state.deployment.name}: local mode ignores spec.serving " + ", ".join(
            ignored
        )
        if ignored and notice not in self._notices:
            self._notices.add(notice)
            self.notify(notice)

    # -- the gateway ---------------------------------------------------------------------------------

    def _write_config(self, state: _Gateway, text: str) -> None:
        state.directory.mkdir(parents=True, exist_ok=True)
        # A new file swapped in with rename: the gateway never reads half a config.
        tmp = state.config_path.with_name(f".{state.config_path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, state.config_path)

    def _step_gateway(self, state: _Gateway) -> GatewayObservation:
        now = time.monotonic()
        endpoint = f"{state.url}/v1"
        if state.process is not None and (code := state.process.exit_code()) is not None:
            problem = f"the gateway {describe_exit(code)}"
            if code > 0:
                problem += f": {self._problem(state.process)}"
            log = state.process.log
            stop_processes([state.process], self.stop_grace_s)
            state.process, state.ready_since = None, None
            delay = state.backoff.fail(problem, now)
            self._save_registry()
            self.notify(
                f"{state.role}: {problem}; restarting it in {delay:g}s "
                f"(failure {state.backoff.failures} in a row; log: {log})"
            )
        if state.process is None:
            wait = state.backoff.waiting(now)
            if wait > 0:
                message = f"{state.backoff.problem}; restarting it in {wait:.0f}s (log: {state.log})"
                return GatewayObservation(endpoint=endpoint, ready=False, message=message)
            if not self._port_free(state.port):
                self._ports.discard(state.port)
                old, state.port = state.port, self._allocate_port()
                self.notify(f"{state.role}: port {old} is taken, moving to {state.port}")
                endpoint = f"{state.url}/v1"
            command = [
                self.python,
                "-m",
                GATEWAY_MODULE,
                "--config",
                str(state.config_path),
                "--host",
                LOOPBACK,
                "--port",
                str(state.port),
            ]
            state.process = ManagedProcess(
                state.role, command, env=self._base_env(), log=state.log, cwd=state.directory
            )
            self._save_registry()
            self.notify(
                f"started {state.role} on {state.url} (pid {state.process.pid}, config {state.config_path}, "
                f"log {state.log})"
            )
            return GatewayObservation(endpoint=endpoint, ready=False, message=f"starting (log: {state.log})")
        status, detail, response = self._get(f"{state.url}/healthz")
        health: Any = None
        if response is not None and status == 200:
            with contextlib.suppress(ValueError):
                health = response.json()
        if not isinstance(health, dict):
            state.ready_since = None
            return GatewayObservation(
                endpoint=endpoint,
                ready=False,
                message=f"not answering /healthz yet ({detail}; log: {state.log})",
            )
        if health.get("configError"):
            return GatewayObservation(
                endpoint=endpoint,
                ready=False,
                message=f"it keeps its previous config: {health['configError']} (log: {state.log})",
            )
        loaded = {str(name): weight for name, weight in (health.get("versions") or {}).items()}
        if loaded != state.routing:
            split = ",".join(f"{name}={weight:g}" for name, weight in loaded.items())
            change = "routes" if state.routing is None else "reloaded its config in place; it routes"
            self.notify(f"{state.role} {change} {split} (pid {state.process.pid})")
            state.routing = loaded
        if loaded != state.expected:
            return GatewayObservation(
                endpoint=endpoint,
                ready=False,
                message=f"it has not loaded its new config {state.config_path} yet (log: {state.log})",
            )
        if state.ready_since is None:
            state.ready_since = now
        elif now - state.ready_since >= STABLE_AFTER_S:
            state.backoff.reset()
        return GatewayObservation(endpoint=endpoint, ready=True)

    # -- helpers -------------------------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        """This process's environment without BentoML settings, plus the serving home."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("BENTOML_")}
        env.pop(MODEL_DIR_ENV, None)
        env.update(
            {
                "BENTOML_HOME": str(self.bentoml_home),
                "BENTOML_DO_NOT_TRACK": "True",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def _get(self, url: str) -> tuple[int | None, str, httpx.Response | None]:
        """(HTTP status or None, what happened in words, the response)."""
        try:
            response = self._http.get(url)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, None
        return response.status_code, f"HTTP {response.status_code}", response

    def _probe(self, url: str) -> tuple[int | None, str]:
        status, detail, _ = self._get(url)
        return status, detail

    def _allocate_port(self) -> int:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((LOOPBACK, 0))
                port = int(probe.getsockname()[1])
            if port not in self._ports:
                self._ports.add(port)
                return port

    @staticmethod
    def _port_free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                return False
        return True

    def _save_registry(self) -> None:
        processes = self.processes()
        if not processes:
            with contextlib.suppress(FileNotFoundError):
                self.registry_path.unlink()
            return
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomically(
            self.registry_path,
            {
                "owner": os.getpid(),
                "ownerCreated": _create_time(os.getpid()),
                "processes": [process.record() for process in processes],
            },
        )
