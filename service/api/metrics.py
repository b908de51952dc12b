"""``/metrics``: Prometheus text format (exposition format 0.0.4), computed from the database
and the broker at scrape time.

Every API process answers the same numbers (they come from shared state, not from per-process
counters), so a scrape behind a load balancer is consistent. Only aggregates across tenants are
exposed: no ids, no names.
"""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, Response
from sqlalchemy import func, select

from ..app import state
from ..config import Config
from ..jobs import redis_queue_keys
from ..models import AUDIT_STATES, Audit, utcnow

bp = Blueprint("metrics", __name__)

DURATION_BUCKETS_S = (10, 30, 60, 120, 300, 600, 1800, 3600, 10800)


def _line(name: str, value: float, labels: dict[str, str] | None = None) -> str:
    if labels:
        inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        return f"{name}{{{inner}}} {value:g}"
    return f"{name} {value:g}"


def _family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def queue_depth(config: Config, queue: str) -> float | None:
    """Messages waiting in a queue (not counting delivered, unacknowledged ones)."""
    url = config.resolved_broker_url
    try:
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
            return float(sum(int(client.llen(k)) for k in redis_queue_keys(queue)))
        if url.startswith("sqla+"):
            from sqlalchemy import create_engine, text

            engine = create_engine(url[len("sqla+") :])
            try:
                with engine.connect() as conn:
                    count = conn.execute(
                        text(
                            "SELECT COUNT(*) FROM kombu_message m JOIN kombu_queue q "
                            "ON m.queue_id = q.id WHERE q.name = :q AND m.visible = :v"
                        ),
                        {"q": queue, "v": True},
                    ).scalar()
            finally:
                engine.dispose()
            return float(count or 0)
    except Exception:
        return None
    return None


@bp.get("/metrics")
def metrics() -> Response:
    st = state()
    config = st.config
    now = utcnow()
    stale = now - timedelta(seconds=config.heartbeat_stale_s)
    lines: list[str] = []
    with st.db.session() as session:
        by_state = dict(
            session.execute(select(Audit.state, func.count()).group_by(Audit.state)).all()
        )
        finished = session.execute(
            select(Audit.started_at, Audit.finished_at).where(
                Audit.state == "succeeded", Audit.started_at.is_not(None)
            )
        ).all()
        running = session.execute(
            select(Audit.worker, Audit.heartbeat_at).where(Audit.state == "running")
        ).all()
        attempts = session.scalar(select(func.coalesce(func.sum(Audit.attempts), 0)))
    lines += _family(
        "saliency_audit_audits",
        "gauge",
        "Audits by state.",
        [_line("saliency_audit_audits", by_state.get(s, 0), {"state": s}) for s in AUDIT_STATES],
    )
    durations = [(f - s).total_seconds() for s, f in finished if s is not None and f is not None]
    buckets = [
        _line(
            "saliency_audit_audit_duration_seconds_bucket",
            sum(d <= b for d in durations),
            {"le": str(b)},
        )
        for b in DURATION_BUCKETS_S
    ]
    buckets.append(
        _line("saliency_audit_audit_duration_seconds_bucket", len(durations), {"le": "+Inf"})
    )
    lines += _family(
        "saliency_audit_audit_duration_seconds",
        "histogram",
        "Wall time of succeeded audits, from the claim of the successful attempt to the end.",
        [
            *buckets,
            _line("saliency_audit_audit_duration_seconds_sum", sum(durations)),
            _line("saliency_audit_audit_duration_seconds_count", len(durations)),
        ],
    )
    lines += _family(
        "saliency_audit_attempts",
        "counter",
        "Claims of audits by workers, all attempts counted.",
        [_line("saliency_audit_attempts_total", float(attempts or 0))],
    )
    depth_samples = []
    for queue in (config.queue, config.cpu_queue):
        depth = queue_depth(config, queue)
        if depth is not None:
            depth_samples.append(_line("saliency_audit_queue_depth", depth, {"queue": queue}))
    lines += _family(
        "saliency_audit_queue_depth", "gauge", "Messages waiting in a broker queue.", depth_samples
    )
    ages = [(now - hb).total_seconds() for _, hb in running if hb is not None]
    live_workers = {w for w, hb in running if hb is not None and hb >= stale}
    lines += _family(
        "saliency_audit_heartbeat_age_seconds",
        "gauge",
        "Age of the oldest heartbeat among running audits (0 when none runs).",
        [_line("saliency_audit_heartbeat_age_seconds", max(ages, default=0.0))],
    )
    lines += _family(
        "saliency_audit_workers_busy",
        "gauge",
        "Worker processes running an audit with a fresh heartbeat.",
        [_line("saliency_audit_workers_busy", len(live_workers))],
    )
    lines += _family(
        "saliency_audit_running_stale",
        "gauge",
        "Running audits whose heartbeat is stale (the reconciler will queue them again).",
        [
            _line(
                "saliency_audit_running_stale",
                sum(1 for _, hb in running if hb is None or hb < stale),
            )
        ],
    )
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")
