"""Graceful shutdown against real PostgreSQL, Redis and worker processes: SIGTERM drains a worker
(no new messages; the running audit finishes within ``drain_grace_s`` or is handed back, its
attempt not counted), and ``saliency-audit serve`` drains its embedded worker and exits 0.

Before the drain, SIGTERM killed the running audit and each restart burned an attempt: with
``max_attempts=1`` one restart failed the audit with ``attempts_exhausted``."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.service.models import utcnow
from tests.reliability.test_worker_loss import audit_row, count_rows, submit, wait_for
from tests.servers import Api, Server, Worker, fast_lifecycle, new_key, start_server

# long enough (a few seconds on a CPU) for a SIGTERM to arrive while it runs
LONG_METHODS = ["gradient", "smoothgrad", "integrated_gradients"]
# long enough to outlast a 1 s drain grace on an idle machine too (with 4 images the audit
# sometimes finished within the grace in a full CI run)
LONGER_IMAGES = 32


def sigterm(worker: Worker, timeout_s: float) -> int:
    """SIGTERM to the worker's main process, as Kubernetes and docker stop send it; its exit
    code."""
    worker.process.send_signal(signal.SIGTERM)
    return worker.process.wait(timeout=timeout_s)


def running(database: Database, audit_id: str) -> bool:
    row = audit_row(database, audit_id)
    return row.state == "running" and row.progress > 0.02


def test_sigterm_lets_a_short_running_audit_finish_and_the_worker_exits_0(
    pg_config: Config,
    pg_server: Server,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
) -> None:
    api = Api(pg_server.url, new_key(pg_database))
    worker = worker_factory(pg_config.with_overrides(drain_grace_s=60.0))
    # 32 images: about 4 s here (4 images took 0.6 s, so the 0.2 s poll could miss it running)
    audit_id = submit(api, LONG_METHODS, images=LONGER_IMAGES)
    wait_for(lambda: running(pg_database, audit_id), 60, "the audit to run")
    signaled_at = utcnow()
    assert sigterm(worker, timeout_s=60) == 0, worker.log_text()[-3000:]
    row = audit_row(pg_database, audit_id)
    assert row.state == "succeeded", (row.state, row.step, row.error)
    assert row.attempts == 1
    assert row.finished_at is not None and row.finished_at > signaled_at  # it ran on, drained
    assert "Warm shutdown" in worker.log_text()


def test_an_audit_past_the_drain_grace_is_handed_back_without_counting_the_attempt(
    pg_config: Config,
    pg_server: Server,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
) -> None:
    # one attempt only: a restart that counted as a lost attempt would fail the audit
    config = pg_config.with_overrides(max_attempts=1)
    api = Api(pg_server.url, new_key(pg_database))
    first = worker_factory(config.with_overrides(drain_grace_s=1.0))
    audit_id = submit(api, LONG_METHODS, images=LONGER_IMAGES)
    wait_for(lambda: running(pg_database, audit_id), 60, "the audit to run")
    assert sigterm(first, timeout_s=30) == 0, first.log_text()[-3000:]
    row = audit_row(pg_database, audit_id)
    assert row.state == "queued", (row.state, row.step, row.error)
    assert row.attempts == 0 and row.error is None
    assert row.step is not None and row.step.startswith("handed_back")
    assert count_rows(pg_database, audit_id) == (0, 0)
    # the worker sent the audit's task again: a second worker takes it with no reconciler
    worker_factory(config)
    final = api.wait(audit_id, timeout_s=120)
    assert final["state"] == "succeeded", final
    assert final["attempts"] == 1


def test_serve_sigterm_drains_its_worker_exits_0_and_loses_no_audit(tmp_path: Path) -> None:
    """Embedded ``serve`` (SQLite, no broker server): SIGTERM while one audit runs and one
    waits; both survive the restart and complete, each on its first counted attempt."""
    # the API's reconciler runs, with a stale limit no busy CI machine reaches by accident
    lifecycle = fast_lifecycle(reconcile_in_api=True, heartbeat_stale_s=30.0, drain_grace_s=1.0)
    config = Config(data_dir=tmp_path / "data", **lifecycle)
    server = start_server(config)
    try:
        database = Database.from_config(config)
        api = Api(server.url, new_key(database))
        first = submit(api, LONG_METHODS, images=LONGER_IMAGES)
        second = submit(api, ["gradient"], images=4)
        wait_for(lambda: running(database, first), 90, "the first audit to run")
        assert api.get("/healthz").status_code == 200  # a kept-alive connection does not block
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=40) == 0, server.log_text()[-3000:]
        assert time.monotonic() - started < 30
        handed = audit_row(database, first)
        assert (handed.state, handed.attempts) == ("queued", 0), (handed.state, handed.step)
        assert audit_row(database, second).state == "queued"
    finally:
        server.stop()
    server = start_server(config)  # the same data folder: the same audits and queue
    try:
        api.url = server.url
        for audit_id in (first, second):
            final = api.wait(audit_id, timeout_s=120)
            assert (final["state"], final["attempts"]) == ("succeeded", 1), final
    finally:
        server.stop()
        database.dispose()


def test_a_draining_worker_hands_its_part_of_a_split_audit_back(
    pg_config: Config,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
    tmp_path: Path,
) -> None:
    """Two workers share a split audit; SIGTERM to the one computing a part it does not own
    puts that part back in the queue (not done, not left running) and the audit's own worker
    completes the audit on its first attempt."""
    from tests.service.test_end_to_end import DIGITS_MODEL, digits_zip
    from tests.service.test_scale_out import METHODS, parts_of, split_config

    split = split_config(pg_config, tmp_path / "split").with_overrides(drain_grace_s=1.0)
    server = start_server(split, "--no-worker")
    try:
        workers = [worker_factory(split), worker_factory(split)]
        api = Api(server.url, new_key(pg_database))
        model, dataset = api.upload_model(DIGITS_MODEL), api.upload_dataset(digits_zip(8))
        # the upload's inspection (which times the model's passes) runs on one of the two
        # workers: wait for it, so that both are free when the audit's parts are queued
        wait_for(
            lambda: "pass_prices" in api.get(f"/v1/models/{model['id']}").json()["details"],
            90,
            "the model's inspection",
        )
        response = api.post(
            "/v1/audits",
            json={
                "model_id": model["id"],
                "dataset_id": dataset["id"],
                "methods": METHODS,
                "tests": ["cascading"],
                "params": {"noise_samples": 8, "ig_steps": 16},
            },
        )
        audit_id = response.json()["id"]

        def helper_part() -> tuple[int, str] | None:
            owner = audit_row(pg_database, audit_id).worker
            for part in parts_of(pg_database, audit_id):
                if part.state == "running" and part.worker and part.worker != owner:
                    return part.part_index, part.worker
            return None

        index, helper_id = wait_for(helper_part, 90, "a second worker to compute a part")
        child = int(helper_id.rpartition(":")[2])
        (helper,) = [w for w in workers if f"PPid:\t{w.process.pid}\n" in proc_status(child)]
        assert sigterm(helper, timeout_s=30) == 0, helper.log_text()[-3000:]
        part = parts_of(pg_database, audit_id)[index]
        assert part.worker != helper_id or part.state == "queued", (part.state, part.worker)
        final = api.wait(audit_id, timeout_s=120)
    finally:
        server.stop()
    assert (final["state"], final["attempts"]) == ("succeeded", 1), final
    assert parts_of(pg_database, audit_id)[index].worker != helper_id


def proc_status(pid: int) -> str:
    return Path(f"/proc/{pid}/status").read_text()
