"""Suite-wide settings: deterministic torch and a cache folder for slow-to-make artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# real PostgreSQL, Redis, API and worker processes for the service, reliability and security
# tests (fixtures are created only when a test asks for them)
pytest_plugins = ["tests.servers"]

CACHE_DIR = Path(__file__).parent / ".cache"


@pytest.fixture(scope="session")
def artifact_cache() -> Path:
    """A folder (ignored by git) for ONNX exports and other files several tests reuse."""
    CACHE_DIR.mkdir(exist_ok=True)
    return CACHE_DIR


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
