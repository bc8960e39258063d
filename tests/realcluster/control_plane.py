"""A real Kubernetes control plane for the tests: etcd and kube-apiserver on loopback, envtest-style.

Binaries follow controller-runtime's envtest convention: ``KUBEBUILDER_ASSETS`` names a directory
holding ``kube-apiserver``, ``etcd`` and ``kubectl``. When it is unset, the zstd-compressed binaries of
``../shared/k8s/bin`` (beside the repository) are unpacked once into a cache directory and reused.

:func:`start_control_plane` starts etcd and the API server (``--authorization-mode=RBAC``) with
certificates made for the run, waits until ``/readyz`` answers, and yields a :class:`ControlPlane`:
an admin kubeconfig (client certificate in ``system:masters``) that kubectl and
``lightkube.KubeConfig.from_file`` both read. On exit every process is killed, whatever happened.
The API server writes an audit log (every request's user, verb, resource and response code), so a test
can show that a client held to its RBAC was never refused, and enforces
OwnerReferencesPermissionEnforcement (setting ``blockOwnerDeletion`` needs the owner's finalizers).
:meth:`ControlPlane.start_controller_manager` adds kube-controller-manager (garbage collection, the
Deployment controller) for the tests that need it.
The machine may be loaded (2 cores shared by many processes): readiness is polled with generous
timeouts, and a port taken between choosing and binding it is retried with fresh ports.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ASSETS_ENV = "KUBEBUILDER_ASSETS"
REQUIRED_BINARIES = ("kube-apiserver", "etcd", "kubectl")
CONTROLLER_MANAGER = "kube-controller-manager"  # optional: only the tests that need GC start it
HOW_TO_GET_BINARIES = (
    f"set {ASSETS_ENV} to a directory holding kube-apiserver, etcd and kubectl (with internet: "
    f"`export {ASSETS_ENV}=$(go run sigs.k8s.io/controller-runtime/tools/setup-envtest@latest use -p "
    "path)`), "
    "or put the zstd-compressed binaries of shared/k8s/bin beside the repository (../shared/k8s/bin/*.zst) "
    "and install zstd"
)
START_TIMEOUT_S = 120.0  # a loaded 2-core machine can take a minute to bring the API server up
START_ATTEMPTS = 4  # a free port can be taken by someone else before our process binds it
STOP_GRACE_S = 10.0
FIELD_MANAGER = "kubetune-tests"  # the tests' server-side applies
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Metadata of every request once answered: enough to find refusals, small enough for a loaded machine.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata"}],
}


class BinariesUnavailable(RuntimeError):
    """The control-plane binaries cannot be found or unpacked (the message says how to get them)."""


class StartFailed(RuntimeError):
    """A control-plane process exited or never became ready (the message holds its log's tail)."""


# -- binaries -----------------------------------------------------------------------------------------


def find_binaries(repo_root: Path, cache_root: Path | None = None) -> Path:
    """The directory holding the binaries: ``KUBEBUILDER_ASSETS``, else ``../shared/k8s/bin`` unpacked."""
    assets = os.environ.get(ASSETS_ENV)
    if assets:
        directory = Path(assets)
        missing = [name for name in REQUIRED_BINARIES if not os.access(directory / name, os.X_OK)]
        if missing:
            raise BinariesUnavailable(
                f"{ASSETS_ENV}={assets} has no executable {', '.join(missing)}: {HOW_TO_GET_BINARIES}"
            )
        return directory
    packed = repo_root.parent / "shared" / "k8s" / "bin"
    if not all((packed / f"{name}.zst").is_file() for name in REQUIRED_BINARIES):
        raise BinariesUnavailable(f"no Kubernetes control-plane binaries: {HOW_TO_GET_BINARIES}")
    if shutil.which("zstd") is None:
        raise BinariesUnavailable(
            f"{packed} holds the binaries but zstd is not installed: {HOW_TO_GET_BINARIES}"
        )
    return unpack_binaries(packed, cache_root or default_cache_root())


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kubetune" / "k8s"


def unpack_binaries(packed: Path, cache_root: Path) -> Path:
    """Unpack every ``*.zst`` of ``packed`` once, into a cache directory named for their contents.

    Sessions running side by side may race: each unpacks into its own temporary directory and renames
    it into place; the loser discards its copy and uses the winner's.
    """
    archives = sorted(packed.glob("*.zst"))
    fingerprint = hashlib.sha256()
    for archive in archives:
        stat = archive.stat()
        fingerprint.update(f"{archive.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    target = cache_root / fingerprint.hexdigest()[:16]
    names = [archive.name.removesuffix(".zst") for archive in archives]
    if all(os.access(target / name, os.X_OK) for name in names):
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_root, prefix=".unpacking-"))
    try:
        for archive, name in zip(archives, names, strict=True):
            subprocess.run(
                ["zstd", "-d", "-q", "-f", str(archive), "-o", str(staging / name)],
                check=True,
                capture_output=True,
                timeout=300,
            )
            (staging / name).chmod(0o755)
        try:
            staging.rename(target)
        except OSError:  # another session unpacked the same binaries first
            if not all(os.access(target / name, os.X_OK) for name in names):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# -- certificates -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateFiles:
    certificate: Path
    key: Path


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


class CertificateAuthority:
    """A throwaway CA that signs the API server's serving certificate and the clients' certificates."""

    def __init__(self, directory: Path, common_name: str = "kubetune-test-ca") -> None:
        self.directory = directory
        self._key = _new_key()
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self._certificate = (
            self._builder(self._name, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.files = CertificateFiles(directory / "ca.crt", directory / "ca.key")
        self.files.certificate.write_bytes(self._certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(self._key, self.files.key)

    def _builder(self, subject: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
        )

    def issue(
        self,
        file_stem: str,
        common_name: str,
        *,
        organizations: tuple[str, ...] = (),
        server_ips: tuple[str, ...] = (),
    ) -> CertificateFiles:
        """A certificate for a client (``CN`` = user, ``O`` = groups) or, with ``server_ips``, a server."""
        key = _new_key()
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_ips else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = self._builder(x509.Name(attributes), key.public_key()).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        )
        if server_ips:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
                    + [x509.DNSName("localhost")]
                ),
                critical=False,
            )
        certificate = builder.sign(self._key, hashes.SHA256())
        files = CertificateFiles(self.directory / f"{file_stem}.crt", self.directory / f"{file_stem}.key")
        files.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(key, files.key)
        return files


def write_service_account_keys(directory: Path) -> CertificateFiles:
    """The key pair the API server signs ServiceAccount tokens with (``certificate`` is the public key)."""
    key = _new_key()
    files = CertificateFiles(directory / "sa.pub", directory / "sa.key")
    _write_key(key, files.key)
    files.certificate.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return files


# -- kubeconfig ---------------------------------------------------------------------------------------


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, user_name: str, user: dict[str, str]) -> Path:
    """A one-context kubeconfig with everything embedded (kubectl and lightkube read it alike)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "realcluster", "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}
        ],
        "users": [{"name": user_name, "user": user}],
        "contexts": [
            {
                "name": user_name,
                "context": {"cluster": "realcluster", "user": user_name, "namespace": "default"},
            }
        ],
        "current-context": user_name,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    path.chmod(0o600)
    return path


# -- processes ----------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port free right now (another process may still take it before ours binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child, before exec: be SIGKILLed if the test process dies without tearing down (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


@dataclass
class ManagedProcess:
    """A control-plane process, its log file and how to stop it."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    @classmethod
    def spawn(cls, name: str, command: list[str], log_path: Path) -> ManagedProcess:
        log_file = log_path.open("wb")
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a terminal's Ctrl-C goes to pytest only
            preexec_fn=_die_with_parent,
        )
        return cls(name, process, log_path, log_file)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def port_was_taken(self) -> bool:
        return "address already in use" in self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; always reaps the process and closes its log."""
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=STOP_GRACE_S)
        finally:
            self.log_file.close()


def wait_until_ready(process: ManagedProcess, probe: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``probe`` until it answers True; fail at once (with the log) if the process exits."""
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        if process.process.poll() is not None:
            raise StartFailed(
                f"{process.name} exited with {process.process.returncode}:\n{process.log_tail()}"
            )
        if probe():
            return
        if time.monotonic() > deadline:
            raise StartFailed(f"{process.name} not ready after {timeout_s:.0f}s:\n{process.log_tail()}")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def start_with_port_retry(
    name: str,
    command_for_ports: Callable[[], tuple[list[str], Callable[[], bool]]],
    log_path: Path,
    timeout_s: float = START_TIMEOUT_S,
) -> ManagedProcess:
    """Start a process on freshly chosen ports; if one was taken meanwhile, choose again and retry.

    ``command_for_ports`` picks the ports and returns the command plus its readiness probe.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        command, probe = command_for_ports()
        process = ManagedProcess.spawn(name, command, log_path)
        try:
            wait_until_ready(process, probe, timeout_s)
            return process
        except StartFailed:
            process.stop()
            if attempt == START_ATTEMPTS or not process.port_was_taken():
                raise
    raise AssertionError("unreachable")  # the loop returns or raises


def _answers(client: httpx.Client, url: str, expected: str) -> bool:
    try:
        response = client.get(url, timeout=5.0)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and expected in response.text


# -- the control plane --------------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """A running etcd + kube-apiserver, and an admin's ways in (kubeconfig, kubectl)."""

    binaries: Path
    workdir: Path
    server: str
    ca: CertificateAuthority
    kubeconfig: Path
    processes: list[ManagedProcess]
    service_account_keys: CertificateFiles
    audit_log: Path
    admin: CertificateFiles

    def admin_http(self) -> httpx.Client:
        """An HTTP client of the API server as admin (for polling reads without a kubectl process each)."""
        tls = ssl.create_default_context(cafile=str(self.ca.files.certificate))
        tls.load_cert_chain(str(self.admin.certificate), str(self.admin.key))
        return httpx.Client(base_url=self.server, verify=tls, timeout=30.0)

    def kubectl(
        self,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout_s: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this API server (as admin unless ``kubeconfig`` says otherwise)."""
        command = [
            str(self.binaries / "kubectl"),
            f"--kubeconfig={kubeconfig or self.kubeconfig}",
            # Discovery cached per session, not in ~/.kube: a later session may reuse the port.
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def create_namespace(self) -> str:
        """A new namespace with a unique name (namespaces are never deleted: the session's cluster is)."""
        name = f"t-{uuid.uuid4().hex[:10]}"
        self.kubectl("create", "namespace", name)
        return name

    def service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name`` (created if missing) with a
        token from the TokenRequest API: a client held to that account's RBAC."""
        manifest = self.kubectl(
            "create", "serviceaccount", name, "-n", namespace, "--dry-run=client", "-o", "yaml"
        ).stdout
        self.kubectl("apply", "--server-side", "-f", "-", stdin=manifest)
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration=1h").stdout.strip()
        return write_kubeconfig(
            self.workdir / f"kubeconfig-{namespace}-{name}",
            self.server,
            self.ca.files.certificate,
            f"system:serviceaccount:{namespace}:{name}",
            {"token": token},
        )

    def audit_events(self, user: str) -> list[dict[str, Any]]:
        """The audit log's events of requests made by ``user`` (e.g. a ServiceAccount's username)."""
        events: list[dict[str, Any]] = []
        with self.audit_log.open(encoding="utf-8") as log:
            for line in log:
                event = json.loads(line)
                if event.get("user", {}).get("username") == user:
                    events.append(event)
        return events

    def start_controller_manager(self) -> ManagedProcess:
        """kube-controller-manager on this API server (every controller, each with its own ServiceAccount
        credentials); ready when its ``/healthz`` answers. Stopped with the control plane."""
        binary = self.binaries / CONTROLLER_MANAGER
        if not os.access(binary, os.X_OK):
            raise BinariesUnavailable(
                f"no executable {binary}: put kube-controller-manager beside the other binaries "
                "(setup-envtest's assets have none; ../shared/k8s/bin has it)"
            )
        identity = self.ca.issue("controller-manager", "system:kube-controller-manager")
        kubeconfig = write_kubeconfig(
            self.workdir / "kubeconfig-controller-manager",
            self.server,
            self.ca.files.certificate,
            "system:kube-controller-manager",
            {
                "client-certificate-data": _b64(identity.certificate),
                "client-key-data": _b64(identity.key),
            },
        )
        with httpx.Client(verify=False) as http:  # it serves a self-signed certificate of its own

            def command() -> tuple[list[str], Callable[[], bool]]:
                port = free_port()
                flags = [
                    f"--kubeconfig={kubeconfig}",
                    f"--authentication-kubeconfig={kubeconfig}",
                    f"--authorization-kubeconfig={kubeconfig}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={port}",
                    "--leader-elect=false",
                    "--controllers=*",
                    "--use-service-account-credentials=true",
                    f"--service-account-private-key-file={self.service_account_keys.key}",
                    f"--root-ca-file={self.ca.files.certificate}",
                    f"--cluster-signing-cert-file={self.ca.files.certificate}",
                    f"--cluster-signing-key-file={self.ca.files.key}",
                    f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                    f"--cert-dir={self.workdir / 'controller-manager-certs'}",
                ]
                return [str(binary), *flags], lambda: _answers(
                    http, f"https://127.0.0.1:{port}/healthz", "ok"
                )

            process = start_with_port_retry(
                CONTROLLER_MANAGER, command, self.workdir / "controller-manager.log"
            )
        self.processes.append(process)
        return process


@contextlib.contextmanager
def start_control_plane(binaries: Path, workdir: Path | None = None) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver on loopback, RBAC on, until the block ends; both are killed on exit."""
    own_workdir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="kubetune-realcluster-")) if workdir is None else workdir
    processes: list[ManagedProcess] = []
    stack = contextlib.ExitStack()  # the readiness probes' HTTP clients
    try:
        ca = CertificateAuthority(root)
        serving = ca.issue("apiserver", "kube-apiserver", server_ips=("127.0.0.1",))
        admin = ca.issue("admin", "kubetune-test-admin", organizations=("system:masters",))
        service_accounts = write_service_account_keys(root)
        audit_policy = root / "audit-policy.yaml"
        audit_policy.write_text(yaml.safe_dump(AUDIT_POLICY), encoding="utf-8")
        audit_log = root / "audit.log"

        tls = ssl.create_default_context(cafile=str(ca.files.certificate))
        tls.load_cert_chain(str(admin.certificate), str(admin.key))
        http = stack.enter_context(httpx.Client())
        admin_http = stack.enter_context(httpx.Client(verify=tls))
        etcd_url = server = ""

        def etcd_command() -> tuple[list[str], Callable[[], bool]]:
            nonlocal etcd_url
            client_port, peer_port = free_port(), free_port()
            etcd_url = f"http://127.0.0.1:{client_port}"
            peer_url = f"http://127.0.0.1:{peer_port}"
            # The flags envtest passes: both shared/k8s's small etcd main and a released etcd take them.
            command = [
                str(binaries / "etcd"),
                f"--data-dir={root / f'etcd-{client_port}'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ]
            return command, lambda: _answers(http, f"{etcd_url}/health", '"health":"true"')

        processes.append(start_with_port_retry("etcd", etcd_command, root / "etcd.log"))

        def apiserver_command() -> tuple[list[str], Callable[[], bool]]:
            nonlocal server
            port = free_port()
            server = f"https://127.0.0.1:{port}"
            command = [
                str(binaries / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--tls-cert-file={serving.certificate}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={ca.files.certificate}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={service_accounts.certificate}",
                f"--service-account-signing-key-file={service_accounts.key}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--authorization-mode=RBAC",
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                f"--audit-policy-file={audit_policy}",
                f"--audit-log-path={audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",  # an event is on disk before its response is sent
                "--endpoint-reconciler-type=none",  # 127.0.0.1 is refused as an Endpoints address
                f"--cert-dir={root / 'apiserver-certs'}",
            ]
            return command, lambda: _answers(admin_http, f"{server}/readyz", "ok")

        processes.append(start_with_port_retry("kube-apiserver", apiserver_command, root / "apiserver.log"))
        stack.close()
        kubeconfig = write_kubeconfig(
            root / "kubeconfig",
            server,
            ca.files.certificate,
            "kubetune-test-admin",
            {"client-certificate-data": _b64(admin.certificate), "client-key-data": _b64(admin.key)},
        )
        yield ControlPlane(
            binaries, root, server, ca, kubeconfig, processes, service_accounts, audit_log, admin
        )
    finally:
        stack.close()
        for process in reversed(processes):
            process.stop()
        if own_workdir:
            shutil.rmtree(root, ignore_errors=True)
