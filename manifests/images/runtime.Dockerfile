# kubetune pipeline runtime image: every step of kubetune's Kubeflow pipelines runs in it
# (KUBETUNE_RUNTIME_IMAGE; the components are compiled with base_image=ghcr.io/kubetune/runtime:<version>).
#
# Build from the repository root:
#   docker build -f manifests/images/runtime.Dockerfile -t ghcr.io/kubetune/runtime:0.1.0 .
#
# The base image is pinned by version tag. To pin it by digest too (recommended for releases), resolve
# the tag once and append the digest to both FROM lines, e.g.
#   docker buildx imagetools inspect python:3.11.11-slim-bookworm   # prints "Digest: sha256:..."
#   FROM python:3.11.11-slim-bookworm@sha256:<digest> AS build
#
# Kubeflow Pipelines starts each step with its own command (sh, then python3 -m kfp.dsl.executor_main),
# so the image only has to put the environment's python3 first on PATH. For a GPU runtime, install a
# CUDA build of torch==2.13.0 instead of the CPU one.

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
LABEL org.opencontainers.image.title="kubetune-runtime" \
      org.opencontainers.image.description="kubetune pipeline steps: curate, fine-tune, evaluate, quantize, publish" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
# Workspaces are mounted from PVCs at /mnt/pvc/<claim> (KUBETUNE_PVC_ROOT); caches go to /tmp.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    KUBETUNE_PVC_ROOT=/mnt/pvc
USER 65532:65532
CMD ["python3"]
