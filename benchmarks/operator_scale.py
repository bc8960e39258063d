"""How does the operator handle many jobs? 500 FineTuneJobs on a real API server, beside a minimal operator.

Starts a real etcd + kube-apiserver (tests/realcluster's harness: ``KUBEBUILDER_ASSETS`` or
../shared/k8s), applies the CRDs, then in interleaved rounds runs each of two operators on a namespace
of its own, as the cluster's admin:

- kubetune: the real ``kubetune operator`` (finalizer, timers, planning, status, events), whose local
  executor records runs in memory instead of starting them (benchmarks/operator_with_recorded_runs.py):
  the point is the control plane, not training;
- minimal: benchmarks/minimal_kopf_operator.py, a Kopf operator that writes one status field on create.

In each round, once an operator answers (a canary job got its status), ``--jobs`` FineTuneJobs are
created at once (8 client threads), and the time until every one has a status is measured, with the
operator's peak resident memory (VmHWM) after it has kept reconciling them for a few more seconds.
The order of the two alternates between rounds, so that background load on a shared machine hits both.
Prints each round, the median and range of the time ratio, and whether the targets (at most 1.5x the
minimal operator's time, under 300 MB) are met by the median and by the worst round; writes the raw
rounds, the machine, the commit and the date to ``--out-dir``/operator-scale.json (benchmarks/_results.py,
default benchmarks/results). Not part of the test suite:

    python benchmarks/operator_scale.py [--jobs 500] [--rounds 5] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the real-cluster harness

from _results import MIN_ROUNDS, BenchmarkRecord, Target  # noqa: E402
from realcluster.control_plane import FIELD_MANAGER, ControlPlane, find_binaries, start_control_plane  # noqa: E402

CRD_DIR = REPO / "manifests" / "crds"
JOBS_PATH = "/apis/kubetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs"
TIME_RATIO_TARGET = Target(1.5, higher_is_better=False)
MEMORY_TARGET_MB = Target(300.0, higher_is_better=False)  # "under 300 MB": met at 300.0 only by rounding
STEADY_STATE_S = 5.0  # kept reconciling after the last status, before its peak memory is read
CREATE_THREADS = 8
READY_TIMEOUT_S = 180.0
ALL_STATUSES_TIMEOUT_S = 900.0
OPERATORS = ("kubetune", "minimal")


@dataclass
class Measurement:
    operator: str
    seconds_to_all_statuses: float
    seconds_to_create: float
    peak_rss_mb: float
    cpu_seconds: float


def finetunejob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"baseModel": {"uri": "/models/base"}, "dataset": {"uri": "/data/train.jsonl"}},
    }


def operator_command(which: str, namespace: str) -> list[str]:
    if which == "kubetune":
        script = REPO / "benchmarks" / "operator_with_recorded_runs.py"
        return [sys.executable, str(script), "operator", "--namespace", namespace, "--liveness-port", "0"]
    script = REPO / "benchmarks" / "minimal_kopf_operator.py"
    return [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", namespace, str(script)]


@contextmanager
def running_operator(
    which: str, namespace: str, plane: ControlPlane, workdir: Path
) -> Iterator[psutil.Process]:
    env = {
        **os.environ,
        "KUBECONFIG": str(plane.kubeconfig),
        "KUBETUNE_HOME": str(workdir / "home"),
        "KUBETUNE_DEFAULT_EXECUTOR": "local",
        "KUBETUNE_METRICS_PORT": "0",
    }
    log_path = workdir / f"{which}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            operator_command(which, namespace), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    try:
        yield psutil.Process(process.pid)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def peak_rss_mb(process: psutil.Process) -> float:
    """The process's high-water mark of resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {process.pid}")


def with_status(http: httpx.Client, namespace: str) -> set[str]:
    response = http.get(JOBS_PATH.format(namespace=namespace))
    response.raise_for_status()
    return {item["metadata"]["name"] for item in response.json()["items"] if item.get("status")}


def wait_for(description: str, holds: Any, process: psutil.Process, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not holds():
        if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
            raise RuntimeError(f"the operator exited while waiting for {description}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {description}")
        time.sleep(0.25)


def create_jobs(plane: ControlPlane, namespace: str, names: list[str]) -> None:
    def create(name: str) -> None:
        with plane.admin_http() as http:  # one client per call keeps threads apart; cheap next to a POST
            response = http.post(JOBS_PATH.format(namespace=namespace), json=finetunejob(name))
            response.raise_for_status()

    with concurrent.futures.ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(create, names))


def measure(which: str, plane: ControlPlane, jobs: int, workdir: Path) -> Measurement:
    namespace = plane.create_namespace()
    names = [f"job-{index:04d}" for index in range(jobs)]
    with plane.admin_http() as http, running_operator(which, namespace, plane, workdir) as process:
        create_jobs(plane, namespace, ["canary"])
        wait_for(
            f"{which} to answer", lambda: "canary" in with_status(http, namespace), process, READY_TIMEOUT_S
        )
        cpu_before = sum(process.cpu_times()[:2])
        started = time.monotonic()
        create_jobs(plane, namespace, names)
        created = time.monotonic() - started
        wait_for(
            f"{jobs} statuses from {which}",
            lambda: len(with_status(http, namespace)) == jobs + 1,
            process,
            ALL_STATUSES_TIMEOUT_S,
        )
        elapsed = time.monotonic() - started
        time.sleep(STEADY_STATE_S)
        peak = peak_rss_mb(process)
        cpu = sum(process.cpu_times()[:2]) - cpu_before
    return Measurement(which, round(elapsed, 2), round(created, 2), round(peak, 1), round(cpu, 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)

    record = BenchmarkRecord(
        "operator-scale",
        Path(__file__),
        {"jobs": args.jobs, "rounds": args.rounds, "steadyStateSeconds": STEADY_STATE_S},
        argv,
    )
    print(f"operator scale: {args.jobs} FineTuneJobs, {args.rounds} rounds, on a real kube-apiserver")
    with (
        tempfile.TemporaryDirectory(prefix="operator-scale-") as scratch,
        start_control_plane(find_binaries(REPO)) as plane,
    ):
        plane.kubectl("apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", str(CRD_DIR))
        crds = [path.name.removesuffix(".yaml") for path in CRD_DIR.glob("*.yaml")]
        plane.kubectl("wait", "--for=condition=Established", "--timeout=90s", "crd", *crds)
        for index in range(args.rounds):
            order = OPERATORS if index % 2 == 0 else tuple(reversed(OPERATORS))
            results: dict[str, Measurement] = {}
            for which in order:
                workdir = Path(scratch) / f"round-{index + 1}-{which}"
                workdir.mkdir()
                results[which] = measure(which, plane, args.jobs, workdir)
            ours, theirs = results["kubetune"], results["minimal"]
            ratio = ours.seconds_to_all_statuses / theirs.seconds_to_all_statuses
            record.add_round(
                {"order": list(order), **{w: asdict(m) for w, m in results.items()}, "timeRatio": ratio}
            )
            print(
                f"round {index + 1} ({' then '.join(order)}): "
                f"kubetune {ours.seconds_to_all_statuses:.1f}s {ours.peak_rss_mb:.0f} MB "
                f"(cpu {ours.cpu_seconds:.1f}s), minimal {theirs.seconds_to_all_statuses:.1f}s "
                f"{theirs.peak_rss_mb:.0f} MB (cpu {theirs.cpu_seconds:.1f}s), time ratio {ratio:.2f}",
                flush=True,
            )
    rounds = record.rounds
    summaries = [
        record.summarize(
            "timeRatio",
            f"time until all {args.jobs} jobs have a status, kubetune / minimal Kopf operator",
            [r["timeRatio"] for r in rounds],
            TIME_RATIO_TARGET,
        ),
        record.summarize(
            "kubetunePeakRssMb",
            "kubetune operator's peak resident memory (MB)",
            [r["kubetune"]["peak_rss_mb"] for r in rounds],
            MEMORY_TARGET_MB,
        ),
        record.summarize(
            "minimalPeakRssMb",
            "minimal Kopf operator's peak resident memory (MB)",
            [r["minimal"]["peak_rss_mb"] for r in rounds],
        ),
    ]
    for summary in summaries:
        print(summary.line())
    if args.rounds < MIN_ROUNDS:
        print(f"(fewer than {MIN_ROUNDS} rounds: a quick look, not a figure to quote)")
    path = record.write(args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
