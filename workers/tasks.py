"""The audit task: load the audit's inputs, run the engine, store its outputs.

Thin glue around :func:`workers.engine.runner.run_audit`. The job lifecycle (claim, heartbeat,
ownership, the final transaction) is :mod:`service.jobs`; this module only moves data between
the database, the artifact store and the engine. torch and the engine are imported inside the
task, so they load in the pool child, never in the worker's parent process.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from service.artifacts import ArtifactStore
from service.config import Config
from service.db import Database
from service.jobs import Claim, Lost, Ownership, claim, worker_identity
from service.models import Audit, AuditArtifact, DatasetRecord, ModelRecord, ResultRow, VerdictRow

from .celery import app

log = logging.getLogger(__name__)

HEATMAP_IMAGES = 16  # images whose trained-model heatmaps are rendered as PNGs
TRAINED_STAGE = "trained"
MODEL_TEST = "model"  # the "test" of the trained model's own maps


@dataclass
class Runtime:
    config: Config
    db: Database
    store: ArtifactStore


@cache
def _runtime(pid: int) -> Runtime:
    """One database pool per process (keyed by pid: a forked child must not reuse its
    parent's connections)."""
    config: Config = app.conf.saliency_audit_config
    return Runtime(
        config, Database.from_config(config), ArtifactStore(config.resolved_artifact_dir)
    )


def runtime() -> Runtime:
    return _runtime(os.getpid())


@app.task(name="workers.run_audit", bind=True)
def run_audit_task(self: Any, audit_id: str) -> str:
    return execute(runtime(), audit_id)


class _Heartbeat(threading.Thread):
    """Writes the heartbeat (and the latest progress) every ``interval_s``, so a long engine
    step without progress calls still shows the worker alive; notes when ownership is lost."""

    def __init__(self, owner: Ownership, interval_s: float) -> None:
        super().__init__(name=f"heartbeat-{owner.audit_id}", daemon=True)
        self.owner = owner
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.lost: Lost | None = None
        self.progress: tuple[float, str] | None = None

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                latest = self.progress
                if latest is None:
                    self.owner.heartbeat()
                else:
                    self.owner.heartbeat(*latest)
            except Lost as exc:
                self.lost = exc
                return
            except Exception as exc:  # the database may blip; the next beat retries
                log.warning("heartbeat for %s failed: %s", self.owner.audit_id, exc)


def execute(rt: Runtime, audit_id: str) -> str:
    worker = worker_identity()
    outcome = claim(rt.db, audit_id, worker, rt.config)
    if outcome is not Claim.CLAIMED:
        log.info("audit %s not run by %s: %s", audit_id, worker, outcome.value)
        return outcome.value
    owner = Ownership(rt.db, audit_id, worker)
    beat = _Heartbeat(owner, rt.config.heartbeat_interval_s)
    beat.start()
    last_write = [0.0]

    def progress(fraction: float, step: str) -> None:
        if beat.lost is not None:
            raise beat.lost
        beat.progress = (fraction, step)
        now = time.monotonic()
        if now - last_write[0] >= 1.0:
            last_write[0] = now
            owner.heartbeat(fraction, step)

    try:
        _run(rt, audit_id, owner, progress)
        return "succeeded"
    except Lost as exc:
        if exc.reason == "canceled":
            owner.finish_canceled()
            return "canceled"
        return "lost"
    except SoftTimeLimitExceeded:
        owner.fail(
            {
                "code": "time_limit",
                "message": f"the audit ran past the soft time limit of "
                f"{rt.config.soft_time_limit_s} s",
            }
        )
        return "failed"
    except Exception as exc:
        from workers.engine.errors import EngineError

        if isinstance(exc, EngineError):
            owner.fail(_jsonable(exc.to_dict()))
        else:
            log.exception("audit %s failed", audit_id)
            owner.fail({"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"})
        return "failed"
    finally:
        beat.stop.set()
        beat.join(timeout=10)


def _jsonable(value: dict[str, object]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(value, default=str)))


def _run(rt: Runtime, audit_id: str, owner: Ownership, progress: Any) -> None:
    import numpy as np
    import torch

    from workers.engine.data_randomization import LabeledImages
    from workers.engine.image_files import class_indices
    from workers.engine.images import decode_image, preprocess
    from workers.engine.models.loader import load_model
    from workers.engine.runner import run_audit
    from workers.engine.spec import AuditSpec

    progress(0.0, "loading the model and images")
    with rt.db.session() as session:
        audit = session.get(Audit, audit_id)
        assert audit is not None
        model_row = session.get(ModelRecord, audit.model_id)
        dataset = session.get(DatasetRecord, audit.dataset_id)
        train_set = (
            session.get(DatasetRecord, audit.train_dataset_id) if audit.train_dataset_id else None
        )
        spec_data = dict(audit.spec)
        tenant_id = audit.tenant_id
    assert model_row is not None and dataset is not None
    spec = AuditSpec.from_dict(spec_data)
    model = load_model(
        rt.store.read_bytes(model_row.sha256),
        architecture=model_row.architecture if model_row.format != "onnx" else None,
        input_spec_overrides=model_row.input_spec or None,
    )
    channels = model.input_spec.channels

    def decoded(record: DatasetRecord) -> list[Any]:
        return [
            decode_image(rt.store.read_bytes(item["sha256"]), item["name"], channels)
            for item in record.manifest["images"]
        ]

    images_decoded = decoded(dataset)
    images = preprocess(images_decoded, model.input_spec)
    train = None
    if train_set is not None:
        items = train_set.manifest["images"]
        folders = sorted({str(item["label"]) for item in items})
        index = class_indices(folders, model.input_spec.class_names)
        train = LabeledImages(
            preprocess(decoded(train_set), model.input_spec),
            torch.tensor([index[str(item["label"])] for item in items], dtype=torch.int64),
        )

    result = run_audit(
        model,
        images,
        spec,
        image_names=[d.name for d in images_decoded],
        train=train,
        progress=lambda f, step: progress(0.02 + 0.9 * f, step),
    )
    progress(0.93, "rendering heatmaps")
    report = result.to_dict()
    report_sha = rt.store.put_bytes((json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **result.maps)  # type: ignore[arg-type]
    maps_bytes = buffer.getvalue()
    maps_sha = rt.store.put_bytes(maps_bytes)
    artifacts = [
        AuditArtifact(
            tenant_id=tenant_id,
            audit_id=audit_id,
            kind="report_json",
            sha256=report_sha,
            media_type="application/json",
            size_bytes=rt.store.path(report_sha).stat().st_size,
        ),
        AuditArtifact(
            tenant_id=tenant_id,
            audit_id=audit_id,
            kind="maps_npz",
            sha256=maps_sha,
            media_type="application/octet-stream",
            size_bytes=len(maps_bytes),
        ),
    ]
    artifacts += _heatmaps(rt, tenant_id, audit_id, result, [d.name for d in images_decoded])

    progress(0.98, "storing results")

    def write(session: Any) -> dict[str, Any]:
        for test in result.tests.values():
            for score in test.scores:
                session.add(
                    ResultRow(
                        tenant_id=tenant_id,
                        audit_id=audit_id,
                        method=score.method,
                        test=score.test,
                        measure=score.measure,
                        stage=score.stage,
                        stage_index=score.stage_index,
                        mean=score.mean,
                        ci_low=score.ci_low,
                        ci_high=score.ci_high,
                        n=score.n,
                        n_undefined=score.n_undefined,
                    )
                )
        summary: dict[str, dict[str, str]] = {}
        for v in result.verdicts:
            summary.setdefault(v.method, {})[v.test] = v.verdict
            session.add(
                VerdictRow(
                    tenant_id=tenant_id,
                    audit_id=audit_id,
                    method=v.method,
                    test=v.test,
                    verdict=v.verdict,
                    reason=v.reason,
                    measure=v.measure,
                    stage=v.stage,
                    threshold=v.threshold,
                    mean=v.mean,
                    ci_low=v.ci_low,
                    ci_high=v.ci_high,
                    n=v.n,
                    is_control=v.is_control,
                    policy_version=v.policy_version,
                )
            )
        session.add_all(artifacts)
        return {"report_sha256": report_sha, "maps_sha256": maps_sha, "verdict_summary": summary}

    if not owner.succeed(write):
        raise Lost("the audit is no longer owned by this worker")


def _heatmaps(
    rt: Runtime, tenant_id: str, audit_id: str, result: Any, image_names: list[str]
) -> list[AuditArtifact]:
    """PNGs of the trained model's maps for the first images, and of every map a test kept
    for its heatmap grids (the first images at each stage)."""
    from workers.reports.heatmaps import heatmap_png

    rows: list[AuditArtifact] = []

    def add(test: str, stage: str, method: str, maps: Any, count: int) -> None:
        for i in range(min(count, len(maps))):
            png = heatmap_png(maps[i])
            rows.append(
                AuditArtifact(
                    tenant_id=tenant_id,
                    audit_id=audit_id,
                    kind="heatmap_png",
                    method=method,
                    test=test,
                    stage=stage,
                    image=image_names[i],
                    sha256=rt.store.put_bytes(png),
                    media_type="image/png",
                    size_bytes=len(png),
                )
            )

    for method, maps in result.maps.items():
        add(MODEL_TEST, TRAINED_STAGE, method, maps, HEATMAP_IMAGES)
    for test_name, test in result.tests.items():
        for stage, by_method in test.example_maps.items():
            for method, maps in by_method.items():
                add(test_name, stage, method, maps, len(maps))
    return rows
