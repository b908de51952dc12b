"""The worker's tasks: load an audit's inputs, run the engine, store its outputs.

Thin glue around :func:`saliency_audit.workers.engine.runner.run_audit`. The job lifecycle (claim,
heartbeat,
ownership, the final transaction) is :mod:`saliency_audit.service.jobs`; this module only moves data
between
the database, the artifact store and the engine. :func:`register_tasks` puts the tasks on the
app :func:`saliency_audit.workers.celery.create_celery` builds. torch and the engine are imported
inside the
tasks, so they load in the pool child, never in the worker's parent process.
:mod:`saliency_audit.workers.local` is the same audit run from files, for ``saliency-audit run``.

Shutdown (:func:`install_drain`): SIGTERM to the worker starts Celery's warm shutdown (no new
messages) and is passed on to the pool child, which lets its running task go on for
``drain_grace_s`` before the audit is handed back (:class:`saliency_audit.service.jobs.Heartbeat`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import cache
from typing import Any

from celery import Celery, Task, signals
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_init
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from saliency_audit.service.artifacts import ArtifactMissing
from saliency_audit.service.jobs import (
    DATABASE_DOWN,
    INSPECT_TASK,
    PART_TASK,
    PROGRESS_WRITE_EVERY_S,
    RENDER_TASK,
    TASK_NAME,
    WEBHOOK_TASK,
    WORKER_DRAIN,
    Claim,
    Drained,
    Heartbeat,
    Lost,
    Ownership,
    Runtime,
    announce_finished,
    claim_next,
    worker_identity,
)
from saliency_audit.service.models import (
    Audit,
    AuditArtifact,
    DatasetRecord,
    ModelRecord,
    ResultRow,
    VerdictRow,
)
from saliency_audit.service.routes import artifact_path, report_links

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


# ---------------------------------------------------------------------------------- tasks


def register_tasks(app: Celery) -> None:
    """Put the workers' tasks on ``app`` (under the names :mod:`saliency_audit.service.jobs`
    sends)."""
    from saliency_audit.workers.engine.errors import stop_audit_on

    # a soft time limit ends the audit; the engine must not take it for one method's failure
    stop_audit_on(SoftTimeLimitExceeded)
    from .parts import run_audit_part_task

    install_drain()
    for name, function, options in (
        (TASK_NAME, run_audit_task, {}),
        (PART_TASK, run_audit_part_task, {}),
        (RENDER_TASK, render_reports_task, {}),
        (WEBHOOK_TASK, deliver_webhook_task, {"max_retries": None}),
        (INSPECT_TASK, inspect_model_task, {}),
    ):
        app.task(name=name, bind=True, shared=False, **options)(function)
    worker_init.connect(_load_explainer_plugins_at_start, weak=False)


def _load_explainer_plugins_at_start(**_: Any) -> None:
    load_explainer_plugins()


@cache
def load_explainer_plugins() -> tuple[str, ...]:
    """Register the explainers the operator installed in this worker's environment as entry
    points (group ``saliency_audit.explainers``), once per process: at worker start, and
    before the first audit of a process that was not started as a worker. A plugin that
    cannot be loaded is logged at start and fails every audit of this worker with the reason
    (never an audit that silently runs without it)."""
    from saliency_audit.workers.engine.methods.plugins import load_entry_point_explainers

    names = tuple(info.name for info in load_entry_point_explainers())
    if names:
        log.info("explainer plugins: %s", ", ".join(names))
    return names


# ---------------------------------------------------------------------------------- drain


class _PoolChild:
    """Signal state of this pool child (plain attributes: signal handlers write them)."""

    pid = 0  # the process that installed the handler (a forked child installs its own)
    previous: Any = signal.SIG_DFL  # billiard's SIGTERM handler, used while no task runs
    busy = False  # a task is running
    sigterms = 0  # SIGTERMs received during the running task
    grace_s = 0.0


class _Parent:
    forwarded = False  # the drain was passed on to the pool children


def install_drain() -> None:
    """Connect the shutdown handlers (once per process, whatever the number of apps).

    - worker parent, warm shutdown (the first SIGTERM or Ctrl-C): passed on once, as SIGTERM,
      to the pool child; Celery itself stops taking messages and waits for the running task.
    - pool child: SIGTERM while idle exits as billiard has it exit; while a task runs it starts
      the drain (:data:`saliency_audit.service.jobs.WORKER_DRAIN`) instead of killing the task: the
      audit goes
      on for ``drain_grace_s`` and is then handed back, its attempt not counted, and the
      parent is told to shut down too. A message the parent still hands over is sent back to
      the queue unclaimed. A second SIGTERM during the task (the pool terminated at a cold
      shutdown) exits once the task returned.
    """
    signals.task_prerun.connect(_task_starts, dispatch_uid="saliency-drain-prerun")
    signals.task_postrun.connect(_task_ends, dispatch_uid="saliency-drain-postrun")
    signals.worker_shutting_down.connect(_pass_drain_on, dispatch_uid="saliency-drain-parent")


def _child_sigterm(signum: int, frame: Any) -> None:
    if not _PoolChild.busy:
        _exit_by(signum, frame)
    _PoolChild.sigterms += 1
    if not WORKER_DRAIN.requested:
        WORKER_DRAIN.request(_PoolChild.grace_s)
        # whoever got the signal, the whole worker drains: the parent stops taking messages
        # (Celery ignores a SIGTERM during its warm shutdown)
        with contextlib.suppress(ProcessLookupError):
            os.kill(os.getppid(), signal.SIGTERM)


def _exit_by(signum: int, frame: Any) -> None:
    previous = _PoolChild.previous
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _task_starts(task: Task | None = None, **_: Any) -> None:
    # installed at the first task, in a prefork pool child's main thread (billiard sets its own
    # SIGTERM handler after the child's initializer, worker_process_init, has run); never in a
    # worker's main process, whose SIGTERM is Celery's warm shutdown
    from billiard.process import current_process

    if (
        _PoolChild.pid != os.getpid()
        and current_process().name != "MainProcess"
        and threading.current_thread() is threading.main_thread()
    ):
        config = getattr(getattr(task, "app", None), "conf", {}).get("saliency_audit_config")
        if config is not None:
            _PoolChild.grace_s = config.drain_grace_s
            _PoolChild.previous = signal.signal(signal.SIGTERM, _child_sigterm)
            _PoolChild.pid = os.getpid()
    _PoolChild.busy = True


def _task_ends(**_: Any) -> None:
    _PoolChild.busy = False
    if _PoolChild.sigterms > 1:
        _exit_by(signal.SIGTERM, None)


def _pass_drain_on(how: str = "", **_: Any) -> None:
    if how != "Warm" or _Parent.forwarded:
        return
    _Parent.forwarded = True
    from billiard.process import active_children
    from celery.worker import state

    if not (state.active_requests or state.reserved_requests):  # the pool closes an idle child
        return
    for child in active_children():
        if child.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)


# ---------------------------------------------------------------------------------- runtime


@cache
def _runtime(app: Celery, pid: int) -> Runtime:
    """One database pool per process and app (keyed by pid: a forked child must not reuse its
    parent's connections)."""
    return Runtime.from_config(app.conf.saliency_audit_config, app)


def runtime(task: Task) -> Runtime:
    return _runtime(task.app, os.getpid())


def run_audit_task(self: Task, audit_id: str) -> str:
    rt = runtime(self)
    if WORKER_DRAIN.requested:
        # shutting down, yet handed one more message: leave it queued for another worker
        rt.enqueue(rt.db, audit_id)
        return "draining"
    # the message is a wake-up: the audit run is the one the fair claim picks
    audit_id, claimed = claim_next(rt, audit_id, worker_identity(), self.request.id)
    outcome = execute(rt, audit_id, claimed)
    if outcome in ("succeeded", "failed", "canceled", Claim.EXHAUSTED.value):
        announce_finished(rt.db, rt.enqueue, audit_id)
    return outcome


def inspect_model_task(self: Task, model_id: str) -> str:
    return inspect_model(runtime(self), model_id)


def inspect_model(rt: Runtime, model_id: str) -> str:
    """Load an uploaded model as an audit would and record what a submit needs to know: the
    names a spec may give it (``details.layers``: modules, conv layers, modules with a spatial
    output), so that POST /v1/audits refuses an unknown ``layer`` / ``layers`` name with the
    engine's words, and for weights the input shape the input spec resolved to (a timm
    model's pretrained_cfg size, for the cost estimate). A model that does not load gets the
    engine's error instead (``details.load_problem``: code and message, such as an
    architecture timm does not have or timm not installed here), and POST /v1/audits refuses
    it with that message; a later inspection that loads it removes the problem."""
    import torch

    from saliency_audit.workers.engine.errors import EngineError
    from saliency_audit.workers.engine.layers import layer_names
    from saliency_audit.workers.engine.models.loader import load_model

    with rt.db.session() as session:
        row = session.get(ModelRecord, model_id)
        if row is None or row.deleted_at is not None:
            return "gone"
        sha256, architecture = row.sha256, row.architecture if row.format != "onnx" else None
        overrides = row.input_spec or None
    found: dict[str, Any]
    try:
        model = load_model(
            rt.store.read_bytes(sha256), architecture=architecture, input_spec_overrides=overrides
        )
        spec = model.input_spec
        example = torch.zeros(1, spec.channels, spec.height, spec.width)
        with torch.no_grad():
            found = {"layers": layer_names(model.module.eval(), example)}
        if architecture is not None:
            found["input_shape"] = [None, spec.channels, spec.height, spec.width]
        found["pass_prices"] = _pass_prices(model, model_id)
        outcome = "inspected"
    except EngineError as exc:
        log.info("model %s does not load: %s", model_id, exc)
        found = {"load_problem": {"code": exc.code, "message": exc.message}}
        outcome = "not_loadable"
    except ArtifactMissing as exc:
        log.info("model %s not inspected: %s", model_id, exc)
        return "not_inspected"
    with rt.db.session() as session:
        row = session.get(ModelRecord, model_id)
        if row is None or row.deleted_at is not None:
            return "gone"
        replaced = ("layers", "load_problem", "pass_prices")
        kept = {k: v for k, v in (row.details or {}).items() if k not in replaced}
        row.details = {**kept, **found}
    return outcome


def _pass_prices(model: Any, model_id: str) -> dict[str, Any] | None:
    """The model's pass times on this worker, for the cost model's prediction at submit
    (workers/engine/timing.py); None where they cannot be measured (the submit then prices the
    audit at the default rate and says so)."""
    from saliency_audit.workers.engine.errors import stops_the_audit
    from saliency_audit.workers.engine.timing import measure_pass_prices

    try:
        prices = measure_pass_prices(model, device="auto")
    except Exception as exc:  # a model that loads but does not run: its audit will say why
        if stops_the_audit(exc):
            raise
        log.info("model %s: pass times not measured: %s", model_id, exc)
        return None
    log.info("model %s: pass times measured in %.1f s", model_id, prices.measured_s)
    return prices.to_dict()


def render_reports_task(self: Task, audit_id: str) -> str:
    return render_documents(runtime(self), audit_id)


def deliver_webhook_task(self: Task, audit_id: str) -> str:
    rt = runtime(self)
    outcome = deliver_webhook(rt, audit_id)
    if outcome == "retry":
        attempt = self.request.retries
        raise self.retry(countdown=rt.config.webhook_backoff_s * 2**attempt)
    return outcome


# ---------------------------------------------------------------------------------- audit


def execute(rt: Runtime, audit_id: str, outcome: Claim) -> str:
    """Run the audit this worker claimed (``outcome``, from
    :func:`saliency_audit.service.jobs.claim_next`)
    under a heartbeat, and record how it ended: the outcome (``succeeded``, ``failed``,
    ``canceled``, ``handed_back`` (the worker shut down), ``lost`` or why it was not
    claimed)."""
    worker = worker_identity()
    if outcome is not Claim.CLAIMED:
        log.info("audit %s not run by %s: %s", audit_id, worker, outcome.value)
        return outcome.value
    owner = Ownership(rt.db, audit_id, worker, rt.enqueue)
    try:
        with Heartbeat(owner, rt.config.heartbeat_interval_s, PROGRESS_WRITE_EVERY_S) as beat:
            _run(rt, audit_id, owner, beat.progress)
        return "succeeded"
    except Drained as exc:
        # the worker shuts down: queued again and sent again (Ownership.hand_back), uncounted
        return "handed_back" if exc.handed_back else "lost"
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
    except DATABASE_DOWN:
        # Nothing can be written now: leave the audit running; its heartbeat goes stale and
        # the reconciler queues it again (the attempt is counted), so the audit is not lost.
        log.exception("audit %s: the database went away", audit_id)
        raise
    except Exception as exc:
        from saliency_audit.workers.engine.errors import EngineError

        if isinstance(exc, EngineError):
            owner.fail(_jsonable(exc.to_dict()))
        else:
            log.exception("audit %s failed", audit_id)
            owner.fail({"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"})
        return "failed"


def _jsonable(value: dict[str, object]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(value, default=str)))


def _run(rt: Runtime, audit_id: str, owner: Ownership, progress: Progress) -> None:
    """The audit's steps: load, compute (whole or in parts), draw, store, commit."""
    progress(0.0, "loading the model and images")
    inputs = load_inputs(rt, audit_id)
    result = _compute_audit(rt, audit_id, inputs, lambda f, step: progress(0.02 + 0.9 * f, step))
    progress(0.93, "rendering heatmaps")
    pictures = _heatmaps(rt, inputs.tenant_id, audit_id, result, inputs.decoded)
    stored = _store_files(rt, audit_id, inputs, result, pictures)
    progress(0.98, "storing results")

    def write(session: Session) -> dict[str, Any]:
        session.add_all(_score_rows(inputs.tenant_id, audit_id, result))
        session.add_all(stored.artifacts)
        return {
            "report_sha256": stored.report_sha256,
            "maps_sha256": stored.maps_sha256,
            "verdict_summary": _verdict_summary(result),
        }

    if not owner.succeed(write):
        raise Lost("the audit is no longer owned by this worker")


def _compute_audit(rt: Runtime, audit_id: str, inputs: Inputs, progress: Progress) -> Any:
    """The engine result: in parts shared with other workers when the configuration splits
    audits and the spec allows it, else in one piece."""
    from saliency_audit.workers.engine.merge import splittable

    from .parts import run_split

    if rt.config.audit_parts > 1 and splittable(inputs.spec):
        return run_split(rt, audit_id, inputs, progress)
    return compute(inputs, inputs.spec, progress)


@dataclass
class _Stored:
    """The files of an audit already in the artifact store, with their rows to commit."""

    report_sha256: str
    maps_sha256: str
    artifacts: list[AuditArtifact]


def _store_files(
    rt: Runtime, audit_id: str, inputs: Inputs, result: Any, pictures: list[AuditArtifact]
) -> _Stored:
    """``maps.npz`` and ``report.json`` into the artifact store, beside the pictures."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **result.maps)
    maps_bytes = buffer.getvalue()
    maps_sha = rt.store.put_bytes(maps_bytes)
    report = _report_document(audit_id, inputs, result, pictures)
    report_sha = rt.store.put_bytes((json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    artifacts = [
        AuditArtifact(
            tenant_id=inputs.tenant_id,
            audit_id=audit_id,
            kind="report_json",
            sha256=report_sha,
            media_type="application/json",
            size_bytes=rt.store.path(report_sha).stat().st_size,
        ),
        AuditArtifact(
            tenant_id=inputs.tenant_id,
            audit_id=audit_id,
            kind="maps_npz",
            sha256=maps_sha,
            media_type="application/octet-stream",
            size_bytes=len(maps_bytes),
        ),
        *pictures,
    ]
    return _Stored(report_sha, maps_sha, artifacts)


def _report_document(
    audit_id: str, inputs: Inputs, result: Any, pictures: list[AuditArtifact]
) -> dict[str, Any]:
    """The engine's report with what only the service knows: the audit, its dataset, the links
    to its views and the pictures stored for it."""
    dataset = inputs.dataset
    report: dict[str, Any] = result.to_dict()
    report["audit_id"] = audit_id
    submitted = inputs.submitted_at
    report["created_at"] = submitted.isoformat() if submitted is not None else None
    report["dataset"] = {
        "id": dataset.id,
        "name": dataset.name,
        "sha256": dataset.sha256,
        "n_images": dataset.n_images,
        "labeled": dataset.labeled,
        "has_masks": dataset.has_masks,
        "has_boxes": dataset.has_boxes,
    }
    report["links"] = report_links(audit_id)
    report["artifacts"] = [
        {
            "kind": a.kind,
            "method": a.method,
            "test": a.test,
            "stage": a.stage,
            "image": a.image,
            "sha256": a.sha256,
            "media_type": a.media_type,
            "url": artifact_path(audit_id, a.sha256),
        }
        for a in pictures
    ]
    return report


def _score_rows(tenant_id: str, audit_id: str, result: Any) -> list[ResultRow | VerdictRow]:
    """One row per score and one per verdict."""
    rows: list[ResultRow | VerdictRow] = [
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
        for test in result.tests.values()
        for score in test.scores
    ]
    rows += [
        VerdictRow(tenant_id=tenant_id, audit_id=audit_id, **asdict(v)) for v in result.verdicts
    ]
    return rows


def _verdict_summary(result: Any) -> dict[str, dict[str, str]]:
    """method -> test -> verdict, for the audit row."""
    summary: dict[str, dict[str, str]] = {}
    for v in result.verdicts:
        summary.setdefault(v.method, {})[v.test] = v.verdict
    return summary


# ---------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """What an audit (or one of its parts) runs on, loaded from the database and the store."""

    spec: Any  # AuditSpec
    model: Any  # LoadedModel
    images: Any  # the preprocessed (N, C, H, W) tensor
    decoded: list[Any]  # DecodedImage, for names and overlays
    dataset: DatasetRecord
    tenant_id: str
    submitted_at: datetime | None  # the audit's created_at, for the report
    train: Any = None  # LabeledImages
    masks: Any = None  # (N, H, W) bool tensor


def load_inputs(rt: Runtime, audit_id: str) -> Inputs:
    import torch

    from saliency_audit.workers.engine.data_randomization import LabeledImages
    from saliency_audit.workers.engine.image_files import class_indices
    from saliency_audit.workers.engine.images import decode_image, preprocess
    from saliency_audit.workers.engine.models.loader import load_model
    from saliency_audit.workers.engine.spec import AuditSpec

    with rt.db.session() as session:
        audit = session.get(Audit, audit_id)
        assert audit is not None
        model_row = session.get(ModelRecord, audit.model_id)
        dataset = session.get(DatasetRecord, audit.dataset_id)
        train_set = (
            session.get(DatasetRecord, audit.train_dataset_id) if audit.train_dataset_id else None
        )
        spec_data = dict(audit.spec)
        tenant_id, submitted_at = audit.tenant_id, audit.created_at
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
    inputs = Inputs(
        spec=spec,
        model=model,
        images=preprocess(images_decoded, model.input_spec),
        decoded=images_decoded,
        dataset=dataset,
        tenant_id=tenant_id,
        submitted_at=submitted_at,
    )
    if "layers" in spec.tests:
        inputs.masks = _ground_truth(rt, dataset, images_decoded, model.input_spec)
    if train_set is not None:
        items = train_set.manifest["images"]
        folders = sorted({str(item["label"]) for item in items})
        index = class_indices(folders, model.input_spec.class_names)
        inputs.train = LabeledImages(
            preprocess(decoded(train_set), model.input_spec),
            torch.tensor([index[str(item["label"])] for item in items], dtype=torch.int64),
        )
    return inputs


def compute(inputs: Inputs, spec: Any, progress: Any) -> Any:
    """The engine's :func:`~saliency_audit.workers.engine.api.audit` (what ``saliency-audit run``
    and the
    Python API call) on the loaded inputs with ``spec`` (the whole audit's, or a part's)."""
    from saliency_audit.workers.engine.api import audit

    load_explainer_plugins()
    return audit(
        inputs.model,
        inputs.images,
        spec=spec,
        image_names=[d.name for d in inputs.decoded],
        train=inputs.train,
        masks=inputs.masks,
        progress=progress,
    )


def _ground_truth(rt: Runtime, dataset: DatasetRecord, images: list[Any], spec: Any) -> Any:
    """(N, H, W) object masks at the model's input size when every image has a mask or boxes
    in the dataset, else None (localization needs ground truth for each image)."""
    from saliency_audit.workers.engine.faithfulness import boxes_to_mask
    from saliency_audit.workers.engine.images import decode_mask, masks_tensor

    items = dataset.manifest["images"]
    if not all(item.get("mask_sha256") or item.get("boxes") for item in items):
        return None
    masks = []
    for item, image in zip(items, images, strict=True):
        if item.get("mask_sha256"):
            masks.append(decode_mask(rt.store.read_bytes(item["mask_sha256"]), item["name"]))
        else:
            height, width = image.pixels.shape[:2]
            masks.append(boxes_to_mask(item["boxes"], height, width).numpy())
    return masks_tensor(masks, spec)


def _heatmaps(
    rt: Runtime, tenant_id: str, audit_id: str, result: Any, images: list[Any]
) -> list[AuditArtifact]:
    """The pictures the reports show
    (:func:`saliency_audit.workers.reports.heatmaps.report_pictures`), put in
    the artifact store, as rows."""
    from saliency_audit.workers.reports.heatmaps import report_pictures

    listed, pngs = report_pictures(result, images)
    for png in pngs.values():
        rt.store.put_bytes(png)
    return [AuditArtifact(tenant_id=tenant_id, audit_id=audit_id, **entry) for entry in listed]


# ---------------------------------------------------------------------------------- follow-ups


def render_documents(rt: Runtime, audit_id: str) -> str:
    """The PDF and HTML reports of a succeeded audit, from its stored report.json and
    pictures; idempotent (a re-run replaces the previous documents)."""
    from saliency_audit.workers.reports.html import render_html
    from saliency_audit.workers.reports.pdf import render_pdf

    with rt.db.session() as session:
        audit = session.get(Audit, audit_id)
        if audit is None or audit.state != "succeeded" or audit.report_sha256 is None:
            return "skipped"
        report_sha, tenant_id = audit.report_sha256, audit.tenant_id
    try:
        report = json.loads(rt.store.read_bytes(report_sha))
        documents = {
            "report_pdf": ("application/pdf", render_pdf(report, rt.store.read_bytes)),
            "report_html": (
                "text/html; charset=utf-8",
                render_html(report, rt.store.read_bytes).encode(),
            ),
        }
    except Exception as exc:
        log.exception("rendering the reports of audit %s failed", audit_id)
        with rt.db.session() as session:
            session.execute(
                update(Audit)
                .where(Audit.id == audit_id)
                .values(documents_state="failed", documents_error=f"{type(exc).__name__}: {exc}")
            )
        return "failed"
    with rt.db.session() as session:
        session.execute(
            delete(AuditArtifact).where(
                AuditArtifact.audit_id == audit_id, AuditArtifact.kind.in_(list(documents))
            )
        )
        for kind, (media_type, data) in documents.items():
            session.add(
                AuditArtifact(
                    tenant_id=tenant_id,
                    audit_id=audit_id,
                    kind=kind,
                    sha256=rt.store.put_bytes(data),
                    media_type=media_type,
                    size_bytes=len(data),
                )
            )
        session.execute(
            update(Audit)
            .where(Audit.id == audit_id)
            .values(documents_state="ready", documents_error=None)
        )
    return "ready"


def deliver_webhook(rt: Runtime, audit_id: str) -> str:
    """One attempt: ``delivered``, ``retry`` (attempts left) or ``failed``."""
    from saliency_audit.service.models import Tenant
    from saliency_audit.service.webhooks import payload, post

    with rt.db.session() as session:
        audit = session.get(Audit, audit_id)
        if audit is None or audit.webhook_url is None or audit.webhook_state == "delivered":
            return "skipped"
        tenant = session.get(Tenant, audit.tenant_id)
        secret = tenant.webhook_secret if tenant is not None else None
        body, url = payload(audit), audit.webhook_url
    if secret is None:  # set at submission; a tenant row without one cannot sign
        outcome, detail = False, "the tenant has no webhook secret"
    else:
        outcome, detail = post(
            url, secret, body, rt.config.webhook_timeout_s, rt.config.webhook_allow_private
        )
    with rt.db.session() as session:
        audit = session.get(Audit, audit_id)
        assert audit is not None
        audit.webhook_attempts = (audit.webhook_attempts or 0) + 1
        audit.webhook_error = None if outcome else detail
        if outcome:
            audit.webhook_state = "delivered"
        elif audit.webhook_attempts >= rt.config.webhook_max_attempts:
            audit.webhook_state = "failed"
        attempts = audit.webhook_attempts
    if outcome:
        return "delivered"
    log.warning("webhook of audit %s, attempt %d: %s", audit_id, attempts, detail)
    return "failed" if attempts >= rt.config.webhook_max_attempts else "retry"
