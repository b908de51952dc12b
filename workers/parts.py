"""Split audits: one audit's method families computed by several workers, merged in one place.

With ``audit_parts`` > 1 (``SALIENCY_AUDIT_AUDIT_PARTS``) the worker that claimed an audit
splits it (:func:`workers.engine.merge.split_methods`), writes one ``audit_parts`` row per part
and sends one ``workers.run_audit_part`` task per extra part to the audit queue. Every worker,
the audit's own included, then claims parts with a conditional UPDATE (a queued part, or a
running one whose heartbeat went stale, so a part whose worker died is taken over), computes
its part with the engine and stores the part's result in the artifact store. The audit's own
worker computes parts as long as any is left unclaimed and otherwise waits for the others, so
with a single worker the audit still completes (it computes every part itself). Once every part
is done it merges them (:func:`workers.engine.merge.merge_results`, exact) and stores the audit
as usual. No Celery result backend is needed: the parts' state is in the database.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

import numpy as np
from sqlalchemy import and_, or_, select, update

from service.jobs import Lost, worker_identity
from service.models import Audit, AuditPart, utcnow

from .celery import app

log = logging.getLogger(__name__)

PART_TASK = "workers.run_audit_part"
SEPARATOR = "|"


def pack(result: Any) -> bytes:
    """An engine result with its maps and kept example maps, as one npz."""
    arrays: dict[str, np.ndarray] = {
        "__report__": np.frombuffer(json.dumps(result.to_dict()).encode(), dtype=np.uint8)
    }
    for name, maps in result.maps.items():
        arrays[f"map{SEPARATOR}{name}"] = maps
    for test_name, test in result.tests.items():
        for stage, by_method in test.example_maps.items():
            for method, maps in by_method.items():
                arrays[SEPARATOR.join(("example", test_name, stage, method))] = maps
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def unpack(data: bytes) -> Any:
    from workers.engine.result import AuditResult

    with np.load(io.BytesIO(data)) as archive:
        result = AuditResult.from_dict(json.loads(archive["__report__"].tobytes()))
        for key in archive.files:
            parts = key.split(SEPARATOR)
            if parts[0] == "map":
                result.maps[parts[1]] = archive[key]
            elif parts[0] == "example":
                _, test_name, stage, method = parts
                result.tests[test_name].example_maps.setdefault(stage, {})[method] = archive[key]
    return result


def claim_part(rt: Any, audit_id: str, worker: str) -> int | None:
    """Take one part of a running audit: queued, or running with a stale heartbeat."""
    stale = utcnow() - timedelta(seconds=rt.config.heartbeat_stale_s)
    with rt.db.session() as session:
        running = session.scalar(
            select(Audit.id).where(
                Audit.id == audit_id, Audit.state == "running", Audit.cancel_requested.is_(False)
            )
        )
        if running is None:
            return None
        takeable = or_(
            AuditPart.state == "queued",
            and_(AuditPart.state == "running", AuditPart.heartbeat_at < stale),
        )
        candidates = session.scalars(
            select(AuditPart.part_index)
            .where(AuditPart.audit_id == audit_id, takeable)
            .order_by(AuditPart.part_index)
        ).all()
        for index in candidates:
            result = session.execute(
                update(AuditPart)
                .where(AuditPart.audit_id == audit_id, AuditPart.part_index == index, takeable)
                .values(state="running", worker=worker, heartbeat_at=utcnow(), progress=0.0)
            )
            if result.rowcount:
                return int(index)
    return None


class PartBeat(threading.Thread):
    """Heartbeats one part's row and notices when its audit stops running."""

    def __init__(self, rt: Any, audit_id: str, index: int, worker: str) -> None:
        super().__init__(name=f"part-{audit_id}-{index}", daemon=True)
        self.rt, self.audit_id, self.index, self.worker = rt, audit_id, index, worker
        self.stop = threading.Event()
        self.progress = 0.0
        self.lost: Lost | None = None

    def beat(self) -> None:
        with self.rt.db.session() as session:
            written = session.execute(
                update(AuditPart)
                .where(
                    AuditPart.audit_id == self.audit_id,
                    AuditPart.part_index == self.index,
                    AuditPart.worker == self.worker,
                    AuditPart.state == "running",
                )
                .values(heartbeat_at=utcnow(), progress=self.progress)
            ).rowcount
            live = session.scalar(
                select(Audit.id).where(
                    Audit.id == self.audit_id,
                    Audit.state == "running",
                    Audit.cancel_requested.is_(False),
                )
            )
        if not written or live is None:
            self.lost = Lost("the audit or the part is no longer this worker's to compute")

    def run(self) -> None:
        while not self.stop.wait(self.rt.config.heartbeat_interval_s):
            try:
                self.beat()
            except Exception as exc:  # a database blip: the next beat retries
                log.warning("part heartbeat failed: %s", exc)
            if self.lost is not None:
                return


def compute_part(rt: Any, audit_id: str, index: int, worker: str, inputs: Any) -> bool:
    """Compute one claimed part and store it; False when the part was taken away."""
    from .tasks import compute

    with rt.db.session() as session:
        methods = session.scalar(
            select(AuditPart.methods).where(
                AuditPart.audit_id == audit_id, AuditPart.part_index == index
            )
        )
    beat = PartBeat(rt, audit_id, index, worker)
    beat.start()

    def progress(fraction: float, step: str) -> None:
        if beat.lost is not None:
            raise beat.lost
        beat.progress = fraction

    try:
        result = compute(inputs, replace(inputs.spec, methods=tuple(methods)), progress)
    except Lost:
        return False
    finally:
        beat.stop.set()
        beat.join(timeout=10)
    sha = rt.store.put_bytes(pack(result))
    with rt.db.session() as session:
        done = session.execute(
            update(AuditPart)
            .where(
                AuditPart.audit_id == audit_id,
                AuditPart.part_index == index,
                AuditPart.worker == worker,
                AuditPart.state == "running",
            )
            .values(state="done", result_sha256=sha, progress=1.0, heartbeat_at=utcnow())
        ).rowcount
    return bool(done)


def run_split(rt: Any, audit_id: str, inputs: Any, progress: Any) -> Any:
    """The audit's own worker: write the parts, share them out, compute what is left, wait,
    merge."""
    from workers.engine.merge import merge_results, split_methods

    from .tasks import enqueuer

    spec = inputs.spec
    groups = split_methods(spec, rt.config.audit_parts)
    with rt.db.session() as session:
        for position, methods in enumerate(groups):
            session.add(
                AuditPart(
                    tenant_id=inputs.tenant_id,
                    audit_id=audit_id,
                    part_index=position,
                    methods=list(methods),
                    state="queued",
                )
            )
    enqueue = enqueuer()
    for _ in groups[1:]:
        enqueue.send(PART_TASK, audit_id, rt.config.queue)
    worker = worker_identity()
    while True:
        index = claim_part(rt, audit_id, worker)
        if index is not None:
            progress(0.0, f"part {index + 1} of {len(groups)}: {', '.join(groups[index])}")
            compute_part(rt, audit_id, index, worker, inputs)
            continue
        with rt.db.session() as session:
            rows = session.execute(
                select(AuditPart.state, AuditPart.progress, AuditPart.result_sha256)
                .where(AuditPart.audit_id == audit_id)
                .order_by(AuditPart.part_index)
            ).all()
        if len(rows) == len(groups) and all(state == "done" for state, _, _ in rows):
            break
        done = sum(state == "done" for state, _, _ in rows)
        progress(
            float(np.mean([p or 0.0 for _, p, _ in rows])) if rows else 0.0,
            f"waiting for parts: {done} of {len(groups)} done",
        )
        time.sleep(0.5)
    progress(0.95, f"merging {len(groups)} parts")
    parts = [unpack(rt.store.read_bytes(sha)) for _, _, sha in rows]
    return merge_results(spec, parts)


@app.task(name=PART_TASK, bind=True)
def run_audit_part_task(self: Any, audit_id: str) -> str:
    """Any worker: compute parts of a split audit while unclaimed ones are left."""
    from .tasks import load_inputs, runtime

    rt = runtime()
    worker = worker_identity()
    index: int | None = claim_part(rt, audit_id, worker)
    if index is None:
        return "nothing to do"
    inputs = load_inputs(rt, audit_id)
    computed = 0
    while index is not None:
        computed += compute_part(rt, audit_id, index, worker, inputs)
        index = claim_part(rt, audit_id, worker)
    return f"computed {computed} parts"
