"""Serving one version of a ModelDeployment: an OpenAI-compatible BentoML service and its Bento.

- `runtime`: `ModelRuntime`, a published model (adapter, merged, full or quantized) loaded for
  generation: prompts, context window, sampling, streaming, micro-batching;
- `openai_api`: the Starlette app with /v1/completions, /v1/chat/completions and /v1/models;
- `batching`: the adaptive micro-batcher of non-streaming requests;
- `metrics`: the kubetune_serving_* Prometheus series;
- `service`: `LLMService`, the `@bentoml.service` mounting the app
  (`bentoml serve kubetune_components.serving.service:LLMService`);
- `bento`: `build_bento`, `export_bento`, `import_bento` (a Bento per version: code plus model).

Settings come from the environment: see `config`.
"""
