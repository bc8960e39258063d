"""kubetune's vLLM engine on a GPU: a prepared check for when a GPU machine is lent (it has not run yet).

    python benchmarks/device/vllm_check.py --out $OUT/vllm [--wheelhouse DIR] [--vllm-venv DIR]

Run with the kubetune venv's python. It

1. builds a tiny Llama from a config (no download; head size 64, which vLLM's attention kernels take)
   and two LoRA adapters of it (PEFT, r=8, different random B matrices so they answer differently),
   and records each adapter's greedy completion of a few prompts with transformers + PEFT (reference);
2. makes a separate venv (vLLM brings its own CUDA torch: kubetune's venv keeps torch 2.13.0) and
   installs vllm, bentoml and peft there (from PyPI, or offline from --wheelhouse), plus kubetune
   itself without dependencies, unless --vllm-venv names one that has them;
3. serves the base with both adapters through kubetune's vLLM service (``bentoml serve
   kubetune_components.serving.vllm_service:VLLMService``, KUBETUNE_ADAPTERS, KUBETUNE_VLLM_OPTIONS)
   and waits for /readyz (the engine's warm-up);
4. queries it with the official openai client as the gateway does, at ``/adapters/<version>/v1``
   (chat and completions, streamed and not, /v1/models) and checks: every answer carries its
   version's ``x-kubetune-version`` and usage, the two adapters answer differently, and each
   adapter's greedy completion through vLLM starts as its transformers reference does (float16 on
   vLLM vs float32 on transformers: the first REFERENCE_TOKENS tokens are compared);
5. prints one JSON line of figures and checks, writes it to --out/vllm_check.json, exits 1 if a
   check fails (2 without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
PORT = 3311
READY_TIMEOUT_S = 900
REFERENCE_TOKENS = 4
MAX_TOKENS = 12
PROMPTS = ["ticket 3 about billing", "ticket 7 about shipping", "route this"]
VENV_PACKAGES = ["vllm", "bentoml", "peft", "fsspec", "openai"]


def build_models(out: Path) -> tuple[Path, dict[str, Path]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kubetune_components.dev import tinylm

    base = tinylm.build_random_tiny(
        out / "base",
        seed=0,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
    )
    adapters: dict[str, Path] = {}
    for seed, name in enumerate(("tuned-a", "tuned-b"), start=1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(base))
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                torch.nn.init.normal_(param, std=0.5)  # an untrained B is zero: make the adapters matter
        adapters[name] = out / name
        peft_model.save_pretrained(str(adapters[name]))
    return base, adapters


def reference_completions(base: Path, adapters: dict[str, Path]) -> dict[str, list[list[int]]]:
    """Each adapter's greedy completion token ids with transformers + PEFT, per prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    device = torch.device("cuda", 0)
    result: dict[str, list[list[int]]] = {}
    for name, directory in adapters.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(directory))
        model = model.merge_and_unload().to(device).eval()
        completions = []
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").to(device)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)
            completions.append(out[0, ids["input_ids"].shape[1] :].tolist())
        result[name] = completions
    return result


def make_venv(venv: Path, wheelhouse: Path | None) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        source = ["--no-index", "--find-links", str(wheelhouse)] if wheelhouse else []
        subprocess.run([str(python), "-m", "pip", "install", "-q", *source, *VENV_PACKAGES], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)], check=True)
    return python


def wait_ready(url: str, server: subprocess.Popen[bytes], log: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        if server.poll() is not None:
            raise RuntimeError(f"the vLLM service exited with {server.returncode}; log: {log}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as answer:
                if answer.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"/readyz did not answer 200 within {READY_TIMEOUT_S}s; log: {log}")


def query(url: str, adapters: dict[str, Path]) -> dict[str, Any]:
    from openai import OpenAI

    found: dict[str, Any] = {"versions": {}}
    for name in adapters:
        client = OpenAI(base_url=f"{url}/adapters/{name}/v1", api_key="unused")
        texts, headers, usages = [], [], []
        for prompt in PROMPTS:
            raw = client.completions.with_raw_response.create(
                model="support-bot", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            completion = raw.parse()
            texts.append(completion.choices[0].text)
            headers.append(raw.headers.get("x-kubetune-version"))
            usages.append(completion.usage.completion_tokens if completion.usage else None)
        chat = client.chat.completions.create(
            model="support-bot", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=MAX_TOKENS
        )
        stream = client.chat.completions.create(
            model="support-bot",
            messages=[{"role": "user", "content": PROMPTS[0]}],
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        found["versions"][name] = {
            "completions": texts,
            "headers": headers,
            "usage": usages,
            "chatAnswered": bool(chat.choices and chat.choices[0].message.content is not None),
            "streamChunks": len(chunks),
            "streamUsage": chunks[-1].usage.completion_tokens if chunks and chunks[-1].usage else None,
        }
    models = OpenAI(base_url=f"{url}/v1", api_key="unused").models.list()
    found["models"] = sorted(model.id for model in models.data)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--wheelhouse", type=Path, default=None, help="install the venv offline from here")
    parser.add_argument("--vllm-venv", type=Path, default=None, help="a venv with vllm (default: --out/venv)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: this check needs one", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    base, adapters = build_models(args.out / "models")
    reference = reference_completions(base, adapters)
    python = make_venv(args.vllm_venv or args.out / "venv", args.wheelhouse)

    env = {
        **os.environ,
        "KUBETUNE_MODEL_DIR": str(adapters["tuned-a"]),
        "KUBETUNE_DEPLOYMENT": "support-bot",
        "KUBETUNE_VERSION": "tuned-a",
        "KUBETUNE_ADAPTERS": json.dumps({name: str(path) for name, path in adapters.items()}),
        "KUBETUNE_VLLM_OPTIONS": json.dumps(
            {"dtype": "float16", "maxModelLen": 256, "gpuMemoryUtilization": "0.3"}
        ),
        "BENTOML_DO_NOT_TRACK": "True",
        "VLLM_NO_USAGE_STATS": "1",
    }
    log = args.out / "server.log"
    service = "kubetune_components.serving.vllm_service:VLLMService"
    command = [str(python), "-m", "bentoml", "serve", service, "--host", "127.0.0.1", "--port", str(PORT)]
    url = f"http://127.0.0.1:{PORT}"
    with log.open("wb") as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=args.out)
    try:
        ready_s = wait_ready(url, server, log)
        found = query(url, adapters)
    finally:
        server.terminate()
        server.wait(timeout=60)
    versions = found["versions"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    starts_as_reference = {
        name: [
            served.startswith(tokenizer.decode(expected[:REFERENCE_TOKENS], skip_special_tokens=True))
            for served, expected in zip(versions[name]["completions"], reference[name], strict=True)
        ]
        for name in adapters
    }
    figures: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "readySeconds": round(ready_s, 1),
        "models": found["models"],
        "versions": versions,
        "startsAsReference": starts_as_reference,
    }
    checks = {
        "answers carry their version": all(
            v["headers"] == [name] * len(PROMPTS) for name, v in versions.items()
        ),
        "usage reported": all(all(u for u in v["usage"]) and v["streamUsage"] for v in versions.values()),
        "chat and streams answered": all(
            v["chatAnswered"] and v["streamChunks"] > 1 for v in versions.values()
        ),
        "the adapters answer differently": versions["tuned-a"]["completions"]
        != versions["tuned-b"]["completions"],
        "each adapter starts as its transformers reference": all(
            all(v) for v in starts_as_reference.values()
        ),
        "both LoRAs listed": {"tuned-a", "tuned-b"} <= set(found["models"]),
    }
    figures["checks"] = checks
    line = json.dumps(figures, sort_keys=True)
    print(line)
    (args.out / "vllm_check.json").write_text(line + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
