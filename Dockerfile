# Worker image for the audit engine and the service (CPU build; the CUDA worker and the slim API
# targets come with the deploy work, issue 7). Build: docker build -t saliency-audit .
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
RUN pip install '.[api,worker]'
ENTRYPOINT ["saliency-audit"]
