# Worker image for the audit engine (CPU build; the CUDA worker and the slim API targets come
# with the deploy work). Build: docker build -t saliency-audit .
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
RUN pip install '.[worker]'
ENTRYPOINT ["saliency-audit"]
