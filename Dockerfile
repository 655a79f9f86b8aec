# vitserve. Build (Docker, or Podman with --format docker so HEALTHCHECK is kept):
#   podman build --format docker -t localhost/vitserve:latest .
# The default base's torch matches the project's pin (torch 2.14.1, CUDA 13.0); the install
# step below is the README's, so a base without it (a plain Debian with python3-venv, as
# deploy/image/smoke.py builds in CI) still ends up with the pinned wheels.
ARG BASE_IMAGE=docker.io/pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# Where pip finds packages during the build: a mirror, more indexes, a proxy's CA bundle
# (mounted into the build, e.g. podman build -v /etc/ssl/certs/ca-certificates.crt:/run/ca.crt:ro
# --build-arg PIP_CERT=/run/ca.crt). Empty extra index and certificate: pip's own.
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_CERT=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    VITSERVE_HOST=0.0.0.0 \
    VITSERVE_PORT=8000 \
    VITSERVE_STORE_DIR=/srv/vitserve/model_store \
    HF_HOME=/srv/vitserve/hf-cache

RUN groupadd --system --gid 10001 vitserve \
    && useradd --system --uid 10001 --gid vitserve --home-dir /srv/vitserve --create-home \
       --shell /usr/sbin/nologin vitserve

# A venv, not the system's site-packages: Debian-based Pythons refuse system-wide pip
# installs (PEP 668). It sees the base's packages, so a base's own torch is reused.
RUN python3 -m venv --system-site-packages /opt/venv

WORKDIR /opt/vitserve

# The pinned torch first, in its own layer: code changes do not reinstall it.
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY app ./app
# The `gpu` extra adds nvidia-ml-py, for the GPU utilisation metrics.
RUN pip install --no-cache-dir -e '.[gpu]'

# Manifests only (weights are not in git): the default model's weights are pulled into the
# volume at first start, and stay there across restarts.
COPY --chown=vitserve:vitserve model_store /srv/vitserve/model_store
VOLUME ["/srv/vitserve/model_store"]

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["vitserve", "serve"]
