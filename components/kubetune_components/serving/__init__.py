"""Serving one version of a ModelDeployment: an OpenAI-compatible BentoML service and its Bento.

- `runtime`: `ModelRuntime`, a published model loaded for generation: prompts fitted to the context
  window, generation on a thread pool, streaming, micro-batching; it is built from
  - `artifacts`: what a model directory holds (adapter, merged, full or quantized) and loading it,
  - `chat`: messages rendered the way the model was fine-tuned (instruction format or chat template),
  - `generation`: the rows of a Hugging Face `generate` call (sampling, stop sequences, limits),
  - `streams`: text deltas handed to a thread or an event loop,
  - `requests`: what a generation asks for (`SamplingParams`, `ChatMessage`) and returns (`Completion`);
- `openai_api`: the Starlette app with /v1/completions, /v1/chat/completions and /v1/models;
- `openai_requests`: requests validated with the OpenAI models of `kubetune_contract.openai` (shared
  with the gateway), plus what this server refuses;
- `batching`: the adaptive micro-batcher of non-streaming requests;
- `metrics`: the kubetune_serving_* Prometheus series;
- `service`: `LLMService`, the `@bentoml.service` mounting the app
  (`bentoml serve kubetune_components.serving.service:LLMService`);
- `bento`: `build_bento`, `export_bento`, `import_bento` (a Bento per version: code plus model).

Settings come from the environment: see `config` (the variable names are `kubetune_contract.serving`'s).
"""
