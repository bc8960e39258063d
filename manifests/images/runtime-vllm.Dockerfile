# kubetune vLLM serving image (KUBETUNE_VLLM_SERVING_IMAGE): the versions of a ModelDeployment with
# spec.serving.engine vllm. Their pods build the version's Bento with `bento build --engine vllm` (init
# container) and serve it: kubetune_components.serving.vllm_service, vLLM's OpenAI server inside a
# BentoML service. NOT BUILT OR RUN YET: no GPU machine or registry was available where it was written.
#
# Build from the repository root:
#   docker build -f manifests/images/runtime-vllm.Dockerfile -t ghcr.io/kubetune/runtime-vllm:0.1.0 .
#
# vLLM and the CUDA torch it is built against come from vLLM's own image (pinned by tag; pin it by digest
# for releases: docker buildx imagetools inspect vllm/vllm-openai:v0.11.0). kubetune goes in without its
# dependencies, so that image's torch and transformers stay as vLLM wants them; only what the serving
# code needs besides them is added, at the versions of requirements/constraints.txt.

FROM vllm/vllm-openai:v0.11.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m pip install bentoml==1.4.40 peft==0.21.2 fsspec==2026.9.0
COPY pyproject.toml README.md /src/
COPY operator /src/operator
COPY components /src/components
RUN python3 -m pip install --no-deps /src
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    BENTOML_HOME=/tmp/bentoml \
    VLLM_CACHE_ROOT=/tmp/vllm \
    VLLM_NO_USAGE_STATS=1 \
    KUBETUNE_PVC_ROOT=/mnt/pvc
USER 65532:65532
EXPOSE 3000
ENTRYPOINT ["python3", "-m", "bentoml", "serve", "kubetune_components.serving.vllm_service:VLLMService"]
CMD ["--host", "0.0.0.0", "--port", "3000"]
