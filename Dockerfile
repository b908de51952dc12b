# syntax=docker/dockerfile:1
# Two images from one file (docker cannot build on the project's CI machines; see deploy/README.md):
#   docker build --target api    -t saliency-audit-api .     # slim: Flask, SQLAlchemy, onnx; no torch
#   docker build --target worker -t saliency-audit-worker .  # CUDA runtime + the CUDA build of torch
# PYTHON_IMAGE: any Debian-like image with python3.11 and its venv module; deploy/build-local.sh
# passes one made offline with debootstrap, for machines that cannot pull from a registry.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS source
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
# the import names (saliency_audit.service, ...): links to the three folders above
COPY saliency_audit ./saliency_audit

# ---- the HTTP API, the reconciler and the migrations job: never imports torch -----------------
FROM ${PYTHON_IMAGE} AS api
# a venv first on PATH: the same pip, python and console scripts whether the base is the official
# python image or Debian's python3 (which has no pip and refuses system-wide installs)
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY --from=source /app /app
RUN python3 -m venv /opt/venv \
    && pip install '.[api]' 'gunicorn>=23' \
    && useradd --uid 10001 --create-home app \
    && mkdir -p /data/artifacts && chown -R app /data
USER 10001
ENV SALIENCY_AUDIT_ARTIFACT_DIR=/data/artifacts
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
# gunicorn workers fork after the app factory runs in each: no state is shared across them
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "4", "--threads", "8", \
     "--timeout", "600", "--graceful-timeout", "30", "saliency_audit.service.app:create_app()"]

# ---- the audit workers (GPU queue) and the report workers (CPU queue) ------------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 AS worker
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libgl1 \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
WORKDIR /app
COPY --from=source /app /app
# torch==2.14.1 from PyPI is the CUDA build on Linux x86_64
RUN pip install '.[api,worker,timm]' \
    && useradd --uid 10001 --create-home app \
    && mkdir -p /data/artifacts && chown -R app /data
USER 10001
ENV SALIENCY_AUDIT_ARTIFACT_DIR=/data/artifacts
# one prefork child per GPU process: the time limits need a child, and CUDA starts in it
CMD ["celery", "-A", "saliency_audit.workers", "worker", "-Q", "gpu", "--pool", "prefork", "--concurrency", "1", \
     "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
