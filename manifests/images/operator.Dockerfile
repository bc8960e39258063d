# kubetune operator image: `kubetune operator` (the Helm chart's Deployment runs it).
#
# Build from the repository root:
#   docker build -f manifests/images/operator.Dockerfile -t ghcr.io/kubetune/operator:0.1.0 .
#
# The base image is pinned by version tag. To pin it by digest too (recommended for releases), resolve
# the tag once and append the digest to both FROM lines, e.g.
#   docker buildx imagetools inspect python:3.11.11-slim-bookworm   # prints "Digest: sha256:..."
#   FROM python:3.11.11-slim-bookworm@sha256:<digest> AS build
#
# The operator also runs pipelines itself with the local executor (kfp's local runner in the pod), so it
# carries the same Python environment as the pipeline runtime: torch (CPU build) and kubetune_components.

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
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="kubetune Kopf operator (FineTuneJob, QuantizeJob, ModelDeployment)" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    KUBETUNE_HOME=/var/lib/kubetune
# The chart runs the pod as 65532 with a read-only root filesystem; KUBETUNE_HOME and /tmp are volumes.
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["kubetune"]
CMD ["operator"]
