"""The one configuration object of the service, the workers and the CLI.

Everything comes from the environment with the prefix ``SALIENCY_AUDIT_`` (plus the two names
every deployment tool already speaks: ``DATABASE_URL`` and ``BROKER_URL``). With nothing set,
the service runs *embedded*: a SQLite file database, an artifact folder and a broker that needs
no server (Celery's SQLAlchemy transport on a second SQLite file), all under one data folder in
the working directory. Setting ``DATABASE_URL`` to Postgres and ``BROKER_URL`` to Redis gives
the production shape with no code change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

PREFIX = "SALIENCY_AUDIT_"
MiB = 1024 * 1024
# after the drain grace: writing the hand-back, re-enqueueing and exiting (seconds)
DRAIN_EXIT_MARGIN_S = 20.0


class ConfigError(ValueError):
    """A setting in the environment cannot be parsed."""


@dataclass(frozen=True)
class Config:
    data_dir: Path = Path("saliency-audit-data")
    # None: derived from data_dir (embedded mode)
    database_url: str | None = None
    broker_url: str | None = None
    artifact_dir: Path | None = None
    queue: str = "gpu"
    # reports (PDF, HTML) and webhook deliveries run here, on CPU workers
    cpu_queue: str = "cpu"
    # upload limits
    max_model_bytes: int = 2048 * MiB
    max_dataset_bytes: int = 2048 * MiB
    max_request_bytes: int = 2100 * MiB
    # every other body (JSON requests): the largest audit request with a full policy document
    # is a few KiB; 1 MiB leaves room and keeps a parse from costing the API real memory
    max_json_bytes: int = 1 * MiB
    # the cost estimate of an audit (workers/engine/contract/cost.py): refused at submit above
    # this many estimated worker seconds (default: the worker's soft time limit, 3 h)
    max_audit_cost_s: float = 3 * 3600.0
    # the estimate's price: seconds of one forward + backward row per megapixel of input
    # (forward rows cost a third); bench/RESULTS.md on the 2-core CPU: resnet18 at 224 px,
    # 3.4-4.0 s per 32-row pass = 2.3 s per row-megapixel (the small ResNet at 32 px: 0.7).
    # A GPU worker is 20-50x faster: set it from the worker's own bench numbers.
    cost_fb_s_per_row_megapixel: float = 2.5
    # job lifecycle (seconds)
    soft_time_limit_s: int = 3 * 3600
    hard_time_limit_s: int = 3 * 3600 + 300
    heartbeat_interval_s: float = 5.0
    heartbeat_stale_s: float = 120.0
    # a queued audit whose message is not in the broker is re-enqueued once it is this old
    requeue_after_s: float = 30.0
    max_attempts: int = 3
    # SIGTERM drains a worker: it stops taking messages and lets its running audit finish for up
    # to this long, then hands the audit back (queued again, the attempt not counted). A process
    # manager must wait ``shutdown_grace_s`` before it kills the worker (docs/service.md)
    drain_grace_s: float = 600.0
    # split an audit's method families into this many parts that any worker can compute
    # (workers/parts.py); 1 runs every audit in one piece
    audit_parts: int = 1
    reconcile_interval_s: float = 30.0
    # run the reconciler inside the API process (embedded mode turns it on)
    reconcile_in_api: bool | None = None
    page_size_max: int = 100
    # webhooks: attempts with exponential backoff (backoff_s, 2 x, 4 x, ...), each with a timeout
    webhook_max_attempts: int = 6
    webhook_backoff_s: float = 2.0
    webhook_timeout_s: float = 10.0
    # deliver to loopback and private addresses too (off: a tenant must not reach the
    # service's own network through it)
    webhook_allow_private: bool = False
    # tenant quotas (docs/service.md, "Quotas and fair scheduling"); 0 = unlimited
    max_queued_audits_per_tenant: int = 1000
    # a tenant with this many running audits is skipped by the fair claim (its audits wait)
    max_running_audits_per_tenant: int = 0
    # a token bucket per tenant: refilled at rate_limit_per_s, holding up to rate_limit_burst
    rate_limit_per_s: float = 100.0
    rate_limit_burst: int = 1000
    # bytes of live models, datasets and audit artifacts per tenant
    max_stored_bytes_per_tenant: int = 100 * 1024 * MiB
    # Retry-After of a refused submit (too many queued audits)
    queue_full_retry_after_s: int = 30
    log_level: str = "INFO"

    @property
    def embedded(self) -> bool:
        """No database and no broker configured: everything lives in ``data_dir``."""
        return self.database_url is None and self.broker_url is None

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return normalize_database_url(self.database_url)
        return f"sqlite:///{(self.data_dir / 'saliency-audit.sqlite').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.data_dir / "artifacts").resolve()

    @property
    def run_reconciler_in_api(self) -> bool:
        return self.embedded if self.reconcile_in_api is None else self.reconcile_in_api

    @property
    def broker_visibility_timeout_s(self) -> int:
        """Redis redelivers an unacknowledged message after this long: it must outlast the
        longest audit (the hard time limit) or a running audit would be delivered twice."""
        return self.hard_time_limit_s + 600

    @property
    def shutdown_grace_s(self) -> float:
        """How long a worker may take to exit after SIGTERM: the drain grace, plus up to one
        heartbeat interval for the hand-back to be noticed, plus time to write it and exit. The
        Kubernetes ``terminationGracePeriodSeconds`` and compose ``stop_grace_period`` of the
        workers must be at least this."""
        return self.drain_grace_s + self.heartbeat_interval_s + DRAIN_EXIT_MARGIN_S

    def __post_init__(self) -> None:
        if self.hard_time_limit_s <= self.soft_time_limit_s:
            raise ConfigError("hard_time_limit_s must be greater than soft_time_limit_s")
        if self.heartbeat_stale_s <= 2 * self.heartbeat_interval_s:
            raise ConfigError("heartbeat_stale_s must exceed twice heartbeat_interval_s")
        if self.max_attempts < 1:
            raise ConfigError("max_attempts must be >= 1")
        if self.drain_grace_s < 0:
            raise ConfigError("drain_grace_s must be >= 0")
        if self.audit_parts < 1:
            raise ConfigError("audit_parts must be >= 1")
        for name in (
            "max_queued_audits_per_tenant",
            "max_running_audits_per_tenant",
            "rate_limit_per_s",
            "rate_limit_burst",
            "max_stored_bytes_per_tenant",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: unlimited)")
        if self.rate_limit_per_s > 0 and self.rate_limit_burst < 1:
            raise ConfigError("rate_limit_burst must be >= 1 when rate_limit_per_s is set")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None and f.name in ("database_url", "broker_url"):
                raw = env.get(f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw, f.type)
        values.update(overrides)
        return cls(**values)

    def with_overrides(self, **changes: Any) -> Config:
        return replace(self, **changes)


def _parse(name: str, raw: str, type_: Any) -> Any:
    text = str(type_)
    try:
        if "bool" in text:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if "Path" in text:
            return Path(raw)
        if text == "int":
            return int(raw)
        if text == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name.upper()}={raw!r} is not a valid {text}") from None
    return raw


def normalize_database_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` (what Heroku-style tools hand out) use psycopg 3."""
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url
