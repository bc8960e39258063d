"""Four LoRA versions of one base model: one shared adapter server vs four servers, in one run.

Builds a random Llama (``--hidden-size``, ``--layers``; about 24M parameters by default, so the
weights, not only the Python runtime, weigh in) and four LoRA adapters of it (random, non-zero
weights), then starts, each as its own process on a free loopback port with one torch thread and
the same micro-batching (up to 8 requests, 20 ms):

- shared: one server holding the base once and the four adapters (``serving.shared_api``), each
  version under ``/adapters/<version>``;
- separate: four servers, one per adapter (``serving.openai_api``, the adapter merged, as a
  version is served today).

All processes run on the same cores. Each round measures both back to back (alternating which goes
first): throughput at concurrency 8 (closed loop, the 8 clients spread over the 4 versions, greedy
completions of ``--max-tokens`` tokens) and the resident memory (VmRSS) of the server processes.
Targets: the shared server's memory <= 1.3x one server's (four servers cost about 4x) and its
throughput >= 0.9x the four servers'. Writes benchmarks/results/multi-adapter.json. Not part of the
test suite:

    python benchmarks/multi_adapter.py [--rounds 5] [--duration 8] [--max-tokens 16]
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
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import MIN_ROUNDS, BenchmarkRecord, Target

VERSIONS = ("v1", "v2", "v3", "v4")
CONCURRENCY = 8
BATCH_ENV = {"KUBETUNE_MAX_BATCH_SIZE": "8", "KUBETUNE_MAX_LATENCY_MS": "20"}
PROMPTS = (
    "Route the ticket to one team.\nI was charged twice this month.",
    "Route the ticket to one team.\nThe app logs me out every few minutes.",
    "Route the ticket to one team.\nMy parcel has not arrived.",
    "Route the ticket to one team.\nPlease change the email on my account.",
)


# -- the servers (run as `multi_adapter.py serve-shared|serve-one ...` in their own processes) ---------


def serve(kind: str, port: int, model_dirs: dict[str, str]) -> None:
    import torch
    import uvicorn

    from kubetune_components.serving.adapters import SharedAdapters
    from kubetune_components.serving.config import ServingSettings
    from kubetune_components.serving.openai_api import RuntimeSlot, ServingIdentity, create_app
    from kubetune_components.serving.runtime import ModelRuntime
    from kubetune_components.serving.shared_api import SharedSlot, create_shared_app

    torch.set_num_threads(1)
    limits = ServingSettings.from_env().limits
    app: Any
    if kind == "serve-shared":
        slot = SharedSlot("bench", "bench")
        slot.set_shared(SharedAdapters.load(model_dirs, limits=limits, device="cpu"))
        app = create_shared_app(slot)
    else:
        ((version, model_dir),) = model_dirs.items()
        runtime_slot = RuntimeSlot(ServingIdentity("bench", version, "bench"))
        runtime_slot.set_runtime(ModelRuntime.load(model_dir, limits=limits, device="cpu"))
        app = create_app(runtime_slot)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- the driver ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def build_models(root: Path, hidden_size: int, layers: int) -> dict[str, str]:
    import torch
    from peft import LoraConfig, get_peft_model

    from kubetune_components.common import models
    from kubetune_components.dev import tinylm

    base = tinylm.build_random_tiny(
        root / "base",
        seed=0,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=hidden_size * 11 // 4,
    )
    adapters: dict[str, str] = {}
    for seed, version in enumerate(VERSIONS, start=1):
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(models.load_causal_lm(str(base)), config)
        out = root / version
        model.save_pretrained(str(out))
        adapter_config = json.loads((out / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = str(base)
        (out / "adapter_config.json").write_text(json.dumps(adapter_config))
        adapters[version] = str(out)
    return adapters


def start(kind: str, model_dirs: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, **BATCH_ENV, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, kind, str(port), json.dumps(model_dirs)]
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"a server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} was not ready within {timeout_s:g}s; see {log}")


def resident_mib(pids: list[int]) -> float:
    total_kib = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


async def throughput(urls: dict[str, str], duration_s: float, max_tokens: int) -> float:
    """Completed requests per second, CONCURRENCY closed-loop clients spread over the versions."""
    done = 0
    deadline = time.monotonic() + duration_s

    async def client(http: httpx.AsyncClient, index: int) -> None:
        nonlocal done
        version = VERSIONS[index % len(VERSIONS)]
        turn = 0
        while time.monotonic() < deadline:
            body = {
                "model": "bench",
                "prompt": PROMPTS[(index + turn) % len(PROMPTS)],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            response = await http.post(urls[version] + "/v1/completions", json=body)
            response.raise_for_status()
            done += 1
            turn += 1

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=CONCURRENCY)) as http:
        await asyncio.gather(*(client(http, index) for index in range(CONCURRENCY)))
    return done / (time.monotonic() - started)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] in ("serve-shared", "serve-one"):
        serve(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per setup and round")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}")
    record = BenchmarkRecord("multi-adapter", Path(__file__), {**vars(args), "concurrency": CONCURRENCY})
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        log = root / "servers.log"
        adapters = build_models(root, args.hidden_size, args.layers)
        try:
            shared, shared_url = start("serve-shared", adapters, log)
            separate = {
                version: start("serve-one", {version: adapters[version]}, log) for version in VERSIONS
            }
            processes = [shared, *(process for process, _ in separate.values())]
            wait_ready(shared, shared_url + "/adapters", log)
            for process, url in separate.values():
                wait_ready(process, url + "/v1/models", log)
            setups = {
                "shared": (
                    {version: f"{shared_url}/adapters/{version}" for version in VERSIONS},
                    [shared.pid],
                ),
                "separate": (
                    {version: url for version, (_, url) in separate.items()},
                    [process.pid for process, _ in separate.values()],
                ),
            }
            for urls, _ in setups.values():  # warm-up: first generate calls allocate
                asyncio.run(throughput(urls, 2.0, args.max_tokens))
            memory_ratios: list[float] = []
            four_ratios: list[float] = []
            speed_ratios: list[float] = []
            for round_number in range(1, args.rounds + 1):
                order = ["shared", "separate"] if round_number % 2 else ["separate", "shared"]
                rates = {
                    name: asyncio.run(throughput(setups[name][0], args.duration, args.max_tokens))
                    for name in order
                }
                one_server = resident_mib(setups["separate"][1][:1])
                memory = {name: resident_mib(pids) for name, (_, pids) in setups.items()}
                figures = {
                    "requestsPerSecond": {name: round(rate, 2) for name, rate in rates.items()},
                    "residentMiB": {
                        **{name: round(mib, 1) for name, mib in memory.items()},
                        "oneServer": round(one_server, 1),
                    },
                }
                record.add_round(figures)
                memory_ratios.append(memory["shared"] / one_server)
                four_ratios.append(memory["separate"] / one_server)
                speed_ratios.append(rates["shared"] / rates["separate"])
                print(
                    f"round {round_number}: requests/s shared {rates['shared']:.2f} vs 4 servers "
                    f"{rates['separate']:.2f} (x{speed_ratios[-1]:.2f}); resident MiB shared "
                    f"{memory['shared']:.0f}, one server {one_server:.0f}, 4 servers {memory['separate']:.0f}"
                )
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
    summaries = [
        record.summarize(
            "sharedMemoryOverOneServer",
            "resident memory of the shared server (4 adapters) over one server of one version",
            memory_ratios,
            Target(1.3, higher_is_better=False),
        ),
        record.summarize(
            "fourServersMemoryOverOneServer",
            "resident memory of the 4 servers over one server",
            four_ratios,
        ),
        record.summarize(
            "sharedThroughputOverFourServers",
            f"requests/s at concurrency {CONCURRENCY}, shared server over the 4 servers",
            speed_ratios,
            Target(0.9),
        ),
    ]
    for summary in summaries:
        print(summary.line())
    print(f"wrote {record.write()}")
    return 0 if summaries[0].met_by_median and summaries[2].met_by_median else 1


if __name__ == "__main__":
    sys.exit(main())
