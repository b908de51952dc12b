"""Fair scheduling between tenants: a worker's message is a wake-up, and the audit it claims is
the one fairness picks. On real PostgreSQL (the claim's rows) and, end to end, with a real
worker: a tenant that submitted a backlog does not make a second tenant wait for all of it."""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select

from saliency_audit.service.artifacts import ArtifactStore
from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.service.jobs import Claim, Enqueuer, Runtime, claim_next, pick_fair
from saliency_audit.service.models import Audit, DatasetRecord, ModelRecord, Tenant, utcnow
from tests.servers import Api, Worker, new_key, start_server
from tests.service.test_end_to_end import DIGITS_MODEL, digits_zip


class RecordingBroker:
    """Stands in for the Celery app: records what would be sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, **kwargs: Any) -> None:
        self.sent.append({"name": name, **kwargs})


@pytest.fixture
def fair(pg_config: Config, tmp_path: Path) -> Iterator[tuple[Runtime, RecordingBroker]]:
    """A runtime on a queue of its own (no other test's audits are candidates)."""
    config = pg_config.with_overrides(queue=f"gpu-fair-{secrets.token_hex(3)}")
    broker = RecordingBroker()
    db = Database.from_config(config)
    yield Runtime(config, db, ArtifactStore(tmp_path / "store"), Enqueuer(config, broker)), broker
    with db.session() as session:  # the rows made here name no stored file: leave none behind
        for tenant in session.scalars(select(Tenant).where(Tenant.name.like(f"{UNIT}-%"))):
            for table in (Audit, ModelRecord, DatasetRecord):
                session.execute(delete(table).where(table.tenant_id == tenant.id))
            session.delete(tenant)
    db.dispose()


UNIT = f"fair-unit-{secrets.token_hex(3)}"


def tenant_with_inputs(db: Database) -> tuple[str, str, str]:
    with db.session() as session:
        tenant = Tenant(name=f"{UNIT}-{secrets.token_hex(4)}")
        session.add(tenant)
        session.flush()
        model = ModelRecord(
            tenant_id=tenant.id, name="m", format="onnx", sha256="0" * 64, size_bytes=1
        )
        dataset = DatasetRecord(
            tenant_id=tenant.id, name="d", sha256="1" * 64, size_bytes=1, n_images=1, manifest={}
        )
        session.add_all([model, dataset])
        session.flush()
        return tenant.id, model.id, dataset.id


def queued_audits(rt: Runtime, inputs: tuple[str, str, str], count: int) -> list[str]:
    """``count`` queued audits of one tenant, created a millisecond apart, each holding its own
    (recorded) message."""
    tenant, model, dataset = inputs
    ids = []
    with rt.db.session() as session:
        for _ in range(count):
            audit = Audit(
                tenant_id=tenant,
                model_id=model,
                dataset_id=dataset,
                spec={},
                state="queued",
                request_sha256="2" * 64,
                task_id=uuid.uuid4().hex,
                queue=rt.config.queue,
                created_at=utcnow() + timedelta(milliseconds=len(ids)),
                enqueued_at=utcnow(),
            )
            session.add(audit)
            session.flush()
            ids.append(audit.id)
    return ids


def audit(rt: Runtime, audit_id: str) -> Audit:
    with rt.db.session() as session:
        row = session.get(Audit, audit_id)
        assert row is not None
        session.expunge(row)
        return row


def finish(rt: Runtime, audit_id: str) -> None:
    with rt.db.session() as session:
        row = session.get(Audit, audit_id)
        assert row is not None
        row.state = "succeeded"
        row.finished_at = utcnow()


def test_a_newcomer_is_picked_right_after_the_backlog_audit_that_was_running(
    fair: tuple[Runtime, RecordingBroker],
) -> None:
    rt, _ = fair
    backlog = queued_audits(rt, tenant_with_inputs(rt.db), 4)
    (newcomer,) = queued_audits(rt, tenant_with_inputs(rt.db), 1)
    messages = [(a, audit(rt, a).task_id) for a in [*backlog, newcomer]]  # in sending order
    order = []
    for message, task_id in messages:
        claimed, outcome = claim_next(rt, message, "w:1", task_id)
        assert outcome is Claim.CLAIMED
        order.append(claimed)
        finish(rt, claimed)
    # the backlog's head ran first (it waited longest), then the tenants alternate
    assert order == [backlog[0], newcomer, *backlog[1:]]


def test_the_passed_over_audit_takes_the_picked_audits_message(
    fair: tuple[Runtime, RecordingBroker],
) -> None:
    rt, _ = fair
    a1, a2 = queued_audits(rt, tenant_with_inputs(rt.db), 2)
    (b1,) = queued_audits(rt, tenant_with_inputs(rt.db), 1)
    claim_next(rt, a1, "w:1", audit(rt, a1).task_id)
    finish(rt, a1)
    a2_message, b1_message = audit(rt, a2).task_id, audit(rt, b1).task_id
    assert claim_next(rt, a2, "w:1", a2_message) == (b1, Claim.CLAIMED)
    # b1's message is still in the broker: it now wakes a worker for a2, which the reconciler
    # sees as a2's message present
    assert audit(rt, a2).task_id == b1_message and audit(rt, a2).state == "queued"
    # and when that message arrives (it names b1, now running), it runs a2
    assert claim_next(rt, b1, "w:2", b1_message) == (a2, Claim.CLAIMED)


def test_a_tenant_at_its_running_cap_is_skipped_and_its_message_kept_alive(
    fair: tuple[Runtime, RecordingBroker],
) -> None:
    rt, broker = fair
    rt = dataclasses.replace(rt, config=rt.config.with_overrides(max_running_audits_per_tenant=1))
    a1, a2 = queued_audits(rt, tenant_with_inputs(rt.db), 2)
    (b1,) = queued_audits(rt, tenant_with_inputs(rt.db), 1)
    assert claim_next(rt, a1, "w:1", audit(rt, a1).task_id) == (a1, Claim.CLAIMED)
    with rt.db.session() as session:
        assert pick_fair(session, rt.config) == b1  # a is at its cap
    assert claim_next(rt, a2, "w:2", audit(rt, a2).task_id) == (b1, Claim.CLAIMED)
    # only a2 is left, and its tenant is at its cap: it stays queued with a new message, sent
    # a little later
    message = audit(rt, a2).task_id
    assert claim_next(rt, b1, "w:3", message) == (a2, Claim.BUSY)
    assert audit(rt, a2).state == "queued"
    resent = broker.sent[-1]
    assert resent["args"] == [a2] and resent["countdown"] > 0
    assert audit(rt, a2).task_id == resent["task_id"] != message
    finish(rt, a1)
    assert claim_next(rt, a2, "w:3", resent["task_id"]) == (a2, Claim.CLAIMED)


def test_a_spare_message_claims_the_fair_pick_and_a_lone_one_does_nothing(
    fair: tuple[Runtime, RecordingBroker],
) -> None:
    rt, _ = fair
    (a1,) = queued_audits(rt, tenant_with_inputs(rt.db), 1)
    assert claim_next(rt, a1, "w:1", "an-old-duplicate") == (a1, Claim.CLAIMED)
    assert claim_next(rt, a1, "w:2", audit(rt, a1).task_id) == (a1, Claim.BUSY)
    finish(rt, a1)
    assert claim_next(rt, a1, "w:2", "another") == (a1, Claim.FINISHED)
    assert claim_next(rt, "no-such-audit", "w:2", None) == ("no-such-audit", Claim.MISSING)


def test_canceled_and_exhausted_audits_are_still_ended_by_their_message(
    fair: tuple[Runtime, RecordingBroker],
) -> None:
    rt, _ = fair
    a1, a2 = queued_audits(rt, tenant_with_inputs(rt.db), 2)
    with rt.db.session() as session:
        session.get(Audit, a1).cancel_requested = True  # type: ignore[union-attr]
        session.get(Audit, a2).attempts = rt.config.max_attempts  # type: ignore[union-attr]
    assert claim_next(rt, a1, "w:1", audit(rt, a1).task_id) == (a1, Claim.FINISHED)
    assert audit(rt, a1).state == "canceled"
    assert claim_next(rt, a2, "w:1", audit(rt, a2).task_id) == (a2, Claim.EXHAUSTED)
    assert audit(rt, a2).state == "failed"


# ---------------------------------------------------------------------------------- end to end

BACKLOG = 6


def test_a_second_tenants_audit_starts_before_a_busy_tenants_backlog_is_done(
    pg_config: Config,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
    tmp_path: Path,
) -> None:
    config = pg_config.with_overrides(
        data_dir=tmp_path,
        artifact_dir=pg_config.resolved_artifact_dir,
        queue=f"gpu-fair-{secrets.token_hex(3)}",
        cpu_queue=f"cpu-fair-{secrets.token_hex(3)}",
    )
    server = start_server(config, "--no-worker")
    try:
        busy = Api(server.url, new_key(pg_database, f"busy-{secrets.token_hex(3)}"))
        other = Api(server.url, new_key(pg_database, f"other-{secrets.token_hex(3)}"))

        def submit(api: Api) -> str:
            model = api.upload_model(DIGITS_MODEL)
            dataset = api.upload_dataset(digits_zip(1))
            response = api.post(
                "/v1/audits",
                json={
                    "model_id": model["id"],
                    "dataset_id": dataset["id"],
                    "methods": ["gradient"],
                    "tests": [],
                    "seed": 0,
                },
            )
            assert response.status_code == 202, response.text
            audit_id: str = response.json()["id"]
            return audit_id

        backlog = [submit(busy) for _ in range(BACKLOG)]
        late = submit(other)
        # one worker, started once everything waits: in message order it would run the whole
        # backlog first
        worker_factory(config)
        assert other.wait(late, timeout_s=180)["state"] == "succeeded"
        for audit_id in backlog:
            assert busy.wait(audit_id, timeout_s=180)["state"] == "succeeded"
    finally:
        server.stop()
    with pg_database.session() as session:
        rows = {
            row.id: row
            for row in session.scalars(select(Audit).where(Audit.id.in_([*backlog, late])))
        }
    late_start = rows[late].started_at
    assert late_start is not None
    started_before = [a for a in backlog if rows[a].started_at < late_start]  # type: ignore[operator]
    # only the audit that was already running (the backlog's head) ran before the other tenant's
    assert started_before == backlog[:1], [(a, rows[a].started_at) for a in backlog]


def test_a_tenant_at_its_running_cap_runs_one_audit_at_a_time_on_two_workers(
    pg_config: Config,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
    tmp_path: Path,
) -> None:
    config = pg_config.with_overrides(
        data_dir=tmp_path,
        artifact_dir=pg_config.resolved_artifact_dir,
        queue=f"gpu-cap-{secrets.token_hex(3)}",
        cpu_queue=f"cpu-cap-{secrets.token_hex(3)}",
        max_running_audits_per_tenant=1,
    )
    server = start_server(config, "--no-worker")
    try:
        worker_factory(config)
        worker_factory(config)
        api = Api(server.url, new_key(pg_database))
        model = api.upload_model(DIGITS_MODEL)
        dataset = api.upload_dataset(digits_zip(2))
        ids = [
            api.post(
                "/v1/audits",
                json={
                    "model_id": model["id"],
                    "dataset_id": dataset["id"],
                    "methods": ["gradient"],
                    "tests": [],
                    "seed": seed,
                },
            ).json()["id"]
            for seed in range(3)
        ]
        # the second worker's messages wait (sent again a little later) instead of running a
        # second audit of the tenant; none is lost
        for audit_id in ids:
            assert api.wait(audit_id, timeout_s=180)["state"] == "succeeded"
    finally:
        server.stop()
    with pg_database.session() as session:
        rows = sorted(
            session.scalars(select(Audit).where(Audit.id.in_(ids))),
            key=lambda row: row.started_at or utcnow(),
        )
    for earlier, later in itertools.pairwise(rows):
        assert earlier.finished_at is not None and later.started_at is not None
        assert later.started_at >= earlier.finished_at, [
            (r.id, r.started_at, r.finished_at) for r in rows
        ]
