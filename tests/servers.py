"""Fixtures of the service, reliability and security tests: real PostgreSQL, real Redis,
real API and worker processes.

Each test session gets its own Postgres database (created on the server at 127.0.0.1:5432 and
dropped afterwards) and its own Redis database number and queue name, so runs never see each
other's rows or messages. A server that cannot be reached fails the test with the reason; it
is never skipped (``make test`` starts both servers when they are down).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from saliency_audit.service import db as service_db
from saliency_audit.service.auth import create_key
from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.service.embedded import config_environment, start_worker, stop_worker

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "examples" / "reference"
PG_ADMIN_URL = os.environ.get("SALIENCY_AUDIT_TEST_PG", "postgresql://127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SALIENCY_AUDIT_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = 11


def _admin_connect() -> Any:
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({exc}); the service tests need "
            "it (run `make test`, which starts it, or tests/start_services.sh)"
        )


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database for this test session, dropped at the end."""
    name = f"sa_test_{os.getpid()}_{secrets.token_hex(3)}"
    with _admin_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    with _admin_connect() as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    url = f"{REDIS_URL}/{REDIS_DB}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL} ({exc}); the service tests need it (run "
            "`make test`, which starts it, or tests/start_services.sh)"
        )
    return url


def fast_lifecycle(**overrides: Any) -> dict[str, Any]:
    """Timings short enough for tests to see a dead worker within seconds."""
    values: dict[str, Any] = {
        "heartbeat_interval_s": 0.5,
        "heartbeat_stale_s": 3.0,
        "requeue_after_s": 1.0,
        "reconcile_interval_s": 1.0,
        "reconcile_in_api": False,
        "webhook_backoff_s": 0.2,
        "webhook_allow_private": True,
        # a worker stopped at the end of a test hands its audit back within seconds
        "drain_grace_s": 2.0,
    }
    values.update(overrides)
    return values


@pytest.fixture(scope="session")
def pg_config(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The production shape: Postgres, Redis, a queue of this session's own."""
    config = Config(
        data_dir=tmp_path_factory.mktemp("pg-service"),
        database_url=pg_url,
        broker_url=redis_url,
        queue=f"gpu-test-{secrets.token_hex(3)}",
        cpu_queue=f"cpu-test-{secrets.token_hex(3)}",
        **fast_lifecycle(),
    )
    service_db.upgrade(config.resolved_database_url)
    return config


@pytest.fixture(scope="session")
def pg_database(pg_config: Config) -> Iterator[Database]:
    database = Database.from_config(pg_config)
    yield database
    database.dispose()


def new_key(database: Database, tenant: str | None = None) -> str:
    with database.session() as session:
        key, _ = create_key(session, tenant or f"tenant-{secrets.token_hex(4)}")
    return key


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    """A real ``saliency-audit serve`` process and its base URL."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_server(config: Config, *extra: str, timeout_s: float = 60.0) -> Server:
    port = free_port()
    log = config.data_dir / f"server-{port}.log"
    config.data_dir.mkdir(parents=True, exist_ok=True)
    env = config_environment(config)
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "saliency_audit.service.cli",
                "serve",
                "--port",
                str(port),
                *extra,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{server.log_text()}")
        try:
            if requests.get(server.url + "/healthz", timeout=1).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    server.stop()
    pytest.fail(f"the server did not start within {timeout_s} s:\n{server.log_text()}")


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        stop_worker(self.process)

    def kill(self) -> None:
        """kill -9 of the whole worker: the parent and its pool child."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def launch_worker(config: Config, timeout_s: float = 90.0) -> Worker:
    """A real ``celery -A saliency_audit.workers worker -Q <queue>`` process, once it reports
    ready."""
    log = config.data_dir / f"worker-{secrets.token_hex(3)}.log"
    process = start_worker(config, log)
    worker = Worker(process, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the worker exited with {process.returncode}:\n{worker.log_text()}")
        if " ready." in worker.log_text():
            return worker
        time.sleep(0.2)
    worker.stop()
    pytest.fail(f"the worker was not ready within {timeout_s} s:\n{worker.log_text()}")


@pytest.fixture
def worker_factory() -> Iterator[Callable[[Config], Worker]]:
    started: list[Worker] = []

    def make(config: Config) -> Worker:
        worker = launch_worker(config)
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def pg_server(pg_config: Config) -> Iterator[Server]:
    server = start_server(pg_config, "--no-worker")
    yield server
    server.stop()
    end_unfinished_audits(pg_config)


def end_unfinished_audits(config: Config) -> None:
    """Cancel what a test module left queued or running on the session's shared queues, and
    drop the messages still waiting there (model inspections of uploads no worker has taken:
    each times the model's passes, about a second for the sample models), so the next
    module's workers (which claim the fairest queued audit, whatever message woke them) start
    on an empty queue and its timings are its own."""
    from sqlalchemy import update

    from saliency_audit.service.models import Audit, utcnow

    database = Database.from_config(config)
    try:
        with database.session() as session:
            session.execute(
                update(Audit)
                .where(Audit.state.in_(("queued", "running")))
                .values(state="canceled", finished_at=utcnow(), step="canceled by the tests")
            )
    finally:
        database.dispose()
    if config.broker_url and config.broker_url.startswith("redis"):
        from kombu import Connection

        with Connection(config.broker_url) as connection:
            channel = connection.default_channel
            for queue in (config.queue, config.cpu_queue):
                channel.queue_purge(queue)


class Api:
    """requests against a running server with one tenant's key."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"

    def __getattr__(self, method: str) -> Callable[..., requests.Response]:
        def call(path: str, **kwargs: Any) -> requests.Response:
            kwargs.setdefault("timeout", 60)
            return self.http.request(method.upper(), self.url + path, **kwargs)

        return call

    def upload_model(self, path: Path, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        files: dict[str, Any] = {"file": (path.name, path.read_bytes())}
        if metadata:
            import json

            files["metadata"] = (None, json.dumps(metadata), "application/json")
        response = self.post("/v1/models", files=files)
        assert response.status_code in (200, 201), response.text
        result: dict[str, Any] = response.json()
        return result

    def upload_dataset(
        self, data: bytes, filename: str = "images.zip", metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        files: dict[str, Any] = {"file": (filename, data)}
        if metadata:
            import json

            files["metadata"] = (None, json.dumps(metadata), "application/json")
        response = self.post("/v1/datasets", files=files)
        assert response.status_code in (200, 201), response.text
        result: dict[str, Any] = response.json()
        return result

    def wait(self, audit_id: str, timeout_s: float = 240.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            body: dict[str, Any] = self.get(f"/v1/audits/{audit_id}").json()
            if body["state"] in ("succeeded", "failed", "canceled"):
                return body
            time.sleep(0.3)
        raise AssertionError(f"audit {audit_id} did not finish in {timeout_s} s: {body}")


def assert_problem(response: requests.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["Content-Type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == status and body["title"] and "detail" in body
    if code is not None:
        assert body["code"] == code, body
