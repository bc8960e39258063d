"""What do keys, limits (in Redis) and the audit log add to a gateway request?

Starts a fast stub model server, a real ``redis-server`` and two gateways in front of the same stub:
*plain* (no key, no limits, no audit) and *guarded* (a key required, per-key requests-per-minute and
tokens-per-minute limits and a daily token budget counted in Redis, the hash-chained audit log to a
file). Requests go one at a time (concurrency 1), so the figures are per-request cost. Each round (at
least 5) alternates between the two gateways request by request, so background load on a shared
machine hits both alike; every round is printed, then the median and min-max of the p50 and p95 the
guarded gateway adds. Target: under 1 ms added at p50. Not part of the test suite:

    python benchmarks/gateway_access.py [--rounds 5] [--requests 300]

Writes benchmarks/results/gateway-access.json (rounds, machine, commit, date).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import BenchmarkRecord, Target
from gateway import DEPLOYMENT, free_port, serve_stub, wait_until_up
from kubetune.gateway.access.audit import verify
from kubetune.gateway.access.keys import Scope, create_key, load_or_create_signing_key

LIMITS = {"requestsPerMinute": 1_000_000, "tokensPerMinute": 100_000_000, "tokensPerDay": 1_000_000_000}


def quantile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def request_body(index: int) -> dict[str, Any]:
    return {
        "model": DEPLOYMENT,
        "messages": [{"role": "user", "content": f"My card was charged twice for order #{index}."}],
        "user": f"user-{index % 500}",
        "temperature": 0.7,
    }


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def gateway_config(stub_url: str, access: dict[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "deployment": DEPLOYMENT,
        "versions": [
            {"name": "a", "url": stub_url, "weight": 80},
            {"name": "b", "url": stub_url, "weight": 20},
        ],
    }
    if access is not None:
        config["access"] = access
    return config


def latency(client: httpx.Client, url: str, index: int, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    response = client.post(f"{url}/v1/chat/completions", json=request_body(index), headers=headers)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered {response.status_code}: {response.text}")
    return elapsed


def paired_latencies(
    client: httpx.Client, urls: dict[str, str], headers: dict[str, dict[str, str]], count: int
) -> dict[str, list[float]]:
    """``count`` requests to each gateway, alternating request by request (which goes first alternates
    too), so a burst of background load hits both sides alike."""
    measured: dict[str, list[float]] = {name: [] for name in urls}
    names = list(urls)
    for index in range(count):
        for name in names if index % 2 else reversed(names):
            measured[name].append(latency(client, urls[name], index, headers[name]))
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="requests per gateway per round")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--serve-stub", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stub is not None:
        serve_stub(args.serve_stub)
        return 0
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        print("error: redis-server is not installed (make system-deps)", file=sys.stderr)
        return 2
    record = BenchmarkRecord("gateway-access", Path(__file__), vars(args))
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        try:
            stub_port, redis_port = free_port(), free_port()
            processes.append(
                start([sys.executable, __file__, "--serve-stub", str(stub_port)], work / "stub.log")
            )
            processes.append(
                start(
                    [redis_binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
                    work / "redis.log",
                )
            )
            stub_url = f"http://127.0.0.1:{stub_port}"
            keys_file, signing = work / "keys.json", work / "signing.key"
            token = create_key(keys_file, "bench", [Scope.INFERENCE]).token
            load_or_create_signing_key(signing)
            access = {
                "auth": "required",
                "keysFile": str(keys_file),
                "signingKeyFile": str(signing),
                "limits": {"perKey": LIMITS, "perTenant": LIMITS},
                "store": {"redisUrl": f"redis://127.0.0.1:{redis_port}/0"},
                "audit": {"path": str(work / "audit.jsonl")},
            }
            urls: dict[str, str] = {}
            for name, section in (("plain", None), ("guarded", access)):
                config_path = work / f"{name}.json"
                config_path.write_text(json.dumps(gateway_config(stub_url, section)))
                port = free_port()
                command = [
                    sys.executable,
                    "-m",
                    "kubetune.gateway",
                    "--config",
                    str(config_path),
                    "--port",
                    str(port),
                ]
                command += ["--log-level", "warning"]
                process = start(command, work / f"{name}.log")
                processes.append(process)
                urls[name] = f"http://127.0.0.1:{port}"
                wait_until_up(f"{urls[name]}/healthz", process, f"{name} gateway")
            headers: dict[str, dict[str, str]] = {
                "plain": {},
                "guarded": {"authorization": f"Bearer {token}"},
            }
            with httpx.Client(timeout=30, trust_env=False) as client:
                paired_latencies(client, urls, headers, args.warmup)
                added_p50, added_p95 = [], []
                for round_number in range(1, args.rounds + 1):
                    figures: dict[str, float] = {}
                    for name, measured in paired_latencies(client, urls, headers, args.requests).items():
                        figures[f"{name}P50Ms"] = quantile(measured, 0.50) * 1000
                        figures[f"{name}P95Ms"] = quantile(measured, 0.95) * 1000
                    figures["addedP50Ms"] = figures["guardedP50Ms"] - figures["plainP50Ms"]
                    figures["addedP95Ms"] = figures["guardedP95Ms"] - figures["plainP95Ms"]
                    added_p50.append(figures["addedP50Ms"])
                    added_p95.append(figures["addedP95Ms"])
                    record.add_round(figures)
                    print(
                        f"round {round_number}: plain p50 {figures['plainP50Ms']:.3f} ms p95 "
                        f"{figures['plainP95Ms']:.3f} ms | guarded p50 {figures['guardedP50Ms']:.3f} ms p95 "
                        f"{figures['guardedP95Ms']:.3f} ms | added p50 {figures['addedP50Ms']:+.3f} ms "
                        f"p95 {figures['addedP95Ms']:+.3f} ms"
                    )
            audit = verify(work / "audit.jsonl")
            record.extra["auditLog"] = audit.summary()
            summaries = [
                record.summarize(
                    "addedP50Ms",
                    "p50 added by auth + limits (Redis) + audit, ms",
                    added_p50,
                    Target(1.0, False),
                ),
                record.summarize("addedP95Ms", "p95 added by auth + limits (Redis) + audit, ms", added_p95),
            ]
            for summary in summaries:
                print(summary.line())
            print(f"audit log of the guarded gateway: {audit.summary()}")
            print(f"wrote {record.write()}")
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
