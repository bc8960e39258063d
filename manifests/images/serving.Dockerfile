# kubetune serving runtime image: one BentoML service per ModelDeployment version, serving an
# OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models) and BentoML's /metrics.
#
# Build from the repository root:
#   docker build -f manifests/images/serving.Dockerfile -t ghcr.io/kubetune/serving:0.1.0 .
#
# The base image is pinned by version tag. To pin it by digest too (recommended for releases), resolve
# the tag once and append the digest to both FROM lines, e.g.
#   docker buildx imagetools inspect python:3.11.11-slim-bookworm   # prints "Digest: sha256:..."
#   FROM python:3.11.11-slim-bookworm@sha256:<digest> AS build
#
# The model is not baked in: KUBETUNE_MODEL_DIR points at a published model directory (a PVC or a
# downloaded artifact), KUBETUNE_DEPLOYMENT/KUBETUNE_VERSION label its metrics.

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and pinned, from the CPU index: a bare torch requirement pulls a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY requirements/constraints.txt /src/requirements/constraints.txt
COPY pyproject.toml README.md /src/
COPY operator /src/operator
COPY components /src/components
RUN pip install --constraint /src/requirements/constraints.txt /src

FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.title="kubetune-serving" \
      org.opencontainers.image.description="kubetune BentoML serving runtime for fine-tuned and quantized LLMs" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    BENTOML_HOME=/tmp/bentoml \
    KUBETUNE_PVC_ROOT=/mnt/pvc
USER 65532:65532
EXPOSE 3000
ENTRYPOINT ["bentoml", "serve", "kubetune_components.serving.service:LLMService"]
CMD ["--host", "0.0.0.0", "--port", "3000"]
