"""The job lifecycle against real PostgreSQL, Redis and worker processes: a lost broker message,
a worker killed mid-audit and an audit that kills every worker it runs on."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import redis

from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.service.jobs import Enqueuer, broker_probe, reconcile
from saliency_audit.service.models import Audit, ResultRow, VerdictRow
from tests.servers import Api, Server, Worker, new_key
from tests.service.test_end_to_end import DIGITS_MODEL, digits_zip

SLOW_METHODS = ["gradient", "gradcam", "smoothgrad", "integrated_gradients", "guided_backprop"]


def submit(api: Api, methods: list[str], images: int = 4) -> str:
    model = api.upload_model(DIGITS_MODEL)
    dataset = api.upload_dataset(digits_zip(images))
    response = api.post(
        "/v1/audits",
        json={
            "model_id": model["id"],
            "dataset_id": dataset["id"],
            "methods": methods,
            "tests": ["cascading"],
            # every stage, as these timings were set for: a stage plan's shorter audit could
            # finish before the worker is lost or signaled
            "stages": "all",
        },
    )
    assert response.status_code == 202, response.text
    audit_id: str = response.json()["id"]
    return audit_id


def reconcile_once(config: Config, database: Database) -> dict[str, list[str]]:
    return reconcile(database, Enqueuer(config), broker_probe(config)).to_dict()


def audit_row(database: Database, audit_id: str) -> Audit:
    with database.session() as session:
        row = session.get(Audit, audit_id)
        assert row is not None
        return row


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def reconcile_until_final(
    config: Config,
    database: Database,
    audit_id: str,
    timeout_s: float,
    each: Callable[[Audit], None] = lambda row: None,
) -> Audit:
    """Run the reconciler every 0.2 s until the audit ends (``each`` sees every running row
    first), as a reconciler process would; the final row."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = audit_row(database, audit_id)
        if row.state in ("succeeded", "failed", "canceled"):
            return row
        each(row)
        reconcile_once(config, database)
        time.sleep(0.2)
    return audit_row(database, audit_id)


def count_rows(database: Database, audit_id: str) -> tuple[int, int]:
    with database.session() as session:
        results = session.query(ResultRow).filter(ResultRow.audit_id == audit_id).count()
        verdicts = session.query(VerdictRow).filter(VerdictRow.audit_id == audit_id).count()
    return results, verdicts


def test_a_queued_audit_whose_broker_message_was_lost_completes(
    pg_config: Config,
    pg_server: Server,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
) -> None:
    api = Api(pg_server.url, new_key(pg_database))
    audit_id = submit(api, ["gradient"])  # no worker yet: the message waits in Redis
    task_id = audit_row(pg_database, audit_id).task_id
    assert task_id is not None
    has_task = broker_probe(pg_config)
    assert has_task(task_id) is True
    # the broker loses it
    redis.Redis.from_url(pg_config.resolved_broker_url).delete(pg_config.queue)
    assert has_task(task_id) is False
    time.sleep(pg_config.requeue_after_s + 0.2)
    report = reconcile_once(pg_config, pg_database)
    assert report["requeued_lost_messages"] == [audit_id]
    new_task = audit_row(pg_database, audit_id).task_id
    assert new_task != task_id and has_task(new_task) is True
    # a second pass leaves an audit whose message is in the broker alone
    assert reconcile_once(pg_config, pg_database)["requeued_lost_messages"] == []
    worker_factory(pg_config)
    final = api.wait(audit_id)
    assert final["state"] == "succeeded" and final["attempts"] == 1


def test_a_running_audit_whose_worker_died_is_retried_without_duplicated_results(
    pg_config: Config,
    pg_server: Server,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
) -> None:
    api = Api(pg_server.url, new_key(pg_database))
    first = worker_factory(pg_config)
    audit_id = submit(api, SLOW_METHODS, images=16)
    wait_for(
        lambda: (
            (row := audit_row(pg_database, audit_id)).state == "running" and row.progress > 0.05
        ),
        120,
        "the audit to be running",
    )
    first.kill()  # kill -9 of the worker and its pool child mid-audit
    assert audit_row(pg_database, audit_id).state == "running"
    # the heartbeat goes stale, the reconciler queues it again
    report = wait_for(
        lambda: (r := reconcile_once(pg_config, pg_database))["requeued_stale"] and r,
        pg_config.heartbeat_stale_s + 10,
        "the reconciler to notice the dead worker",
    )
    assert report["requeued_stale"] == [audit_id]
    worker_factory(pg_config)
    final = api.wait(audit_id, timeout_s=300)
    assert final["state"] == "succeeded", final
    assert final["attempts"] == 2
    report_json = api.get(f"/v1/audits/{audit_id}/report.json").json()
    results, verdicts = count_rows(pg_database, audit_id)
    assert results == len(report_json["tests"]["cascading"]["scores"])
    assert verdicts == len(report_json["verdicts"]) == len(SLOW_METHODS) + 2


def test_an_audit_that_kills_its_worker_every_time_stops_at_the_attempt_cap(
    pg_config: Config,
    pg_server: Server,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
) -> None:
    api = Api(pg_server.url, new_key(pg_database))
    worker_factory(pg_config)
    audit_id = submit(api, SLOW_METHODS, images=16)
    killed: list[int] = []

    def kill_each_attempt(row: Audit) -> None:
        if row.state == "running" and row.worker:
            pid = int(row.worker.rpartition(":")[2])
            if pid not in killed:
                os.kill(pid, signal.SIGKILL)  # the pool child dies mid-audit, every attempt
                killed.append(pid)

    final = reconcile_until_final(pg_config, pg_database, audit_id, 240, kill_each_attempt)
    assert final.state == "failed", (final.state, final.error)
    assert final.error is not None and final.error["code"] == "attempts_exhausted"
    assert f"{pg_config.max_attempts} attempts" in final.error["message"]
    assert final.attempts == pg_config.max_attempts == len(killed)
    assert count_rows(pg_database, audit_id) == (0, 0)
    body = api.get(f"/v1/audits/{audit_id}").json()
    assert body["state"] == "failed" and body["error"]["code"] == "attempts_exhausted"


def test_canceling_a_running_audit_stops_it(
    pg_config: Config,
    pg_server: Server,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
) -> None:
    api = Api(pg_server.url, new_key(pg_database))
    worker_factory(pg_config)
    audit_id = submit(api, SLOW_METHODS, images=16)
    wait_for(lambda: audit_row(pg_database, audit_id).state == "running", 120, "the audit to run")
    response = api.delete(f"/v1/audits/{audit_id}")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    final = api.wait(audit_id, timeout_s=60)
    assert final["state"] == "canceled"
    assert count_rows(pg_database, audit_id) == (0, 0)


def test_an_audit_past_the_soft_time_limit_fails_with_the_reason(
    pg_config: Config,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
    tmp_path: Any,
) -> None:
    from tests.servers import start_server

    strict = pg_config.with_overrides(
        data_dir=tmp_path, soft_time_limit_s=2, hard_time_limit_s=30, queue=pg_config.queue + "-t"
    )
    server = start_server(strict, "--no-worker")
    try:
        worker_factory(strict)
        api = Api(server.url, new_key(pg_database))
        # 64 images: 5.3 s of compute measured on an idle 2-core CPU (16 took 1.7 s: under it)
        audit_id = submit(api, SLOW_METHODS, images=64)
        final = api.wait(audit_id, timeout_s=120)
    finally:
        server.stop()
    assert final["state"] == "failed"
    assert final["error"]["code"] == "time_limit"
    assert "2 s" in final["error"]["message"] and final["attempts"] == 1
