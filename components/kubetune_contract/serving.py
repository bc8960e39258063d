"""What a model server is told and how its Bento is labelled: read by the serving runtime, set by the
operator's Deployments and by local mode's bentoml processes."""

from __future__ import annotations

MODEL_DIR_ENV = "KUBETUNE_MODEL_DIR"
DEPLOYMENT_ENV = "KUBETUNE_DEPLOYMENT"
VERSION_ENV = "KUBETUNE_VERSION"
MODEL_ID_ENV = "KUBETUNE_MODEL_ID"
MAX_PROMPT_TOKENS_ENV = "KUBETUNE_MAX_PROMPT_TOKENS"
CONTEXT_OVERFLOW_ENV = "KUBETUNE_CONTEXT_OVERFLOW"
MAX_BATCH_SIZE_ENV = "KUBETUNE_MAX_BATCH_SIZE"
MAX_LATENCY_MS_ENV = "KUBETUNE_MAX_LATENCY_MS"
ADAPTERS_ENV = "KUBETUNE_ADAPTERS"
"""A shared adapter server's versions: a JSON object of version name -> adapter directory."""
ADAPTERS_PATH = "/adapters"
"""Where a shared adapter server answers each version: ``<server>/adapters/<version>/v1/...``."""
ADAPTERS_FILE_ENV = "KUBETUNE_ADAPTERS_FILE"
"""Instead of ADAPTERS_ENV on a cluster: a file holding that JSON object (a mounted ConfigMap), which the
server watches, loading and unloading versions as it changes, without a restart."""

VLLM_OPTIONS_ENV = "KUBETUNE_VLLM_OPTIONS"
"""The vLLM engine's arguments for a version's server: spec.serving.vllm as JSON (wire names)."""

MODEL_ALIAS = "kubetune-model"
"""Alias under which a kubetune Bento references its model (`bentoml.models.get(MODEL_ALIAS)`)."""
DEPLOYMENT_LABEL = "kubetune-deployment"
VERSION_LABEL = "kubetune-version"

# How the model-building init container of a version's pod tells the operator that the model cannot be
# served (the path holds no model, its URI or configuration cannot be read): retrying cannot help.
MODEL_INVALID_EXIT_CODE = 65
"""Its exit status then (sysexits' EX_DATAERR). Any other failure (a download that broke) exits 1 and is
retried with the kubelet's back-off; this one makes the operator mark the version ModelInvalid at once."""
TERMINATION_LOG_ENV = "KUBETUNE_TERMINATION_LOG"
TERMINATION_LOG = "/dev/termination-log"
"""Where it writes ``<Reason>: <message>`` before it exits (Kubernetes' default terminationMessagePath,
so the message shows in the pod's status); TERMINATION_LOG_ENV overrides the path."""
