"""Outages of the servers the service depends on, against the real ones: Redis loses every
queued message, PostgreSQL restarts under a running audit. Nothing may be lost."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis
import requests

from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.service.jobs import Enqueuer, broker_probe, reconcile
from tests.reliability.test_worker_loss import (
    SLOW_METHODS,
    audit_row,
    reconcile_until_final,
    submit,
    wait_for,
)
from tests.servers import Api, Server, Worker, assert_problem, new_key


def test_audits_queued_when_redis_is_flushed_are_requeued_and_all_complete(
    pg_config: Config,
    pg_server: Server,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
) -> None:
    api = Api(pg_server.url, new_key(pg_database))
    audits = [submit(api, ["gradient"], images=2) for _ in range(5)]
    client = redis.Redis.from_url(pg_config.resolved_broker_url)
    assert client.llen(pg_config.queue) == 5
    client.flushdb()
    assert client.llen(pg_config.queue) == 0
    time.sleep(pg_config.requeue_after_s + 0.2)
    report = reconcile(pg_database, Enqueuer(pg_config), broker_probe(pg_config)).to_dict()
    assert sorted(report["requeued_lost_messages"]) == sorted(audits)
    worker_factory(pg_config)
    for audit_id in audits:
        final = api.wait(audit_id)
        assert final["state"] == "succeeded" and final["attempts"] == 1


def _postgres(action: str) -> None:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_a_postgres_restart_mid_run_gives_503s_then_everything_completes(
    pg_config: Config,
    pg_server: Server,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
) -> None:
    api = Api(pg_server.url, new_key(pg_database))
    worker_factory(pg_config)
    audit_id = submit(api, SLOW_METHODS, images=16)
    wait_for(lambda: audit_row(pg_database, audit_id).state == "running", 120, "the audit to run")
    _postgres("stop")
    try:
        response = api.get(f"/v1/audits/{audit_id}")
        assert_problem(response, 503)
        assert response.headers["Retry-After"]
        assert_problem(requests.get(pg_server.url + "/readyz", timeout=10), 503, "not_ready")
        # the process itself is alive
        assert requests.get(pg_server.url + "/healthz", timeout=10).status_code == 200
        time.sleep(2 * pg_config.heartbeat_interval_s)
    finally:
        _postgres("start")
    pg_database.engine.dispose()
    wait_for(
        lambda: requests.get(pg_server.url + "/readyz", timeout=10).status_code == 200,
        60,
        "the API to be ready again",
    )
    # the attempt that lost its database may fail to finish; the reconciler retries it
    reconcile_until_final(pg_config, pg_database, audit_id, 300)
    final = api.get(f"/v1/audits/{audit_id}").json()
    assert final["state"] == "succeeded", final
    report = api.get(f"/v1/audits/{audit_id}/report.json").json()
    results = api.get(f"/v1/audits/{audit_id}/results").json()["items"]
    assert len(results) == len(report["tests"]["cascading"]["scores"])
