"""The job lifecycle: enqueue after commit, claim, heartbeat, parts, reconcile.

The audit row is the truth. It is written (``queued``) and committed before anything is sent to
the broker, so a broker that is down or loses the message never loses the job: the reconciler
finds queued audits whose message is not in the broker and sends them again, and running audits
whose heartbeat went stale (the worker died) are queued again, up to ``max_attempts`` claims;
after that the audit fails with the reason. Every transition is one conditional UPDATE, so any
number of reconcilers and workers can race without double-running an audit: a duplicate message
finds the audit already claimed and does nothing.

A split audit's parts (``audit_parts`` rows, :mod:`saliency_audit.workers.parts`) follow the same
rules one
level down: a part is claimed with a conditional UPDATE (queued, or running with a stale
heartbeat), and one :class:`Heartbeat` thread keeps an audit's or a part's claim alive.
The workers' tasks only move data; every statement about who runs what is here.

A worker asked to stop (SIGTERM: :class:`Drain`) lets its running audit finish within
``drain_grace_s``; past that its :class:`Heartbeat` hands the audit (or part) back with
:func:`hand_back`: queued again, the attempt not counted, because a shutdown is not a crash.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol

from sqlalchemy import and_, case, delete, func, or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from .artifacts import ArtifactStore
from .config import Config
from .db import Database
from .models import Audit, AuditArtifact, AuditPart, ResultRow, VerdictRow, utcnow
from .states import FINAL_STATES

log = logging.getLogger(__name__)

TASK_NAME = "workers.run_audit"
PART_TASK = "workers.run_audit_part"  # one part of a split audit (workers/parts.py)
RENDER_TASK = "workers.render_reports"
WEBHOOK_TASK = "workers.deliver_webhook"
# after a model upload: a CPU worker lists the names a spec may give it (submit checks them)
INSPECT_TASK = "workers.inspect_model"
# a report render or webhook still pending this long after the audit ended was lost
FOLLOW_UP_LOST_AFTER_S = 600.0
# the database is unreachable (a restart, a failover): worth waiting out, never a verdict
DATABASE_DOWN = (OperationalError, InterfaceError)
# progress reported by the engine is written at most this often (the heartbeat writes it too)
PROGRESS_WRITE_EVERY_S = 1.0


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------- enqueue


class Enqueuer:
    """Sends an audit's task to the broker and records which task id carries it."""

    def __init__(self, config: Config, celery_app: Any | None = None) -> None:
        self.config = config
        self._app = celery_app

    @property
    def app(self) -> Any:
        if self._app is None:
            from .broker import celery_client

            self._app = celery_client(self.config)
        return self._app

    def send(
        self,
        task: str,
        audit_id: str,
        queue: str,
        task_id: str | None = None,
        countdown: float | None = None,
    ) -> bool:
        """Send one task (``countdown`` seconds from now when given); False (logged) when the
        broker is unreachable."""
        try:
            self.app.send_task(
                task,
                args=[audit_id],
                task_id=task_id or uuid.uuid4().hex,
                queue=queue,
                countdown=countdown,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as exc:  # kombu raises OperationalError and friends
            log.warning("could not send %s for audit %s: %s", task, audit_id, exc)
            return False
        return True

    def inspect_model(self, model_id: str) -> bool:
        """Ask a CPU worker to list an uploaded model's layer names (best effort: without
        them, the worker checks the names when an audit starts)."""
        return self.send(INSPECT_TASK, model_id, self.config.cpu_queue)

    def __call__(self, db: Database, audit_id: str) -> bool:
        """Send the audit's task (a fresh task id each time); False when the broker is
        unreachable, which the reconciler will repair."""
        task_id = uuid.uuid4().hex
        if not self.send(TASK_NAME, audit_id, self.config.queue, task_id):
            return False
        with db.session() as session:
            session.execute(
                update(Audit)
                .where(Audit.id == audit_id, Audit.state == "queued")
                .values(task_id=task_id, enqueued_at=utcnow(), queue=self.config.queue)
            )
        return True


def announce_finished(db: Database, enqueue: Enqueuer, audit_id: str) -> None:
    """After an audit reached a final state: render its reports (when it succeeded) and
    deliver its webhook (when it has one), both on the CPU queue. A send that fails leaves
    the state ``pending``, which the reconciler sends again."""
    with db.session() as session:
        audit = session.get(Audit, audit_id)
        if audit is None or audit.state not in FINAL_STATES:
            return
        render = audit.state == "succeeded" and audit.documents_state in (None, "pending")
        if render:
            audit.documents_state = "pending"
        hook = audit.webhook_url is not None and audit.webhook_state in (None, "pending")
        if hook:
            audit.webhook_state = "pending"
    if render:
        enqueue.send(RENDER_TASK, audit_id, enqueue.config.cpu_queue)
    if hook:
        enqueue.send(WEBHOOK_TASK, audit_id, enqueue.config.cpu_queue)


# ---------------------------------------------------------------------------------- claim


class Claim(enum.Enum):
    CLAIMED = "claimed"
    MISSING = "missing"
    FINISHED = "finished"  # succeeded, failed or canceled already
    BUSY = "busy"  # running elsewhere with a live heartbeat
    EXHAUSTED = "exhausted"  # the attempt cap was reached: the audit is now failed


def _stale_before(config: Config, now: datetime) -> datetime:
    return now - timedelta(seconds=config.heartbeat_stale_s)


def _dead_local_worker(worker: str | None) -> bool:
    """The previous attempt ran on this host in a process that no longer exists (its pool child
    was killed): no need to wait for its heartbeat to go stale."""
    if not worker or ":" not in worker:
        return False
    host, _, pid = worker.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


def _running(worker: str, now: datetime) -> dict[str, Any]:
    """What a claim writes: the audit runs on ``worker`` from ``now``, one more attempt."""
    return {
        "state": "running",
        "attempts": Audit.attempts + 1,
        "worker": worker,
        "started_at": now,
        "heartbeat_at": now,
        "progress": 0.0,
        "step": "starting",
        "error": None,
    }


def claim(db: Database, audit_id: str, worker: str, config: Config) -> Claim:
    """Take an audit for this worker: queued, or running with a stale heartbeat or a dead local
    worker. Clears the audit's partial results from any earlier attempt in the same
    transaction, so a re-run never duplicates rows."""
    now = utcnow()
    with db.session() as session:
        audit = session.get(Audit, audit_id)
        if audit is None:
            return Claim.MISSING
        if audit.state in FINAL_STATES:
            return Claim.FINISHED
        takeable = or_(
            Audit.state == "queued",
            and_(Audit.state == "running", Audit.heartbeat_at < _stale_before(config, now)),
        )
        if audit.state == "running" and _dead_local_worker(audit.worker):
            takeable = or_(takeable, and_(Audit.state == "running", Audit.worker == audit.worker))
        if audit.cancel_requested:
            _finish_canceled(session, audit_id)
            return Claim.FINISHED
        if audit.attempts >= config.max_attempts:
            failed = session.execute(
                update(Audit)
                .where(Audit.id == audit_id, takeable)
                .values(
                    state="failed",
                    finished_at=now,
                    step="failed",
                    error=exhausted_error(audit.attempts, config.max_attempts, audit.worker),
                )
            )
            return Claim.EXHAUSTED if failed.rowcount else Claim.BUSY  # type: ignore[attr-defined]
        claimed = session.execute(
            update(Audit).where(Audit.id == audit_id, takeable).values(**_running(worker, now))
        )
        if not claimed.rowcount:  # type: ignore[attr-defined]
            return Claim.BUSY
        clear_results(session, audit_id)
    return Claim.CLAIMED


# ---------------------------------------------------------------------------------- fair claim

# a message whose pick went to another worker tries again this many times before giving up
FAIR_CLAIM_TRIES = 5
# a wake-up whose audits all belong to tenants at their running cap is sent again this much later
CAPPED_RETRY_S = 2.0


class Next(NamedTuple):
    """What a wake-up message ended in: the audit it concerns (the one claimed, when it was)
    and how the claim went."""

    audit_id: str
    outcome: Claim


def _eligible_queued() -> Any:
    return and_(Audit.state == "queued", Audit.cancel_requested.is_(False))


def pick_fair(session: Session, config: Config, holder: str | None = None) -> str | None:
    """The queued audit the fair claim runs next, or None.

    Among tenants with queued audits and under their running cap: the one with the fewest
    running audits, then the one served longest ago (its latest claim; never served first),
    then the one whose oldest queued audit waited longest. Within a tenant, first in, first
    out. The "served longest ago" step makes the order round-robin when every tenant has
    nothing running, so one worker alternates between a tenant's backlog and a newcomer.

    Only audits sent to this worker's queue are candidates, and ``holder``, the audit whose
    message woke the worker (its queue may not be recorded yet: the enqueuer writes it just
    after sending)."""
    on_queue = Audit.queue == config.queue
    if holder is not None:
        on_queue = or_(on_queue, Audit.id == holder)
    eligible = and_(_eligible_queued(), Audit.attempts < config.max_attempts, on_queue)
    heads = dict(
        session.execute(
            select(Audit.tenant_id, func.min(Audit.created_at))
            .where(eligible)
            .group_by(Audit.tenant_id)
        ).all()
    )
    if not heads:
        return None
    running = dict(
        session.execute(
            select(Audit.tenant_id, func.count())
            .where(Audit.state == "running", Audit.tenant_id.in_(list(heads)))
            .group_by(Audit.tenant_id)
        ).all()
    )
    served = dict(
        session.execute(
            select(Audit.tenant_id, func.max(Audit.started_at))
            .where(Audit.tenant_id.in_(list(heads)), Audit.started_at.is_not(None))
            .group_by(Audit.tenant_id)
        ).all()
    )
    cap = config.max_running_audits_per_tenant
    open_tenants = [t for t in heads if not cap or running.get(t, 0) < cap]
    if not open_tenants:
        return None

    def order(t: str) -> tuple[int, float, datetime, str]:
        last = served.get(t)
        return (running.get(t, 0), -math.inf if last is None else last.timestamp(), heads[t], t)

    tenant = min(open_tenants, key=order)
    return session.scalar(
        select(Audit.id)
        .where(eligible, Audit.tenant_id == tenant)
        .order_by(Audit.created_at, Audit.id)
        .limit(1)
    )


def claim_next(rt: Runtime, audit_id: str, worker: str, task_id: str | None = None) -> Next:
    """:func:`_claim_next`, then no queued audit is left holding this consumed message.

    A concurrent claim can hand this message's id to another queued audit (the swap below)
    while this worker is consuming it; the id then names a message that is gone, and that
    audit would wait for the reconciler. When this wake-up claimed nothing and a queued audit
    holds ``task_id`` afterwards, that audit gets a fresh message now (a spare wake-up is
    harmless: one message claims at most one audit)."""
    done = _claim_next(rt, audit_id, worker, task_id)
    if done.outcome is Claim.CLAIMED or task_id is None:
        return done
    with rt.db.session() as session:
        orphan = session.execute(
            select(Audit.id).where(Audit.state == "queued", Audit.task_id == task_id)
        ).scalar_one_or_none()
    if orphan is not None:
        _send_later(rt, orphan, task_id, 0.0)
    return done


def _claim_next(rt: Runtime, audit_id: str, worker: str, task_id: str | None = None) -> Next:
    """Take the audit that fairness picks (:func:`pick_fair`) for this worker: the audit task's
    message is a wake-up, not an order.

    Every queued audit has one message in flight (its ``task_id``). When a worker takes message
    ``task_id`` and claims a different audit B than the one holding that message (A), the two
    swap messages in the same transaction: A takes B's ``task_id`` (B's message is still in the
    broker and now wakes a worker for A), so the reconciler still finds every queued audit's
    message in the broker. The claim itself is the same conditional UPDATE as :func:`claim`:
    two workers that pick the same audit cannot both run it; the loser picks again.

    What stays with :func:`claim` (the message's own audit): a running audit whose heartbeat is
    stale or whose local worker died (a redelivered message takes it over), and a queued audit
    to cancel or fail for its attempt cap. A message whose own audit is running elsewhere,
    finished or gone is a spare wake-up (a duplicate, or one a swap handed on): it still claims
    the fair pick, which is never wrong: one message claims at most one audit.

    When every queued audit belongs to a tenant at its running cap, the message's audit stays
    queued and its message is sent again ``CAPPED_RETRY_S`` later, so it is not lost."""
    config, db = rt.config, rt.db
    with db.session() as session:
        audit = session.get(Audit, audit_id)
        state = None if audit is None else audit.state
    if state == "running":
        outcome = claim(db, audit_id, worker, config)
        if outcome is not Claim.BUSY:
            return Next(audit_id, outcome)
    held: str | None = None
    for _ in range(FAIR_CLAIM_TRIES):
        with db.session() as session:
            holder = _message_holder(session, audit_id, task_id)
            if holder is not None and (
                holder.cancel_requested or holder.attempts >= config.max_attempts
            ):
                held = holder.id
                break
            pick = pick_fair(session, config, holder.id if holder is not None else None)
            if pick is None:
                held = holder.id if holder is not None else None
                break
            if _claim_queued(session, pick, worker, holder):
                return Next(pick, Claim.CLAIMED)
    else:
        return Next(audit_id, Claim.BUSY)
    if held is None:  # nothing to run: a spare wake-up
        if state is None:
            return Next(audit_id, Claim.MISSING)
        return Next(audit_id, Claim.FINISHED if state in FINAL_STATES else Claim.BUSY)
    with db.session() as session:
        holder = session.get(Audit, held)
        capped = (
            holder is not None
            and holder.state == "queued"
            and not holder.cancel_requested
            and holder.attempts < config.max_attempts
        )
    if not capped:  # to cancel, or past its attempt cap: claim() ends it
        return Next(held, claim(db, held, worker, config))
    # every queued audit waits for its tenant's running cap: keep this one's message alive
    _send_later(rt, held, task_id, CAPPED_RETRY_S)
    return Next(held, Claim.BUSY)


def _send_later(rt: Runtime, audit_id: str, old_task_id: str | None, delay_s: float) -> None:
    """Send the queued audit a new message ``delay_s`` from now, in place of ``old_task_id``
    (a failed send leaves the old id, which the reconciler finds gone and repairs)."""
    new_task_id = uuid.uuid4().hex
    if not rt.enqueue.send(TASK_NAME, audit_id, rt.config.queue, new_task_id, delay_s):
        return
    with rt.db.session() as session:
        guard = [Audit.id == audit_id, Audit.state == "queued"]
        if old_task_id is not None:
            guard.append(Audit.task_id == old_task_id)
        session.execute(
            update(Audit).where(*guard).values(task_id=new_task_id, enqueued_at=utcnow())
        )


def _message_holder(session: Session, audit_id: str, task_id: str | None) -> Audit | None:
    """The queued audit this message wakes a worker for: the one holding its task id (after a
    swap that is no longer the audit named in the message), else the message's own audit while
    it is queued (the enqueuer records a task id just after sending, so a fast worker may see
    the message first; and taking a stale duplicate for the holder only swaps one live message
    for another)."""
    if task_id is not None:
        holder = session.scalars(
            select(Audit).where(Audit.state == "queued", Audit.task_id == task_id).limit(1)
        ).first()
        if holder is not None:
            return holder
    audit = session.get(Audit, audit_id)
    return audit if audit is not None and audit.state == "queued" else None


def _claim_queued(session: Session, pick: str, worker: str, holder: Audit | None) -> bool:
    """Claim the queued audit ``pick`` and, when the message belongs to another queued audit,
    hand that audit the picked one's message. False when another worker claimed it first."""
    now = utcnow()
    row = session.execute(
        select(Audit.task_id, Audit.enqueued_at).where(Audit.id == pick, _eligible_queued())
    ).first()
    if row is None:
        return False
    claimed = session.execute(
        update(Audit).where(Audit.id == pick, _eligible_queued()).values(**_running(worker, now))
    )
    if not claimed.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        return False
    if holder is not None and holder.id != pick:
        # guarded by the holder's current task id: a concurrent swap or a re-send wins
        session.execute(
            update(Audit)
            .where(Audit.id == holder.id, Audit.state == "queued", Audit.task_id == holder.task_id)
            .values(task_id=row.task_id, enqueued_at=row.enqueued_at)
        )
    clear_results(session, pick)
    return True


def clear_results(session: Session, audit_id: str, *, parts: bool = True) -> None:
    """Delete an audit's result rows (and, at a new claim, the parts of an earlier attempt;
    the final write keeps the parts it was merged from)."""
    tables: tuple[Any, ...] = (ResultRow, VerdictRow, AuditArtifact)
    for table in (*tables, AuditPart) if parts else tables:
        session.execute(delete(table).where(table.audit_id == audit_id))


def exhausted_error(attempts: int, cap: int, worker: str | None) -> dict[str, Any]:
    return {
        "code": "attempts_exhausted",
        "message": (
            f"the worker running this audit was lost on each of {attempts} attempts (attempt "
            f"cap {cap}; last worker {worker or 'unknown'}); the audit may crash or exhaust "
            "its worker (memory, time limit)"
        ),
    }


def _finish_canceled(session: Session, audit_id: str) -> None:
    session.execute(
        update(Audit)
        .where(Audit.id == audit_id, Audit.state.not_in(FINAL_STATES))
        .values(state="canceled", finished_at=utcnow(), step="canceled")
    )


# ---------------------------------------------------------------------------------- owner


class Lost(Exception):
    """This worker no longer owns the audit (canceled, or taken over after a stale heartbeat)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Drained(Lost):
    """The worker is shutting down and its drain grace ran out: the audit (or part) was handed
    back (``handed_back``), or could not be (the database was down: the reconciler repairs it
    as it repairs a crash)."""

    def __init__(self, handed_back: bool) -> None:
        super().__init__("drained")
        self.handed_back = handed_back


class Drain:
    """A worker process's stop request: set once by SIGTERM with a deadline (monotonic clock),
    read by the :class:`Heartbeat` of the running audit. Plain attribute writes only, so a
    signal handler may call :meth:`request` whatever the interrupted thread holds."""

    def __init__(self) -> None:
        self.deadline: float | None = None

    def request(self, grace_s: float) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + max(0.0, grace_s)

    def reset(self) -> None:
        self.deadline = None

    @property
    def requested(self) -> bool:
        return self.deadline is not None

    def remaining_s(self) -> float | None:
        """Seconds of grace left (0 when it ran out), None when no stop was requested."""
        deadline = self.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def expired(self) -> bool:
        return self.remaining_s() == 0.0


# the stop request of this process (a worker's pool child): SIGTERM sets it (workers/tasks.py)
WORKER_DRAIN = Drain()


def hand_back(db: Database, audit_id: str, worker: str) -> bool:
    """Return an audit that ``worker`` is running to the queue because the worker shuts down:
    the claim's attempt is not counted, the partial results (and parts) are cleared as a new
    claim would, and the step says ``handed_back``. False when ``worker`` no longer owns it.
    The caller sends the audit's task again (else the reconciler does, as for a lost message)."""
    with db.session() as session:
        handed = session.execute(
            update(Audit)
            .where(Audit.id == audit_id, Audit.state == "running", Audit.worker == worker)
            .values(
                state="queued",
                attempts=case((Audit.attempts > 0, Audit.attempts - 1), else_=0),
                progress=0.0,
                step=f"handed_back: worker {worker} shut down; queued again, attempt not counted"[
                    :300
                ],
                heartbeat_at=None,
                error=None,
            )
        )
        if not handed.rowcount:  # type: ignore[attr-defined]
            return False
        clear_results(session, audit_id)
    log.info("audit %s handed back by %s (shutting down)", audit_id, worker)
    return True


@dataclass
class Ownership:
    """What a running attempt writes: heartbeats, progress, and its end state, each guarded by
    ``worker`` so an attempt that was superseded cannot overwrite its successor."""

    db: Database
    audit_id: str
    worker: str
    # sends the audit's task again after a hand-back (None: the reconciler will)
    enqueue: Enqueuer | None = None

    @property
    def label(self) -> str:
        return self.audit_id

    def hand_back(self) -> bool:
        """:func:`hand_back` this attempt and send the audit's task again."""
        if not hand_back(self.db, self.audit_id, self.worker):
            return False
        if self.enqueue is not None:
            self.enqueue(self.db, self.audit_id)
        return True

    def _owned(self) -> Any:
        return and_(
            Audit.id == self.audit_id, Audit.state == "running", Audit.worker == self.worker
        )

    def heartbeat(self, progress: float | None = None, step: str | None = None) -> None:
        """Raises :class:`Lost` when the audit was canceled or taken away."""
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if progress is not None:
            values["progress"] = max(0.0, min(1.0, progress))
        if step is not None:
            values["step"] = step[:300]
        with self.db.session() as session:
            result = session.execute(update(Audit).where(self._owned()).values(**values))
            if not result.rowcount:  # type: ignore[attr-defined]
                raise Lost("the audit is no longer owned by this worker")
            canceled = session.scalar(select(Audit.cancel_requested).where(self._owned()))
        if canceled:
            raise Lost("canceled")

    def finish_canceled(self) -> None:
        with self.db.session() as session:
            session.execute(
                update(Audit)
                .where(self._owned())
                .values(state="canceled", finished_at=utcnow(), step="canceled")
            )

    def fail(self, error: dict[str, Any]) -> None:
        with self.db.session() as session:
            session.execute(
                update(Audit)
                .where(self._owned())
                .values(state="failed", finished_at=utcnow(), step="failed", error=error)
            )

    def succeed(self, write_results: Callable[[Session], dict[str, Any]]) -> bool:
        """Write the results and mark the audit succeeded in one transaction, only if this
        attempt still owns it. ``write_results`` adds the rows and returns the audit columns to
        set (report sha, verdict summary)."""
        with self.db.session() as session:
            owned = session.scalar(select(Audit.id).where(self._owned()).with_for_update())
            if owned is None:
                return False
            clear_results(session, self.audit_id, parts=False)
            values = write_results(session)
            session.execute(
                update(Audit)
                .where(self._owned())
                .values(
                    state="succeeded",
                    progress=1.0,
                    step="done",
                    finished_at=utcnow(),
                    heartbeat_at=utcnow(),
                    **values,
                )
            )
        return True


# ---------------------------------------------------------------------------------- heartbeat


class Lease(Protocol):
    """A claim that lives as long as it is renewed: an audit's (:class:`Ownership`) or a
    part's (:class:`PartLease`)."""

    @property
    def label(self) -> str: ...

    def heartbeat(self, progress: float | None = None, step: str | None = None) -> None:
        """Renew the claim (and record the progress); raises :class:`Lost` when it is gone."""
        ...

    def hand_back(self) -> bool:
        """Give the claim up for another worker, uncounted; False when it was already gone."""
        ...


class Heartbeat(threading.Thread):
    """Renews a lease every ``interval_s``, with the latest progress, so a long engine step
    that reports no progress still shows its worker alive; notes when the lease is lost, which
    the next :meth:`progress` call raises into the computation.

    With ``write_progress_every_s`` the progress reported is also written at once (at most that
    often), so the API shows it before the next beat. When the worker's ``drain`` grace runs out
    the lease is handed back (by this thread, so even a long step without progress reports is
    handed back in time, or by the next progress report, whichever comes first) and
    :class:`Drained` is raised at the next :meth:`progress`. Used as a context manager: the
    thread runs inside the ``with`` block."""

    def __init__(
        self,
        lease: Lease,
        interval_s: float,
        write_progress_every_s: float | None = None,
        drain: Drain = WORKER_DRAIN,
    ) -> None:
        super().__init__(name=f"heartbeat-{lease.label}", daemon=True)
        self.lease = lease
        self.interval_s = interval_s
        self.write_progress_every_s = write_progress_every_s
        self.drain = drain
        self.stop = threading.Event()
        self.lost: Lost | None = None
        self.latest: tuple[float, str] | None = None
        self._written_at = -math.inf  # the first progress report is written at once
        self._hand_back_lock = threading.Lock()

    def __enter__(self) -> Heartbeat:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(timeout=10)

    def _next_wait_s(self) -> float:
        remaining = self.drain.remaining_s()
        return self.interval_s if remaining is None else min(self.interval_s, remaining)

    def run(self) -> None:
        while not self.stop.wait(self._next_wait_s()):
            if self.drain.expired():
                self.hand_back()
                return
            try:
                latest = self.latest
                if latest is None:
                    self.lease.heartbeat()
                else:
                    self.lease.heartbeat(*latest)
            except Lost as exc:
                self.lost = exc
                return
            except Exception as exc:  # the database may blip; the next beat retries
                log.warning("heartbeat for %s failed: %s", self.lease.label, exc)

    def hand_back(self) -> None:
        """Give the lease back once (the drain grace ran out); :meth:`progress` raises the
        outcome."""
        with self._hand_back_lock:
            if self.lost is not None:
                return
            try:
                handed = self.lease.hand_back()
            except Exception as exc:  # the database is down: the reconciler repairs it later
                log.warning("could not hand %s back: %s", self.lease.label, exc)
                self.lost = Drained(handed_back=False)
                return
            # not handed back: it was taken away or canceled meanwhile, no longer ours anyway
            self.lost = Drained(True) if handed else Lost("the lease was gone at the hand-back")

    def progress(self, fraction: float, step: str) -> None:
        """The engine's progress callback: raises :class:`Lost` once the lease is gone, and
        :class:`Drained` once it was handed back."""
        if self.lost is None and self.drain.expired():
            self.hand_back()
        if self.lost is not None:
            raise self.lost
        self.latest = (fraction, step)
        if self.write_progress_every_s is None:
            return
        now = time.monotonic()
        if now - self._written_at >= self.write_progress_every_s:
            self._written_at = now
            try:
                self.lease.heartbeat(fraction, step)
            except DATABASE_DOWN as exc:
                # the heartbeat thread keeps trying; the computation need not stop for it
                log.warning("progress of %s not written: %s", self.lease.label, exc)


# ---------------------------------------------------------------------------------- parts


class PartState(NamedTuple):
    state: str
    progress: float | None
    result_sha256: str | None


def _audit_live(audit_id: str) -> Any:
    return and_(Audit.id == audit_id, Audit.state == "running", Audit.cancel_requested.is_(False))


def create_parts(
    db: Database, tenant_id: str, audit_id: str, groups: Sequence[Sequence[str]]
) -> None:
    """One queued ``audit_parts`` row per group of methods."""
    with db.session() as session:
        for position, methods in enumerate(groups):
            session.add(
                AuditPart(
                    tenant_id=tenant_id,
                    audit_id=audit_id,
                    part_index=position,
                    methods=list(methods),
                    state="queued",
                )
            )


def claim_part(db: Database, audit_id: str, worker: str, config: Config) -> int | None:
    """Take one part of a running audit: queued, or running with a stale heartbeat."""
    stale = _stale_before(config, utcnow())
    with db.session() as session:
        if session.scalar(select(Audit.id).where(_audit_live(audit_id))) is None:
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
            if result.rowcount:  # type: ignore[attr-defined]
                return int(index)
    return None


def part_states(db: Database, audit_id: str) -> list[PartState]:
    """Every part of the audit, in order."""
    with db.session() as session:
        rows = session.execute(
            select(AuditPart.state, AuditPart.progress, AuditPart.result_sha256)
            .where(AuditPart.audit_id == audit_id)
            .order_by(AuditPart.part_index)
        ).all()
    return [PartState(*row) for row in rows]


@dataclass
class PartLease:
    """A claimed part: its heartbeat (lost when the audit stops running or another worker took
    the part over) and its end, each guarded by ``worker`` like :class:`Ownership`."""

    db: Database
    audit_id: str
    index: int
    worker: str

    @property
    def label(self) -> str:
        return f"{self.audit_id} part {self.index}"

    def _owned(self) -> Any:
        return and_(
            AuditPart.audit_id == self.audit_id,
            AuditPart.part_index == self.index,
            AuditPart.worker == self.worker,
            AuditPart.state == "running",
        )

    def methods(self) -> list[str]:
        with self.db.session() as session:
            methods = session.scalar(
                select(AuditPart.methods).where(
                    AuditPart.audit_id == self.audit_id, AuditPart.part_index == self.index
                )
            )
        return list(methods or [])

    def heartbeat(self, progress: float | None = None, step: str | None = None) -> None:
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if progress is not None:
            values["progress"] = progress
        with self.db.session() as session:
            written = session.execute(update(AuditPart).where(self._owned()).values(**values))
            live = session.scalar(select(Audit.id).where(_audit_live(self.audit_id)))
        if not written.rowcount or live is None:  # type: ignore[attr-defined]
            raise Lost("the audit or the part is no longer this worker's to compute")

    def hand_back(self) -> bool:
        """Queue the part again for any worker (this one is shutting down)."""
        with self.db.session() as session:
            handed = session.execute(
                update(AuditPart)
                .where(self._owned())
                .values(state="queued", worker=None, heartbeat_at=None, progress=0.0)
            )
        return bool(handed.rowcount)  # type: ignore[attr-defined]

    def finish(self, result_sha256: str) -> bool:
        """Mark the part done with its stored result; False when it was taken away."""
        with self.db.session() as session:
            done = session.execute(
                update(AuditPart)
                .where(self._owned())
                .values(
                    state="done", result_sha256=result_sha256, progress=1.0, heartbeat_at=utcnow()
                )
            )
        return bool(done.rowcount)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------- runtime


@dataclass(frozen=True)
class Runtime:
    """What a worker process works with: the configuration, the database, the artifact store
    and the enqueuer for follow-up tasks and parts (the API's ``State`` holds the same)."""

    config: Config
    db: Database
    store: ArtifactStore
    enqueue: Enqueuer

    @classmethod
    def from_config(cls, config: Config, celery_app: Any | None = None) -> Runtime:
        return cls(
            config,
            Database.from_config(config),
            ArtifactStore(config.resolved_artifact_dir),
            Enqueuer(config, celery_app),
        )


# ---------------------------------------------------------------------------------- reconcile


@dataclass
class ReconcileReport:
    requeued_lost_messages: list[str] = field(default_factory=list)
    requeued_stale: list[str] = field(default_factory=list)
    failed_exhausted: list[str] = field(default_factory=list)
    canceled: list[str] = field(default_factory=list)
    # re-queued in the database but not sent: the broker is down; the next pass retries
    enqueue_failed: list[str] = field(default_factory=list)
    # finished audits whose report render or webhook message was lost, sent again
    follow_ups_resent: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return {
            "requeued_lost_messages": self.requeued_lost_messages,
            "requeued_stale": self.requeued_stale,
            "failed_exhausted": self.failed_exhausted,
            "canceled": self.canceled,
            "enqueue_failed": self.enqueue_failed,
            "follow_ups_resent": self.follow_ups_resent,
        }


def reconcile(db: Database, enqueue: Enqueuer, broker: BrokerProbe) -> ReconcileReport:
    """One pass: repair running audits whose worker died and queued audits whose broker
    message is gone. ``broker`` answers which task ids it holds, or None when the broker
    cannot be asked (then a queued audit is re-sent once it is ``requeue_after_s`` old; a
    duplicate message is harmless)."""
    config = enqueue.config
    now = utcnow()
    report = ReconcileReport()
    to_enqueue: list[str] = []
    with db.session() as session:
        stale = session.scalars(
            select(Audit).where(
                Audit.state == "running",
                or_(
                    Audit.heartbeat_at < _stale_before(config, now),
                    Audit.heartbeat_at.is_(None),
                ),
            )
        ).all()
        for audit in stale:
            guard = and_(
                Audit.id == audit.id,
                Audit.state == "running",
                Audit.worker == audit.worker,
                or_(Audit.heartbeat_at == audit.heartbeat_at, Audit.heartbeat_at.is_(None)),
            )
            if audit.cancel_requested:
                values: dict[str, Any] = {"state": "canceled", "finished_at": now}
                bucket = report.canceled
            elif audit.attempts >= config.max_attempts:
                values = {
                    "state": "failed",
                    "finished_at": now,
                    "step": "failed",
                    "error": exhausted_error(audit.attempts, config.max_attempts, audit.worker),
                }
                bucket = report.failed_exhausted
            else:
                values = {
                    "state": "queued",
                    "step": f"re-queued: worker {audit.worker} stopped sending heartbeats",
                    "progress": 0.0,
                }
                bucket = report.requeued_stale
            if session.execute(update(Audit).where(guard).values(**values)).rowcount:  # type: ignore[attr-defined]
                bucket.append(audit.id)
                if values["state"] == "queued":
                    to_enqueue.append(audit.id)
        old = now - timedelta(seconds=config.requeue_after_s)
        queued = session.scalars(
            select(Audit).where(
                Audit.state == "queued",
                Audit.id.not_in(to_enqueue),
                or_(Audit.enqueued_at.is_(None), Audit.enqueued_at < old),
                Audit.created_at < old,
            )
        ).all()
        present_ids = broker.task_ids() if queued else set()
        for audit in queued:
            if audit.cancel_requested:
                _finish_canceled(session, audit.id)
                report.canceled.append(audit.id)
                continue
            present = (
                None
                if present_ids is None
                else bool(audit.task_id) and audit.task_id in present_ids
            )
            if present:
                continue
            to_enqueue.append(audit.id)
            report.requeued_lost_messages.append(audit.id)
    for audit_id in to_enqueue:
        if not enqueue(db, audit_id):
            report.enqueue_failed.append(audit_id)
    for audit_id in report.failed_exhausted + report.canceled:
        announce_finished(db, enqueue, audit_id)
    with db.session() as session:
        lost = session.scalars(
            select(Audit.id).where(
                Audit.state.in_(FINAL_STATES),
                Audit.finished_at < now - timedelta(seconds=FOLLOW_UP_LOST_AFTER_S),
                or_(Audit.documents_state == "pending", Audit.webhook_state == "pending"),
            )
        ).all()
    for audit_id in lost:
        announce_finished(db, enqueue, audit_id)
        report.follow_ups_resent.append(audit_id)
    if any(report.to_dict().values()):
        log.info("reconciler: %s", json.dumps(report.to_dict()))
    return report


# ---------------------------------------------------------------------------------- broker


def redis_queue_keys(queue: str) -> list[str]:
    """kombu's Redis transport keeps a list per queue and priority step (0 is the bare name)."""
    return [queue, *(f"{queue}\x06\x16{p}" for p in (3, 6, 9))]


def _message_task_id(raw: bytes | str) -> str | None:
    """The Celery task id of one kombu message (its ``headers.id``), or None."""
    try:
        message = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if isinstance(message, list) and message:  # Redis' unacked hash: [message, exchange, key]
        message = message[0]
    if not isinstance(message, dict):
        return None
    task_id = (message.get("headers") or {}).get("id") or (message.get("properties") or {}).get(
        "correlation_id"
    )
    return str(task_id) if task_id else None


class BrokerProbe:
    """Which task ids the broker still holds, waiting or delivered but unacknowledged. Knows
    Redis and the embedded SQLAlchemy transport; elsewhere it cannot tell (None).

    :meth:`task_ids` reads the broker once, so a reconciler pass costs one scan of the queue
    whatever the number of queued audits; calling the probe with one id is the same test."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.url = config.resolved_broker_url
        self._engine: Any = None

    def task_ids(self) -> set[str] | None:
        if self.url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(self.url, socket_timeout=5)
            try:
                raws = [
                    raw
                    for key in redis_queue_keys(self.config.queue)
                    for raw in client.lrange(key, 0, -1)
                ]
                raws += client.hvals("unacked")
            except redis.RedisError:
                return None
            finally:
                client.close()
        elif self.url.startswith("sqla+"):
            from sqlalchemy import create_engine, text

            if self._engine is None:
                self._engine = create_engine(self.url[len("sqla+") :])
            try:
                with self._engine.connect() as conn:
                    raws = list(
                        conn.execute(
                            text("SELECT payload FROM kombu_message WHERE visible = :v"),
                            {"v": True},
                        ).scalars()
                    )
            except Exception:  # no table yet: nothing was ever sent
                return set()
        else:
            return None
        return {task_id for raw in raws if (task_id := _message_task_id(raw)) is not None}

    def __call__(self, task_id: str) -> bool | None:
        ids = self.task_ids()
        return None if ids is None else task_id in ids


def broker_probe(config: Config) -> BrokerProbe:
    return BrokerProbe(config)


def broker_ping(config: Config) -> None:
    """Raises when the broker cannot be reached (for ``/readyz``)."""
    url = config.resolved_broker_url
    if url.startswith(("redis://", "rediss://")):
        import redis

        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
    elif url.startswith("sqla+"):
        from sqlalchemy import create_engine, text

        engine = create_engine(url[len("sqla+") :])
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            engine.dispose()
    else:
        from kombu import Connection

        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
