"""What does the gateway add? Latency and throughput of a fast model-server stub, direct vs through it.

Starts, each in its own process on a free loopback port: a stub OpenAI server that answers every
request at once with a fixed chat completion (raw ASGI on uvicorn, so the stub costs as little as
possible), and the gateway (``python -m kubetune.gateway``) with two versions (80/20, sticky by
user) both pointing at the stub. Then, from this process with httpx:

- latency: requests one at a time (concurrency 1), so the figures are per-request cost, not queueing;
- throughput: ``--requests`` requests with ``--concurrency`` in flight.

Both phases run directly against the stub and through the gateway, after a warm-up, in interleaved
rounds (the machine may be shared: a burst of background load then hits both sides alike). Prints
p50/p99, the latency the gateway adds and the throughput ratio. Not part of the test suite:

    python benchmarks/gateway.py [--requests 2000] [--concurrency 16] [--latency-requests 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

DEPLOYMENT = "bench"
ROUNDS = 4
STUB_ANSWER = json.dumps(
    {
        "id": "stub",
        "object": "chat.completion",
        "created": 1700000000,
        "model": DEPLOYMENT,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "billing"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
    }
).encode()


async def stub_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The fastest honest OpenAI stub: reads the request, answers a fixed completion."""
    if scope["type"] != "http":
        return
    more_body = True
    while more_body:
        message = await receive()
        more_body = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(STUB_ANSWER)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": STUB_ANSWER})


def serve_stub(port: int) -> None:
    import uvicorn

    uvicorn.run(stub_app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_up(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            if process.poll() is not None:
                raise RuntimeError(f"the {what} exited with code {process.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {what} did not come up at {url}") from None
            time.sleep(0.1)


def request_body(index: int) -> dict[str, Any]:
    return {
        "model": DEPLOYMENT,
        "messages": [{"role": "user", "content": f"My card was charged twice for order #{index}."}],
        "user": f"user-{index % 500}",
        "temperature": 0.7,
    }


async def run_load(client: httpx.AsyncClient, count: int, concurrency: int) -> tuple[list[float], float]:
    """Latencies (seconds) of ``count`` requests with ``concurrency`` in flight, and the wall time."""
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=request_body(index))
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"{client.base_url}: HTTP {response.status_code}: {response.text[:200]}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


async def measure(urls: dict[str, str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Both targets, in interleaved rounds, so a change in background load hits both alike."""
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    clients = {name: httpx.AsyncClient(base_url=url, limits=limits, timeout=30) for name, url in urls.items()}
    sequential: dict[str, list[float]] = {name: [] for name in urls}
    loaded: dict[str, list[float]] = {name: [] for name in urls}
    wall: dict[str, float] = dict.fromkeys(urls, 0.0)
    try:
        for client in clients.values():
            await run_load(client, args.warmup, args.concurrency)
        for _ in range(ROUNDS):
            for name, client in clients.items():
                latencies, _ = await run_load(client, args.latency_requests // ROUNDS, 1)
                sequential[name] += latencies
            for name, client in clients.items():
                latencies, seconds = await run_load(client, args.requests // ROUNDS, args.concurrency)
                loaded[name] += latencies
                wall[name] += seconds
    finally:
        for client in clients.values():
            await client.aclose()
    return {
        name: {
            "p50": quantile(sequential[name], 0.50) * 1000,
            "p99": quantile(sequential[name], 0.99) * 1000,
            "loaded_p50": quantile(loaded[name], 0.50) * 1000,
            "loaded_p99": quantile(loaded[name], 0.99) * 1000,
            "throughput": len(loaded[name]) / wall[name],
        }
        for name in urls
    }


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc); None where that is not available."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quantile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests in the throughput phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--latency-requests", type=int, default=500, help="sequential requests, latency phase"
    )
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--serve-stub", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stub is not None:
        serve_stub(args.serve_stub)
        return 0
    if not ROUNDS <= args.requests <= 20_000 or not ROUNDS <= args.latency_requests <= 20_000:
        parser.error(f"--requests and --latency-requests must be {ROUNDS}..20000")
    if not 1 <= args.concurrency <= 256:
        parser.error("--concurrency must be 1..256")

    stub_port, gateway_port = free_port(), free_port()
    stub_url, gateway_url = f"http://127.0.0.1:{stub_port}", f"http://127.0.0.1:{gateway_port}"
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "gateway.json"
        config_path.write_text(
            json.dumps(
                {
                    "deployment": DEPLOYMENT,
                    "versions": [
                        {"name": "tuned", "url": stub_url, "weight": 80},
                        {"name": "int8", "url": stub_url, "weight": 20},
                    ],
                    "generation": {"defaults": {"maxTokens": 16}, "limits": {"maxTemperature": 1.5}},
                }
            )
        )
        stub = subprocess.Popen(
            [sys.executable, __file__, "--serve-stub", str(stub_port)], stdout=subprocess.DEVNULL
        )
        gateway_command = [sys.executable, "-m", "kubetune.gateway", "--config", str(config_path)]
        gateway_command += ["--port", str(gateway_port), "--log-level", "warning"]
        gateway = subprocess.Popen(gateway_command, stdout=subprocess.DEVNULL)
        try:
            wait_until_up(f"{stub_url}/", stub, "stub")
            wait_until_up(f"{gateway_url}/healthz", gateway, "gateway")
            cpu_before = {name: cpu_seconds(p.pid) for name, p in (("stub", stub), ("gateway", gateway))}
            results = asyncio.run(measure({"direct": stub_url, "gateway": gateway_url}, args))
            cpu_after = {name: cpu_seconds(p.pid) for name, p in (("stub", stub), ("gateway", gateway))}
        finally:
            for process in (gateway, stub):
                process.terminate()
                process.wait(timeout=10)

    direct, through = results["direct"], results["gateway"]
    print(
        f"gateway benchmark: {args.latency_requests} sequential + {args.requests} requests at concurrency "
        f"{args.concurrency}, each direct and through the gateway"
    )
    print(f"  {'':34}{'direct':>10}{'gateway':>10}")
    print(f"  {'latency p50, concurrency 1 (ms)':34}{direct['p50']:10.2f}{through['p50']:10.2f}")
    print(f"  {'latency p99, concurrency 1 (ms)':34}{direct['p99']:10.2f}{through['p99']:10.2f}")
    label = f"latency p50, concurrency {args.concurrency} (ms)"
    print(f"  {label:34}{direct['loaded_p50']:10.2f}{through['loaded_p50']:10.2f}")
    label = f"latency p99, concurrency {args.concurrency} (ms)"
    print(f"  {label:34}{direct['loaded_p99']:10.2f}{through['loaded_p99']:10.2f}")
    print(f"  {'throughput (requests/s)':34}{direct['throughput']:10.0f}{through['throughput']:10.0f}")
    added_p50, added_p99 = through["p50"] - direct["p50"], through["p99"] - direct["p99"]
    print(f"  added latency p50 {added_p50:.2f} ms, p99 {added_p99:.2f} ms")
    print(f"  throughput ratio (gateway / direct) {through['throughput'] / direct['throughput']:.2f}")
    # Wall-clock figures on a small shared machine include waiting for CPUs; CPU time per request is
    # the cost itself. Every request reaches the stub once; the gateway sees only its own.
    per_target = args.warmup + args.latency_requests // ROUNDS * ROUNDS + args.requests // ROUNDS * ROUNDS
    costs = []
    for name, requests in (("stub", 2 * per_target), ("gateway", per_target)):
        before, after = cpu_before[name], cpu_after[name]
        if before is not None and after is not None:
            costs.append(f"{name} {(after - before) / requests * 1000:.2f} ms")
    if costs:
        print(f"  CPU time per request: {', '.join(costs)} (this machine: {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
