"""The OpenAI-compatible gateway in front of a ModelDeployment's versions.

It splits traffic between versions by weight with sticky assignment (``routing``), applies the
deployment's generation defaults, limits and per-version prompts (``generation``, ``prompts``),
caches deterministic answers (``cache``), falls back to a safe version when one fails, records
feedback and per-version experiment statistics (``experiments``) and exports the Prometheus series
that rollout analysis reads (``metrics``). Its config is a JSON file it reloads on change
(``config``), so a rollout moves weights without a restart. Requests are validated with the OpenAI
models of ``kubetune_contract.openai``, the ones the model server uses.

The app (``app``: routes and per-process state) is built from ``upstream`` (the pooled client to
the versions, the bounded waits and the retry on the fallback), ``health`` (which versions may take
requests now), ``relay`` (streams passed on event by event),
``feedback`` (response ids signed with the version that answered, so any replica takes feedback),
``responses`` (headers, JSON and OpenAI-format errors) and ``access`` (API keys and scopes, rate
limits and token/cost budgets in Redis or in process, usage metrics, the hash-chained audit log).

Why a plain ASGI app (Starlette on uvicorn, aiohttp upstream) and not a BentoML service: the gateway
runs no model, and a BentoML service is built around a model runner (workers, adaptive batching, a
bento to build) that a thin proxy would never use. A single process with one event loop and one
pooled HTTP client keeps the added latency per request lowest (no extra worker hop or serialization
between API server and runner), starts in well under a second and is easy to run next to local
serving processes. The versions behind it are the BentoML services.

Entry points: ``kubetune.gateway.app.create_app(config_source)`` (the ASGI app) and
``kubetune.gateway.__main__.serve(config_path, host, port)`` (run it with uvicorn). This module
imports nothing, so the operator can use ``kubetune.gateway.config`` without the web stack.
"""
