"""Runs a rendered pod's containers as a kubelet would, in a bubblewrap sandbox on this machine.

A :class:`SandboxCluster` is one network namespace (loopback and an eth0 at :data:`POD_IP`, where every
Service resolves through the containers' ``/etc/hosts``), PersistentVolumeClaims stood in
by directories, and the Secrets and ConfigMaps the operator would have applied. ``run_pod`` takes a
pod template spec exactly as rendered and, for each container (init containers first, in order, each
to completion):

* runs its ``command`` + ``args`` with its ``env`` (``value`` and ``secretKeyRef``/``configMapKeyRef``)
  and ``workingDir``, as the user of its securityContext (else the pod's, else the image's ``USER``);
* with the root filesystem read-only and only the declared ``volumeMounts`` bound: ``emptyDir`` a fresh
  directory per pod, ``persistentVolumeClaim`` the claim's directory, ``configMap``/``secret`` files
  written from the objects (always read-only, as the kubelet mounts them); ``readOnly`` mounts
  read-only;
* in the image stood in by this machine's environment: the Dockerfile's ``ENV`` and ``USER`` (from
  ``manifests/images``), with its ``/opt/venv`` replaced by the Python environment running the tests.

``port_forward`` makes a container port reachable from the test, like ``kubectl port-forward``.
Nothing needs root: bubblewrap and ``nsenter`` work in user namespaces the caller owns.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
IMAGES_DIR = REPO / "manifests" / "images"
BWRAP = shutil.which("bwrap")
NSENTER = shutil.which("nsenter")
MISSING_TOOLS = (
    "bubblewrap (bwrap) and nsenter are needed to run pods in a sandbox: "
    "`apt-get install bubblewrap util-linux` (make system-deps installs them)"
)
# python:3.11-slim's PATH, which the Dockerfiles' `PATH=/opt/venv/bin:$PATH` extends.
BASE_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_VENV = "/opt/venv"
# What stands in for the image's /opt/venv: this Python environment and the checkout its editable
# install points at. In the image nothing a pod mounts hides /opt/venv; here a volume could (an emptyDir
# at /tmp while the checkout lies under /tmp, as in a CI clone), so they are bound back on top.
STAND_IN_PATHS = tuple(sorted({str(Path(sys.prefix).resolve()), str(REPO)}))
FORWARDER = Path(__file__).with_name("forwarder.py")
POD_IP = "10.244.0.2"
"""The address of eth0 on the pod network, where the Services in ``/etc/hosts`` point."""


class PodFailed(AssertionError):
    """A container exited non-zero (an init container) or before it was stopped (a server)."""


# ---- the image -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageStandIn:
    """What a container of an image gets from the image: its environment and its user."""

    env: Mapping[str, str]
    user: int


def image_stand_in(dockerfile: Path, venv: str = sys.prefix) -> ImageStandIn:
    """The final stage's ``ENV`` and ``USER`` of ``dockerfile``, with its venv replaced by ``venv``."""
    lines = dockerfile.read_text(encoding="utf-8").replace("\\\n", " ").splitlines()
    final_stage = max(index for index, line in enumerate(lines) if line.upper().startswith("FROM "))
    env: dict[str, str] = {"PATH": BASE_IMAGE_PATH}
    user = 0
    for line in lines[final_stage:]:
        instruction, _, rest = line.strip().partition(" ")
        if instruction.upper() == "ENV":
            for assignment in shlex.split(rest):
                name, _, value = assignment.partition("=")
                value = value.replace("$PATH", env["PATH"]).replace(IMAGE_VENV, venv)
                env[name] = value
        elif instruction.upper() == "USER":
            user = int(rest.strip().split(":")[0])
    return ImageStandIn(env=env, user=user)


def image_for(image: str) -> ImageStandIn:
    """The stand-in of a kubetune image reference (``ghcr.io/kubetune/runtime:0.1.0`` -> runtime)."""
    name = image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    dockerfile = IMAGES_DIR / f"{name}.Dockerfile"
    if not dockerfile.is_file():
        raise ValueError(f"image {image!r} has no Dockerfile {dockerfile} to stand in for it")
    return image_stand_in(dockerfile)


# ---- mounts ----------------------------------------------------------------------------------------


def _shadowed_parent(target: str) -> str | None:
    """The deepest existing directory above a mount point that does not exist on this machine.

    The root is bound read-only, so bubblewrap cannot create the mount point there: that directory is
    shadowed by a tmpfs holding read-only binds of its entries, the mount point is made in it, and the
    tmpfs is then remounted read-only.
    """
    path = Path(target)
    if path.exists():
        return None
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if parent == Path("/"):
        raise ValueError(f"mount point {target}: a new top-level directory cannot be stood in for")
    return str(parent)


def _shadow(directory: str) -> list[str]:
    args = ["--tmpfs", directory]
    for entry in sorted(Path(directory).iterdir()):
        if entry.is_symlink():
            args += ["--symlink", os.readlink(entry), str(entry)]
        elif entry.is_dir() or entry.is_file():
            args += ["--ro-bind", str(entry), str(entry)]
    return args


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool


def bwrap_arguments(mounts: Sequence[Mount], uid: int, gid: int, working_dir: str, hosts: Path) -> list[str]:
    """bubblewrap's options for a container: read-only root, the mounts, the user, its own pids."""
    args = [
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--unshare-user", "--uid", str(uid), "--gid", str(gid),
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "pod",
        "--die-with-parent", "--new-session",
    ]  # fmt: skip
    nested: set[str] = set()
    for mount in mounts:
        enclosing = [other for other in mounts if mount.target.startswith(other.target.rstrip("/") + "/")]
        if enclosing:
            # A mount inside another volume's: its mount point is made in that volume, as the kubelet does.
            volume = max(enclosing, key=lambda other: len(other.target))
            (volume.source / mount.target[len(volume.target) :].lstrip("/")).mkdir(
                parents=True, exist_ok=True
            )
            nested.add(mount.target)
    shadowed = sorted(
        {
            parent
            for mount in mounts
            if mount.target not in nested and (parent := _shadowed_parent(mount.target)) is not None
        }
    )
    for parent in shadowed:
        args += _shadow(parent)
    for mount in sorted(mounts, key=lambda mount: mount.target.count("/")):
        args += ["--ro-bind" if mount.read_only else "--bind", str(mount.source), mount.target]
    for path in STAND_IN_PATHS:
        if any(path.startswith(mount.target.rstrip("/") + "/") for mount in mounts):
            args += ["--ro-bind", path, path]
    args += ["--ro-bind", str(hosts), "/etc/hosts"]  # after the shadows: /etc may be one
    for parent in shadowed:
        args += ["--remount-ro", parent]
    return [*args, "--chdir", working_dir]


# ---- the cluster -----------------------------------------------------------------------------------


@dataclass
class RunningContainer:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@dataclass
class RunningPod:
    name: str
    directory: Path
    init_logs: dict[str, str] = field(default_factory=dict)
    containers: list[RunningContainer] = field(default_factory=list)

    def container(self, name: str) -> RunningContainer:
        return next(container for container in self.containers if container.name == name)

    def check_running(self) -> None:
        for container in self.containers:
            if container.process.poll() is not None:
                raise PodFailed(
                    f"pod {self.name}: container {container.name} exited {container.process.returncode}:\n"
                    + container.output()[-6000:]
                )

    def stop(self) -> None:
        for container in self.containers:
            if container.process.poll() is None:
                os.killpg(container.process.pid, signal.SIGTERM)
        for container in self.containers:
            try:
                container.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(container.process.pid, signal.SIGKILL)
                container.process.wait()


class SandboxCluster:
    """One pod network, claims and API objects; pods run in it with :meth:`run_pod`."""

    def __init__(self, root: Path, service_hosts: Sequence[str] = ()) -> None:
        if BWRAP is None or NSENTER is None:
            raise RuntimeError(MISSING_TOOLS)
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.hosts = root / "hosts"
        services = " ".join(["pod", *service_hosts])
        self.hosts.write_text(f"127.0.0.1 localhost\n::1 localhost\n{POD_IP} {services}\n", encoding="utf-8")
        self.config_maps: dict[str, Mapping[str, str]] = {}
        self.secrets: dict[str, Mapping[str, str]] = {}
        self.pods: list[RunningPod] = []
        self._forwarders: list[subprocess.Popen[bytes]] = []
        self._network = self._start_network()
        self.network_pid = self._read_pid()
        self._add_pod_interface()

    def _start_network(self) -> subprocess.Popen[bytes]:
        """A process holding the pod network (bubblewrap brings its loopback up), like a pause container."""
        read_end, write_end = os.pipe()
        assert BWRAP is not None
        command = [
            BWRAP, "--unshare-user", "--unshare-net", "--ro-bind", "/", "/", "--dev", "/dev",
            "--proc", "/proc", "--die-with-parent", "--info-fd", str(write_end), "sleep", "infinity",
        ]  # fmt: skip
        process = subprocess.Popen(command, pass_fds=(write_end,), start_new_session=True)
        os.close(write_end)
        self._info_fd = read_end
        return process

    def _read_pid(self) -> int:
        with os.fdopen(self._info_fd, "rb") as info:
            pid = int(json.loads(info.read().decode())["child-pid"])
        # bubblewrap reports the pid before its child has finished setting the namespaces up; entering
        # them earlier finds no user mapped there. The child's exec of sleep marks the end.
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0] != b"sleep":
            if time.monotonic() > deadline:
                raise RuntimeError("the pod network's process did not start")
            time.sleep(0.01)
        return pid

    def _add_pod_interface(self) -> None:
        """An eth0 with the pod's IP, as every pod has: resolvers asked for AI_ADDRCONFIG (aiohttp's)
        find no IPv4 name at all on a network of loopback only."""
        ip = shutil.which("ip", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
        if ip is None:
            raise RuntimeError("the pod network needs iproute2's ip command")
        for command in (
            ["link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer"],
            ["addr", "add", f"{POD_IP}/24", "dev", "eth0"],
            ["link", "set", "eth0-peer", "up"],
            ["link", "set", "eth0", "up"],
        ):
            subprocess.run([*self._enter(), ip, *command], check=True, capture_output=True)

    def _enter(self) -> list[str]:
        assert NSENTER is not None
        return [NSENTER, "--user", "--net", "--preserve-credentials", "--target", str(self.network_pid), "--"]

    def claim(self, name: str) -> Path:
        """The directory standing in for PersistentVolumeClaim ``name``."""
        path = self.root / "claims" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def apply(self, obj: Mapping[str, Any]) -> None:
        """Keep a rendered ConfigMap or Secret (``data`` base64 or ``stringData``) for volumes and env."""
        import base64

        name = obj["metadata"]["name"]
        if obj["kind"] == "ConfigMap":
            self.config_maps[name] = dict(obj.get("data") or {})
        elif obj["kind"] == "Secret":
            data = {key: base64.b64decode(value).decode() for key, value in (obj.get("data") or {}).items()}
            self.secrets[name] = {**data, **(obj.get("stringData") or {})}

    # -- volumes and environment ---------------------------------------------------------------------

    def _volume_dirs(
        self, pod_dir: Path, volumes: Sequence[Mapping[str, Any]]
    ) -> dict[str, tuple[Path, bool]]:
        """Each volume's directory, and whether the kubelet mounts it read-only whatever the mount says."""
        dirs: dict[str, tuple[Path, bool]] = {}
        for volume in volumes:
            name = volume["name"]
            if "emptyDir" in volume:
                path = pod_dir / "volumes" / name
                path.mkdir(parents=True)
                dirs[name] = (path, False)
            elif "persistentVolumeClaim" in volume:
                source = volume["persistentVolumeClaim"]
                claim = self.root / "claims" / source["claimName"]
                if not claim.is_dir():
                    raise PodFailed(
                        f"volume {name}: PersistentVolumeClaim {source['claimName']} does not exist"
                    )
                dirs[name] = (claim, bool(source.get("readOnly")))
            elif "configMap" in volume or "secret" in volume:
                kind = "configMap" if "configMap" in volume else "secret"
                source = volume[kind]
                object_name = source["name"] if kind == "configMap" else source["secretName"]
                store = self.config_maps if kind == "configMap" else self.secrets
                if object_name not in store and not source.get("optional"):
                    raise PodFailed(f"volume {name}: {kind} {object_name} does not exist")
                data = store.get(object_name) or {}
                items = [item for item in source.get("items") or [] if item["key"] in data] or [
                    {"key": key, "path": key} for key in data
                ]
                path = pod_dir / "volumes" / name
                path.mkdir(parents=True)
                for item in items:
                    (path / item["path"]).write_text(data[item["key"]], encoding="utf-8")
                dirs[name] = (path, True)
            else:
                raise ValueError(f"volume {name}: this sandbox has no stand-in for {sorted(volume)}")
        return dirs

    def _env(
        self, container: Mapping[str, Any], image: ImageStandIn, extra: Mapping[str, str]
    ) -> dict[str, str]:
        env = dict(image.env)
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
                continue
            source = item["valueFrom"]
            ref = source.get("secretKeyRef") or source.get("configMapKeyRef")
            if ref is None:
                raise ValueError(f"env {item['name']}: this sandbox has no stand-in for {sorted(source)}")
            store = self.secrets if "secretKeyRef" in source else self.config_maps
            value = (store.get(ref["name"]) or {}).get(ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                raise PodFailed(f"env {item['name']}: {ref['name']}/{ref['key']} does not exist")
            env[item["name"]] = value
        return {**env, **extra}

    # -- pods ----------------------------------------------------------------------------------------

    def _command(
        self,
        container: Mapping[str, Any],
        pod_spec: Mapping[str, Any],
        volumes: Mapping[str, tuple[Path, bool]],
        image: ImageStandIn,
    ) -> list[str]:
        security = {**(pod_spec.get("securityContext") or {}), **(container.get("securityContext") or {})}
        uid = int(security.get("runAsUser", image.user))
        gid = int(security.get("runAsGroup", uid))
        if security.get("runAsNonRoot") and uid == 0:
            raise PodFailed(f"container {container['name']}: runAsNonRoot is set but it would run as root")
        mounts = []
        for mount in container.get("volumeMounts") or []:
            source, forced_read_only = volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
            read_only = forced_read_only or bool(mount.get("readOnly"))
            mounts.append(Mount(source, mount["mountPath"], read_only))
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        if not argv:
            raise ValueError(
                f"container {container['name']}: no command (the image's entrypoint is not stood in)"
            )
        assert BWRAP is not None
        sandbox = bwrap_arguments(mounts, uid, gid, container.get("workingDir") or "/", self.hosts)
        return [*self._enter(), BWRAP, *sandbox, "--", *argv]

    def run_pod(
        self,
        name: str,
        pod_spec: Mapping[str, Any],
        *,
        extra_env: Mapping[str, str] | None = None,
        init_timeout_s: float = 300,
    ) -> RunningPod:
        """Run the init containers to completion, then start the containers (see the module docstring).

        ``extra_env`` is what the cluster around the pod provides and the spec does not say (e.g.
        ``HF_ENDPOINT`` of the hub mirror standing in for the internet)."""
        pod_dir = self.root / "pods" / name
        pod_dir.mkdir(parents=True)
        volumes = self._volume_dirs(pod_dir, pod_spec.get("volumes") or [])
        pod = RunningPod(name=name, directory=pod_dir)
        self.pods.append(pod)
        for container in pod_spec.get("initContainers") or []:
            image = image_for(container["image"])
            log = pod_dir / f"{container['name']}.log"
            with log.open("wb") as out:
                result = subprocess.run(
                    self._command(container, pod_spec, volumes, image),
                    env=self._env(container, image, extra_env or {}),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=init_timeout_s,
                    check=False,
                )
            pod.init_logs[container["name"]] = log.read_text(encoding="utf-8", errors="replace")
            if result.returncode != 0:
                raise PodFailed(
                    f"pod {name}: init container {container['name']} exited {result.returncode}:\n"
                    + pod.init_logs[container["name"]][-6000:]
                )
        for container in pod_spec.get("containers") or []:
            image = image_for(container["image"])
            log = pod_dir / f"{container['name']}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    self._command(container, pod_spec, volumes, image),
                    env=self._env(container, image, extra_env or {}),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            pod.containers.append(RunningContainer(container["name"], process, log))
        return pod

    def run_to_completion(
        self,
        name: str,
        pod_spec: Mapping[str, Any],
        *,
        extra_env: Mapping[str, str] | None = None,
        timeout_s: float = 300,
    ) -> str:
        """Run a pod whose containers end (a pipeline step); returns their output, raises if one fails."""
        pod = self.run_pod(name, pod_spec, extra_env=extra_env)
        for container in pod.containers:
            try:
                code = container.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired as timeout:
                pod.stop()
                raise PodFailed(
                    f"pod {name}: {container.name} ran over {timeout_s}s:\n{container.output()[-6000:]}"
                ) from timeout
            if code != 0:
                raise PodFailed(
                    f"pod {name}: container {container.name} exited {code}:\n{container.output()[-6000:]}"
                )
        return "".join(container.output() for container in pod.containers)

    def run_in_network(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """A helper process (not a pod: host filesystem, caller's user) on the pod network."""
        return subprocess.Popen([*self._enter(), *argv], start_new_session=True, **kwargs)

    def port_forward(self, port: int) -> int:
        """A port on this machine's loopback that reaches ``port`` on the pod network."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        local_port = int(listener.getsockname()[1])
        fd = listener.fileno()
        process = subprocess.Popen(
            [*self._enter(), sys.executable, str(FORWARDER), str(fd), str(port)],
            pass_fds=(fd,),
            start_new_session=True,
        )
        listener.close()
        self._forwarders.append(process)
        return local_port

    def close(self) -> None:
        for pod in self.pods:
            pod.stop()
        for process in [*self._forwarders, self._network]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=10)


def wait_until_answers(url: str, pod: RunningPod, timeout_s: float, *, expect: int = 200) -> tuple[int, str]:
    """Poll ``url`` (an HTTP GET, as a probe does) until it returns ``expect``; fails fast if the pod died."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        pod.check_running()
        try:
            response = httpx.get(url, timeout=5)
        except httpx.HTTPError as error:
            last = f"{type(error).__name__}: {error}"
        else:
            if response.status_code == expect:
                return response.status_code, response.text
            last = f"HTTP {response.status_code}: {response.text[:300]}"
        time.sleep(0.5)
    pod.check_running()
    raise AssertionError(f"{url} did not answer {expect} within {timeout_s}s ({last})")


def pod_spec_of(deployment: Mapping[str, Any]) -> Mapping[str, Any]:
    """The pod template spec of a rendered Deployment or Job."""
    spec: Mapping[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def iter_probe_paths(container: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(probe kind, HTTP path) of each httpGet probe of a container."""
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(kind)
        if probe and "httpGet" in probe:
            yield kind, str(probe["httpGet"]["path"])
