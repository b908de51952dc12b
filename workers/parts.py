"""Split audits: one audit's method families computed by several workers, merged in one place.

With ``audit_parts`` > 1 (``SALIENCY_AUDIT_AUDIT_PARTS``) the worker that claimed an audit
splits it (:func:`saliency_audit.workers.engine.merge.split_methods`), writes one ``audit_parts``
row per part
and sends one ``workers.run_audit_part`` task per extra part to the audit queue. Every worker,
the audit's own included, then claims parts (:func:`saliency_audit.service.jobs.claim_part`: a
queued part, or
a running one whose heartbeat went stale, so a part whose worker died is taken over), computes
its part with the engine and stores the part's result in the artifact store. The audit's own
worker computes parts as long as any is left unclaimed and otherwise waits for the others, so
with a single worker the audit still completes (it computes every part itself). Once every part
is done it merges them (:func:`saliency_audit.workers.engine.merge.merge_results`, exact) and stores
the audit
as usual. No Celery result backend is needed: the parts' state is in the database.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from celery import Task

from saliency_audit.service.jobs import (
    PART_TASK,
    WORKER_DRAIN,
    Heartbeat,
    Lost,
    PartLease,
    Runtime,
    claim_part,
    create_parts,
    part_states,
    worker_identity,
)

if TYPE_CHECKING:
    from .tasks import Inputs, Progress

# how often the audit's own worker looks at its parts while others compute them
PARTS_POLL_S = 0.5
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
    from saliency_audit.workers.engine.result import AuditResult

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


def compute_part(rt: Runtime, lease: PartLease, inputs: Inputs) -> bool:
    """Compute one claimed part and store it; False when the part was taken away."""
    from .tasks import compute

    methods = lease.methods()
    try:
        with Heartbeat(lease, rt.config.heartbeat_interval_s) as beat:
            result = compute(inputs, replace(inputs.spec, methods=tuple(methods)), beat.progress)
    except Lost:
        return False
    return lease.finish(rt.store.put_bytes(pack(result)))


def run_split(rt: Runtime, audit_id: str, inputs: Inputs, progress: Progress) -> Any:
    """The audit's own worker: write the parts, share them out, compute what is left, wait,
    merge."""
    from saliency_audit.workers.engine.merge import merge_results, split_methods

    spec = inputs.spec
    groups = split_methods(spec, rt.config.audit_parts)
    create_parts(rt.db, inputs.tenant_id, audit_id, groups)
    for _ in groups[1:]:
        rt.enqueue.send(PART_TASK, audit_id, rt.config.queue)
    worker = worker_identity()
    while True:
        index = claim_part(rt.db, audit_id, worker, rt.config)
        if index is not None:
            progress(0.0, f"part {index + 1} of {len(groups)}: {', '.join(groups[index])}")
            compute_part(rt, PartLease(rt.db, audit_id, index, worker), inputs)
            continue
        rows = part_states(rt.db, audit_id)
        if len(rows) == len(groups) and all(row.state == "done" for row in rows):
            break
        done = sum(row.state == "done" for row in rows)
        progress(
            float(np.mean([row.progress or 0.0 for row in rows])) if rows else 0.0,
            f"waiting for parts: {done} of {len(groups)} done",
        )
        time.sleep(PARTS_POLL_S)
    progress(0.95, f"merging {len(groups)} parts")
    parts = [unpack(rt.store.read_bytes(str(row.result_sha256))) for row in rows]
    return merge_results(spec, parts)


def run_audit_part_task(self: Task, audit_id: str) -> str:
    """Any worker: compute parts of a split audit while unclaimed ones are left."""
    from .tasks import load_inputs, runtime

    rt = runtime(self)
    worker = worker_identity()
    index = claim_part(rt.db, audit_id, worker, rt.config)
    if index is None:
        return "nothing to do"
    inputs = load_inputs(rt, audit_id)
    computed = 0
    while index is not None:
        computed += compute_part(rt, PartLease(rt.db, audit_id, index, worker), inputs)
        # a worker shutting down takes no further part (a drained one was handed back)
        index = None if WORKER_DRAIN.requested else claim_part(rt.db, audit_id, worker, rt.config)
    return f"computed {computed} parts"
