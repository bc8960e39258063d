"""What kubetune's vLLM service tells vLLM and how it puts the gateway's requests to it
(`vllm_engine`, `vllm_service`), on real published models. vllm itself is not installed here: the
engine is only started on a GPU machine (benchmarks/device/vllm_check.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import bentoml
import pytest

from kubetune_components.common.errors import ConfigError
from kubetune_components.serving import vllm_engine
from kubetune_components.serving.bento import VLLM_SERVICE, bentoml_home_context, build_bento
from kubetune_components.serving.bento import main as bento_main
from kubetune_components.serving.vllm_engine import EnginePlan, LoraModule, VersionNotLoaded
from kubetune_components.serving.vllm_service import EngineFront, EngineSlot, _plan
from kubetune_contract.deployment import VllmOptions
from kubetune_contract.serving import (
    ADAPTERS_ENV,
    MODEL_INVALID_EXIT_CODE,
    TERMINATION_LOG_ENV,
    VLLM_OPTIONS_ENV,
)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def lora_copy(source: Path, target: Path, **config: Any) -> Path:
    """``source`` (an adapter) copied to ``target`` with adapter_config.json fields changed."""
    shutil.copytree(source, target)
    adapter_config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**adapter_config, **config}))
    return target


def test_a_full_model_is_loaded_as_it_is_under_the_versions_name(tiny_model_dir: Path) -> None:
    plan = _plan(tiny_model_dir, "base", {})
    options = VllmOptions(dtype="bfloat16", max_model_len=512, gpu_memory_utilization="0.5")
    args = vllm_engine.engine_cli_args(plan, options)

    assert (plan.model, plan.loras, plan.model_for(None)) == (tiny_model_dir, (), "base")
    assert args == [
        "--model",
        str(tiny_model_dir),
        "--served-model-name",
        "base",
        "--dtype",
        "bfloat16",
        "--gpu-memory-utilization",
        "0.5",
        "--max-model-len",
        "512",
    ]


def test_a_lora_version_is_served_on_its_base_with_vllms_lora_flags(
    published_adapter: Path, tiny_model_dir: Path
) -> None:
    plan = _plan(published_adapter, "tuned", {})
    args = vllm_engine.engine_cli_args(plan, VllmOptions())

    assert plan.model == tiny_model_dir  # the base the manifest names
    assert plan.loras == (LoraModule("tuned", published_adapter, 4),)
    assert plan.model_for(None) == "tuned"  # /v1 of the version's own server asks for its LoRA
    assert flag(args, "--model") == str(tiny_model_dir)
    assert "--enable-lora" in args
    assert flag(args, "--lora-modules") == f"tuned={published_adapter}"
    assert flag(args, "--max-lora-rank") == "8"  # r=4, rounded up to a rank vLLM accepts
    assert flag(args, "--max-loras") == "1"
    assert "--max-model-len" not in args  # unset: the model's own context length


def test_one_server_holds_several_lora_versions_each_by_its_name(
    published_adapter: Path, tmp_path: Path
) -> None:
    other = lora_copy(published_adapter, tmp_path / "other", r=24)
    env = {ADAPTERS_ENV: json.dumps({"tuned": str(published_adapter), "tuned-2": str(other)})}
    plan = _plan(published_adapter, "tuned", env)
    args = vllm_engine.engine_cli_args(plan, VllmOptions(max_loras=4))

    assert [lora.name for lora in plan.loras] == ["tuned", "tuned-2"]
    modules = args[args.index("--lora-modules") + 1 :]
    assert modules == [f"tuned={published_adapter}", f"tuned-2={other}"]
    assert flag(args, "--max-lora-rank") == "32"  # holds r=24
    assert flag(args, "--max-loras") == "2"  # no more than it holds
    assert (plan.model_for("tuned-2"), plan.model_for("tuned")) == ("tuned-2", "tuned")
    with pytest.raises(VersionNotLoaded, match="'gone' is not loaded on this server"):
        plan.model_for("gone")


def test_the_vllm_bento_serves_vllm_service_and_its_adapter_on_the_bundled_base(
    published_adapter: Path, tmp_path: Path
) -> None:
    """What a cluster's init container builds (``bento build --engine vllm``) and the server then plans."""
    home = tmp_path / "bentoml"
    tag = build_bento(published_adapter, "support-bot", "tuned", bentoml_home=home, engine="vllm")
    with bentoml_home_context(home):
        bento = bentoml.bentos.get(tag)
        model_dir = Path(bentoml.models.get(bento.info.models[0].tag).path)
    assert bento.info.service == VLLM_SERVICE
    assert bento.info.labels["kubetune-engine"] == "vllm"
    assert (Path(bento.path) / "src" / "kubetune_components" / "serving" / "vllm_service.py").is_file()
    assert tag != build_bento(published_adapter, "support-bot", "tuned", bentoml_home=home)  # another Bento

    plan = _plan(model_dir, "tuned", {})
    assert plan.model == model_dir / "base"
    assert plan.loras == (LoraModule("tuned", model_dir, 4),)


def test_the_vllm_bento_build_refuses_a_model_vllm_cannot_read_as_invalid(
    published_adapter: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The init container exits MODEL_INVALID_EXIT_CODE, so the operator fails the version at once."""
    quantized = tmp_path / "int8"
    quantized.mkdir()
    (quantized / "kubetune-quantization.json").write_text('{"format": "torchao-state-dict"}')
    ia3 = lora_copy(published_adapter, tmp_path / "ia3", peft_type="IA3")
    log = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(log))
    for model, said in (
        (quantized, "torchao-state-dict format, which vLLM cannot read"),
        (ia3, "IA3 adapter"),
    ):
        argv = ["--bentoml-home", str(tmp_path / "home"), "build", "--model-dir", str(model)]
        assert (
            bento_main([*argv, "--deployment", "d", "--version", "v", "--engine", "vllm"])
            == MODEL_INVALID_EXIT_CODE
        )
        assert said in capsys.readouterr().err
        assert log.read_text().startswith("InvalidConfig: ")


def test_adapters_vllm_cannot_apply_are_refused_naming_them(published_adapter: Path, tmp_path: Path) -> None:
    ia3 = lora_copy(published_adapter, tmp_path / "ia3", peft_type="IA3")
    with pytest.raises(ConfigError, match="is a IA3 adapter; vLLM serves LoRA adapters only"):
        _plan(ia3, "tuned", {})


def test_kubetunes_torchao_state_dict_is_refused_and_plain_safetensors_served(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="torchao-state-dict format, which vLLM cannot read"):
        vllm_engine.plan_engine(
            tmp_path, "int8", {}, kind="quantized", base_uri=None, quantization_format="torchao-state-dict"
        )
    plan = vllm_engine.plan_engine(
        tmp_path, "bf16", {}, kind="quantized", base_uri=None, quantization_format="hf-safetensors"
    )
    assert plan.model == tmp_path


def test_lora_versions_beside_a_model_that_is_no_adapter_are_refused(
    tiny_model_dir: Path, published_adapter: Path
) -> None:
    with pytest.raises(ConfigError, match=r"KUBETUNE_ADAPTERS names LoRA versions, but .* is no adapter"):
        _plan(tiny_model_dir, "base", {ADAPTERS_ENV: json.dumps({"tuned": str(published_adapter)})})


@pytest.mark.parametrize(("ranks", "bound"), [([1], 8), ([8], 8), ([9, 4], 16), ([512], 512)])
def test_the_lora_rank_bound_is_the_smallest_vllm_accepts(ranks: list[int], bound: int) -> None:
    assert vllm_engine.lora_rank_bound(ranks) == bound


def test_a_rank_above_vllms_largest_is_refused() -> None:
    with pytest.raises(ConfigError, match="a LoRA rank of 1024 is above vLLM's largest, 512"):
        vllm_engine.lora_rank_bound([1024])


def test_the_options_come_from_the_environment_and_a_bad_one_names_the_field() -> None:
    options = vllm_engine.options_from_env({VLLM_OPTIONS_ENV: '{"dtype": "float16", "maxLoras": 2}'})
    assert (options.dtype, options.max_loras, options.gpu_memory_utilization) == ("float16", 2, "0.9")
    assert vllm_engine.options_from_env({}) == VllmOptions()
    with pytest.raises(
        ConfigError, match=r"KUBETUNE_VLLM_OPTIONS is not valid spec\.serving\.vllm: maxModelLen"
    ):
        vllm_engine.options_from_env({VLLM_OPTIONS_ENV: '{"maxModelLen": 4}'})


@pytest.mark.parametrize(
    ("path", "routed"),
    [
        ("/v1/chat/completions", (None, "/v1/chat/completions")),
        ("/v1/completions", (None, "/v1/completions")),
        ("/v1/models", (None, "/v1/models")),
        ("/adapters/tuned-2/v1/chat/completions", ("tuned-2", "/v1/chat/completions")),
        ("/v1/embeddings", None),
        ("/adapters/tuned/v1/load_lora_adapter", None),
        ("/metrics", None),
    ],
)
def test_the_gateways_paths_map_onto_vllms(path: str, routed: tuple[str | None, str] | None) -> None:
    assert vllm_engine.route(path) == routed


def test_the_request_asks_vllm_for_the_versions_lora_and_kubetune_only_fields_are_refused() -> None:
    body = json.dumps(
        {"model": "support-bot", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    rewritten = json.loads(vllm_engine.rewrite_body(body.encode(), "tuned"))
    assert rewritten == {**json.loads(body), "model": "tuned"}
    hidden = json.dumps({"prompt": "hi", "kubetune_hidden_reasoning": {"open": "<t>", "close": "</t>"}})
    with pytest.raises(
        ConfigError, match="kubetune_hidden_reasoning: not supported by this version's engine"
    ):
        vllm_engine.rewrite_body(hidden.encode(), "tuned")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        vllm_engine.rewrite_body(b"[1]", "tuned")


# -- the front in the BentoML service, before vLLM's app (stood in for by a recording ASGI app) -----------


class RecordingApp:
    """Answers as vLLM's app would (a two-chunk stream), recording what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        self.seen.append((scope["path"], json.loads(message["body"] or b"{}")))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def call(
    front: EngineFront, method: str, path: str, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "headers": []}
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await front(scope, receive, send)
    headers = {key.decode(): value.decode() for key, value in sent[0].get("headers", [])}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


async def test_the_front_passes_each_versions_requests_to_vllm_with_its_lora_and_streams_back() -> None:
    slot, app = EngineSlot(), RecordingApp()
    slot.version = "tuned"
    front = EngineFront(slot)
    status, _, body = await call(front, "POST", "/v1/completions", b'{"prompt": "hi"}')
    assert status == 503 and b"model_not_ready" in body

    slot.plan = EnginePlan(
        Path("/base"),
        "tuned-base",
        (LoraModule("tuned", Path("/a"), 4), LoraModule("tuned-2", Path("/b"), 4)),
        default_lora="tuned",
    )
    slot.app = app
    status, headers, body = await call(
        front, "POST", "/adapters/tuned-2/v1/chat/completions", b'{"model": "x"}'
    )
    assert (status, headers["x-kubetune-version"], body) == (200, "tuned-2", b"data: 1\n\ndata: [DONE]\n\n")
    status, headers, _ = await call(front, "POST", "/v1/completions", b'{"model": "x", "prompt": "hi"}')
    assert (status, headers["x-kubetune-version"]) == (200, "tuned")
    assert app.seen == [
        ("/v1/chat/completions", {"model": "tuned-2"}),
        ("/v1/completions", {"model": "tuned", "prompt": "hi"}),
    ]

    status, _, body = await call(front, "POST", "/adapters/gone/v1/completions", b"{}")
    assert status == 404 and b"model_not_found" in body
    status, _, body = await call(front, "POST", "/v1/completions", b'{"kubetune_hidden_reasoning": {}}')
    assert status == 400 and b"kubetune_hidden_reasoning" in body
    status, _, _ = await call(front, "GET", "/v1/embeddings")
    assert status == 404
    assert len(app.seen) == 2  # nothing refused reached vLLM
