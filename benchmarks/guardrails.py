"""What do the gateway's guards (spec.guardrails) cost per request, and how well do the detectors detect?

Latency: an echo model server (it answers the prompt back, so the output guards read as much text as
the input guards) behind three gateways: ``off`` (no guards), ``rules`` (prompt-injection rules,
moderation, output sanitization with an allow-list and stripHtml, prompt-leak detection) and ``all``
(those and PII, Presidio's pattern recognizers, on input and output; only when
``kubetune.gateway.guards.pii`` is installed). Sequential chat completions with 200- and 2,000-character
prompts go to each, interleaved request by request (so load from elsewhere hits all alike), in at least 5
rounds; the added latency is the
difference of the p50s within a round. Target: under 5 ms p50 added at 2,000 characters with every
guard on. The guards' own CPU time per request (in this process, no HTTP) is measured beside it.

Detectors: precision, recall and false-positive rate of the prompt-injection rules. Development set:
every row of benchmarks/data/prompt-injection.jsonl. Its ``split`` field still says which rows were once
a held-out half, but the second round of rules was written looking at all of them, so all are dev data
now. Blind set: benchmarks/data/prompt-injection-heldout.jsonl, written by someone else and not looked at
while writing the rules; its figures are the honest ones, reported when the file exists. Target: recall
>= 0.9 at FPR <= 0.05, on the blind set (on dev when there is none). Then a tiny classifier (a 2-layer
BERT trained from a config on the dev set only, ``kubetune_guardrails.tiny_classifier``) alone and
combined with the rules, on the blind set. The rules' own time per text (200 and 2,000 characters) is
measured in every latency round. PII figures (part of issue 14, measured by benchmarks/pii_eval.py) go
beside these under ``detectors.pii`` when that module provides them.

    python benchmarks/guardrails.py [--rounds 5] [--requests 150] [--no-classifier]
    python benchmarks/guardrails.py --detectors-only [--dev-only] [--no-classifier]   # prints, writes nothing

Writes benchmarks/results/guardrails.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import MIN_ROUNDS, BenchmarkRecord, Target
from gateway import free_port, wait_until_up
from kubetune.gateway.guards import GuardPipeline
from kubetune_contract.guardrails import Guardrails
from kubetune_guardrails.injection import rule_score

DEPLOYMENT = "guarded"
DEV_SET = Path(__file__).resolve().parent / "data" / "prompt-injection.jsonl"
BLIND_SET = Path(__file__).resolve().parent / "data" / "prompt-injection-heldout.jsonl"
SIZES = (200, 2000)
ADDED_P50_TARGET = Target(5.0, higher_is_better=False)
RULES_TIME_TARGET = Target(1000.0, higher_is_better=False)  # microseconds per text
RECALL_TARGET = Target(0.9)
FPR_TARGET = Target(0.05, higher_is_better=False)
SYSTEM_PROMPT = "You are the support assistant of Example Corp. Answer questions about orders and invoices."
SENTENCES = (
    "My order 4411 arrived yesterday but the box was damaged and one cup is broken. ",
    "Could you tell me how the refund works, and whether I need to send the cup back? ",
    "I read the page at https://help.example.com/refunds but it says nothing about damaged items. ",
    "Also, the invoice shows the wrong billing address, it should be 12 Harbour Road. ",
    "We have been customers for years and usually everything works well, so no stress. ",
)


RULE_GUARDS: dict[str, Any] = {
    "promptInjection": {"action": "block", "threshold": "0.5"},
    "moderation": {"action": "block"},
    "output": {"allowedLinkDomains": ["example.com"], "stripHtml": True, "detectPromptLeak": True},
}
PII_GUARD: dict[str, Any] = {"pii": {"input": "redact", "output": "redact"}}


def guard_configs() -> dict[str, dict[str, Any] | None]:
    """The gateways measured: no guards, the rule-based ones, and every guard (with PII when installed)."""
    configs: dict[str, dict[str, Any] | None] = {"off": None, "rules": RULE_GUARDS}
    if pii_installed():
        configs["all"] = {**RULE_GUARDS, **PII_GUARD}
    return configs


def pii_installed() -> bool:
    return importlib.util.find_spec("kubetune.gateway.guards.pii") is not None


def prompt_of(size: int) -> str:
    text = ""
    while len(text) < size:
        text += SENTENCES[len(text) // 80 % len(SENTENCES)]
    return text[:size]


# -- the echo model server -------------------------------------------------------------------------


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers a chat completion with its last message's text."""
    if scope["type"] != "http":
        return
    body, more_body = b"", True
    while more_body:
        message = await receive()
        body += message.get("body", b"")
        more_body = message.get("more_body", False)
    request = json.loads(body or b"{}")
    content = (request.get("messages") or [{}])[-1].get("content", "")
    answer = json.dumps(
        {
            "id": "echo",
            "object": "chat.completion",
            "created": 1,
            "model": "echo",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


def serve_echo(port: int) -> None:
    import uvicorn

    uvicorn.run(echo_app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


def gateway_config(stub_url: str, guardrails: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "deployment": DEPLOYMENT,
        "versions": [{"name": "v1", "url": stub_url, "weight": 100, "prompt": "support"}],
        "prompts": [{"name": "support", "system": SYSTEM_PROMPT}],
        "guardrails": guardrails,
    }


def start_gateway(tmp: Path, name: str, config: dict[str, Any]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "kubetune.gateway", "--config", str(path), "--port", str(port)]
    process = subprocess.Popen([*command, "--log-level", "warning"], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/healthz", process, f"gateway ({name})")
    return process, url


def p50_ms(
    client: httpx.Client, urls: dict[str, str], order: list[str], prompt: str, requests: int
) -> dict[str, float]:
    """Each gateway's p50, its requests interleaved one by one with the others' (so a burst of load from
    elsewhere on the machine hits every gateway alike)."""
    body = {"model": DEPLOYMENT, "messages": [{"role": "user", "content": prompt}]}
    latencies: dict[str, list[float]] = {name: [] for name in order}
    for index in range(requests):
        for name in order[index % len(order) :] + order[: index % len(order)]:
            started = time.perf_counter()
            response = client.post(f"{urls[name]}/v1/chat/completions", json=body)
            latencies[name].append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise RuntimeError(f"{name}: {response.status_code} {response.text[:300]}")
    return {name: statistics.median(values) for name, values in latencies.items()}


def pipeline_cpu_ms(pipeline: GuardPipeline, prompt: str, repeats: int = 200) -> float:
    """The guards' own time per request: input guards, upstream preparation and the answer's guards."""
    times = []
    for _ in range(repeats):
        body = {"model": DEPLOYMENT, "messages": [{"role": "user", "content": prompt}]}
        started = time.perf_counter()
        pipeline.check_input(True, body)
        upstream = {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, *body["messages"]]}
        pipeline.prepare_upstream(True, upstream)
        answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": prompt}}]}
        pipeline.check_answer(True, upstream, answer)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


# -- detectors ---------------------------------------------------------------------------------------


LABELS = {1: 1, 0: 0, "attack": 1, "benign": 0}


def load_set(path: Path) -> list[dict[str, Any]]:
    """Rows with ``label`` as 1 (attack) or 0 (benign): the dev set writes 1/0, the blind set the words."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for number, row in enumerate(rows, start=1):
        if row.get("label") not in LABELS:
            raise ValueError(f"{path.name} line {number}: label must be 1, 0, attack or benign")
        row["label"] = LABELS[row["label"]]
    return rows


def rules_time_us(prompt: str, repeats: int = 300) -> float:
    """The prompt-injection rules' own time per text (median, microseconds)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        rule_score(prompt)
        times.append((time.perf_counter() - started) * 1e6)
    return statistics.median(times)


def confusion(
    rows: Sequence[dict[str, Any]], score: Callable[[str], float], threshold: float = 0.5
) -> dict[str, Any]:
    tp = fp = fn = tn = 0
    missed = []
    for row in rows:
        predicted, actual = score(row["text"]) >= threshold, bool(row["label"])
        tp += predicted and actual
        fp += predicted and not actual
        fn += actual and not predicted
        tn += not predicted and not actual
        if predicted != actual:
            missed.append({"label": row["label"], "style": row["style"], "text": row["text"][:120]})
    return {
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "fpr": fp / (fp + tn) if fp + tn else 0.0,
        "attacks": tp + fn,
        "benign": fp + tn,
        "errors": missed,
    }


def evaluate_detectors(
    record: BenchmarkRecord | None, with_classifier: bool, blind: bool = True
) -> dict[str, Any]:
    """The detectors' figures: the rules on the dev set; on the blind set (when it exists and ``blind``)
    the rules, the tiny classifier trained on the dev set, and both combined."""
    dev = load_set(DEV_SET)
    blind_rows = load_set(BLIND_SET) if blind and BLIND_SET.exists() else None
    results: dict[str, Any] = {"rules/dev": confusion(dev, lambda text: rule_score(text).score)}
    if blind_rows is not None:
        results["rules/heldout"] = confusion(blind_rows, lambda text: rule_score(text).score)
        if with_classifier:
            from kubetune_guardrails.classifier import SequenceClassifier
            from kubetune_guardrails.tiny_classifier import train_tiny_classifier

            with tempfile.TemporaryDirectory() as directory:
                path = train_tiny_classifier([r["text"] for r in dev], [r["label"] for r in dev], directory)
                probability = SequenceClassifier(str(path)).positive_probability
                results["classifier/heldout"] = confusion(blind_rows, probability)
                results["rules+classifier/heldout"] = confusion(
                    blind_rows, lambda text: 1 - (1 - rule_score(text).score) * (1 - probability(text))
                )
    target_on = "rules/heldout" if "rules/heldout" in results else "rules/dev"
    for name, figures in results.items():
        if record is None:
            break
        key = name.replace("/", "_").replace("+", "_")
        targeted = name == target_on
        record.summarize(
            f"{key}_recall",
            f"prompt injection, {name}: recall ({figures['attacks']} attacks)",
            [figures["recall"]],
            RECALL_TARGET if targeted else None,
            counted=True,
        )
        record.summarize(
            f"{key}_fpr",
            f"prompt injection, {name}: false-positive rate ({figures['benign']} benign)",
            [figures["fpr"]],
            FPR_TARGET if targeted else None,
            counted=True,
        )
        record.summarize(
            f"{key}_precision", f"prompt injection, {name}: precision", [figures["precision"]], counted=True
        )
    return results


def print_detectors(detectors: dict[str, Any]) -> None:
    print()
    print(f"{'detector / set':34} {'precision':>9} {'recall':>7} {'FPR':>6}  attacks/benign")
    for name, figures in detectors.items():
        print(
            f"{name:34} {figures['precision']:9.3f} {figures['recall']:7.3f} {figures['fpr']:6.3f}  "
            f"{figures['attacks']}/{figures['benign']}"
        )
    for name in ("rules/dev", "rules/heldout"):
        if name in detectors:
            print(f"{name}: texts the rules get wrong:")
            for error in detectors[name]["errors"]:
                kind = "missed attack" if error["label"] == 1 else "false positive"
                print(f"  {kind} [{error['style']}] {error['text']}")
    if "rules/heldout" not in detectors:
        print(f"(no blind set figures: {BLIND_SET.name} absent or skipped)")


def pii_figures() -> dict[str, Any] | None:
    """PII precision/recall per entity, when benchmarks/pii_eval.py provides ``figures()`` (issue 14, PII)."""
    try:
        import pii_eval
    except ImportError:
        return None
    figures = getattr(pii_eval, "figures", None)
    return figures() if callable(figures) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    parser.add_argument("--requests", type=int, default=150, help="requests per size, config and round")
    parser.add_argument("--no-classifier", action="store_true", help="skip training the tiny classifier")
    parser.add_argument(
        "--detectors-only",
        action="store_true",
        help="only the detectors' precision/recall/FPR, printed (no latency, no results file)",
    )
    parser.add_argument(
        "--dev-only", action="store_true", help=f"leave {BLIND_SET.name} out (for work on the rules)"
    )
    parser.add_argument("--serve-echo", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_echo:
        serve_echo(args.serve_echo)
        return 0
    if args.detectors_only:
        print_detectors(evaluate_detectors(None, not args.no_classifier, blind=not args.dev_only))
        return 0
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}")
    configs = guard_configs()
    guarded = [name for name, guards in configs.items() if guards is not None]
    record = BenchmarkRecord(
        "guardrails",
        Path(__file__),
        {
            "rounds": args.rounds,
            "requestsPerSizeConfigRound": args.requests,
            "promptChars": list(SIZES),
            "gateways": list(configs),
            "classifier": not args.no_classifier,
            "devSet": DEV_SET.name,
            "blindSet": BLIND_SET.name if BLIND_SET.exists() and not args.dev_only else None,
        },
        argv,
    )
    record.extra["gatewayGuardrails"] = configs
    pipelines = {name: GuardPipeline.build(Guardrails.model_validate(configs[name])) for name in guarded}
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        try:
            stub_port = free_port()
            stub = subprocess.Popen([sys.executable, __file__, "--serve-echo", str(stub_port)])
            processes.append(stub)
            stub_url = f"http://127.0.0.1:{stub_port}"
            wait_until_up(stub_url, stub, "echo model server")
            urls = {}
            for name, guards in configs.items():
                process, urls[name] = start_gateway(tmp, name, gateway_config(stub_url, guards))
                processes.append(process)
            names = list(configs)
            with httpx.Client(trust_env=False, timeout=30) as client:
                for size in SIZES:  # warm each: connections, caches, the first request's imports
                    p50_ms(client, urls, names, prompt_of(size), 20)
                for round_index in range(args.rounds):
                    figures: dict[str, Any] = {}
                    order = names[round_index % len(names) :] + names[: round_index % len(names)]
                    for size in SIZES:
                        prompt = prompt_of(size)
                        p50 = p50_ms(client, urls, order, prompt, args.requests)
                        line = [f"{size} chars: off {p50['off']:.2f} ms"]
                        for name in guarded:
                            figures[f"p50_{name}_ms_{size}"] = p50[name]
                            figures[f"added_p50_ms_{name}_{size}"] = p50[name] - p50["off"]
                            cpu = figures[f"guards_cpu_ms_{name}_{size}"] = pipeline_cpu_ms(
                                pipelines[name], prompt
                            )
                            line.append(
                                f"{name} {p50[name]:.2f} ms (added {p50[name] - p50['off']:+.2f}, "
                                f"own CPU {cpu:.2f})"
                            )
                        figures[f"p50_off_ms_{size}"] = p50["off"]
                        rules_us = figures[f"injection_rules_us_{size}"] = rules_time_us(prompt)
                        line.append(f"injection rules alone {rules_us:.0f} us")
                        print(f"round {round_index + 1}: " + ", ".join(line), flush=True)
                    record.add_round(figures)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=30)
    for name in guarded:
        for size in SIZES:
            print(
                record.summarize(
                    f"added_p50_ms_{name}_{size}",
                    f"p50 latency the {name} guards add at {size}-char prompts (ms)",
                    [r[f"added_p50_ms_{name}_{size}"] for r in record.rounds],
                    ADDED_P50_TARGET if size == 2000 else None,
                ).line()
            )
            print(
                record.summarize(
                    f"guards_cpu_ms_{name}_{size}",
                    f"the {name} guards' own time per request at {size} chars, in-process (ms)",
                    [r[f"guards_cpu_ms_{name}_{size}"] for r in record.rounds],
                ).line()
            )
    for size in SIZES:
        print(
            record.summarize(
                f"injection_rules_us_{size}",
                f"the prompt-injection rules' own time per {size}-char text, in-process (us)",
                [r[f"injection_rules_us_{size}"] for r in record.rounds],
                RULES_TIME_TARGET if size == 2000 else None,
            ).line()
        )
    detectors = evaluate_detectors(record, with_classifier=not args.no_classifier, blind=not args.dev_only)
    record.extra["detectors"] = {"promptInjection": detectors, "pii": pii_figures()}
    print_detectors(detectors)
    print(f"wrote {record.write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
