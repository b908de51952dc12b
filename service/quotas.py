"""Per-tenant quotas: queued audits, stored bytes and the request rate.

Each refusal is a problem+json the client can act on: ``429 too_many_audits`` and
``429 rate_limited`` carry ``Retry-After``; ``507 storage_quota_exceeded`` carries the usage and
the limit (it lasts until the tenant deletes something, so no ``Retry-After``). The running-audit
cap is not checked here: a tenant at its cap is skipped by the workers' fair claim
(:func:`saliency_audit.service.jobs.claim_next`), so its audits wait instead of being refused.

The rate limiter is a token bucket per tenant. With a Redis broker URL the buckets live in Redis
(one Lua script per request, atomic, shared by every API process); otherwise they are kept in
this process (embedded mode has one API process).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .config import Config
from .models import Audit, DatasetRecord, ModelRecord
from .problems import ApiError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- audits


def check_queued_audits(session: Session, config: Config, tenant_id: str) -> None:
    """Refuse a new audit (429 ``too_many_audits``) while the tenant has its cap of queued
    audits waiting."""
    limit = config.max_queued_audits_per_tenant
    if not limit:
        return
    waiting = select(Audit.id).where(Audit.tenant_id == tenant_id, Audit.state == "queued")
    queued = session.scalar(select(func.count()).select_from(waiting.subquery()))
    if (queued or 0) >= limit:
        raise ApiError(
            429,
            "too_many_audits",
            f"this tenant has {queued} queued audits, the limit is {limit}; submit again once "
            "some have started",
            retry_after_s=config.queue_full_retry_after_s,
            queued=int(queued or 0),
            limit=limit,
        )


# ---------------------------------------------------------------------------------- storage


def stored_bytes(session: Session, tenant_id: str) -> int:
    """What a tenant keeps in the artifact store through its uploads: the sizes of its live
    models and datasets (a dataset counts its archive). Tombstones (deleted rows) no longer hold
    files. Audit outputs are not counted: they are bounded by the audits a tenant may run."""
    total = 0
    for record in (ModelRecord, DatasetRecord):
        sizes = session.scalars(
            select(record.size_bytes).where(
                record.tenant_id == tenant_id, record.deleted_at.is_(None)
            )
        ).all()
        total += sum(sizes)
    return int(total)


def check_stored_bytes(session: Session, config: Config, tenant_id: str, incoming: int) -> None:
    """Refuse an upload (507 ``storage_quota_exceeded``) that would take the tenant past its
    stored-bytes limit."""
    limit = config.max_stored_bytes_per_tenant
    if not limit:
        return
    used = stored_bytes(session, tenant_id)
    if used + incoming > limit:
        raise ApiError(
            507,
            "storage_quota_exceeded",
            f"this upload ({incoming} bytes) would take the tenant's stored bytes from {used} "
            f"past its limit of {limit}; delete models or datasets to make room",
            used_bytes=used,
            limit_bytes=limit,
            upload_bytes=incoming,
        )


# ---------------------------------------------------------------------------------- rate


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float


class LocalBuckets:
    """Token buckets in this process (embedded mode, or no Redis configured)."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> Decision:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return Decision(True, 0.0)
            self._buckets[key] = (tokens, now)
        return Decision(False, (1.0 - tokens) / self.rate_per_s)


# KEYS[1]: the bucket; ARGV: rate per second, burst. The server's clock, so API processes on
# hosts with skewed clocks share one bucket correctly. Returns {allowed, wait seconds as text}
# (Lua numbers become integers on the way out).
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(wait)}
"""


class RedisBuckets:
    """Token buckets in Redis, shared by every API process. When Redis cannot be reached the
    request is let through and a warning logged: the limiter protects the service, and an
    outage of it must not become an outage of the API."""

    def __init__(self, url: str, rate_per_s: float, burst: int) -> None:
        import redis

        self.rate_per_s = rate_per_s
        self.burst = burst
        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._script = self._client.register_script(TOKEN_BUCKET_LUA)

    def take(self, key: str) -> Decision:
        import redis

        try:
            allowed, wait = self._script(
                keys=[f"saliency-audit:rate:{key}"], args=[self.rate_per_s, self.burst]
            )
        except redis.RedisError as exc:
            log.warning("rate limiter: Redis unreachable, request let through: %s", exc)
            return Decision(True, 0.0)
        return Decision(bool(int(allowed)), float(wait))


class RateLimiter:
    """``check(tenant_id)`` raises 429 ``rate_limited`` when the tenant's bucket is empty."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.buckets: LocalBuckets | RedisBuckets | None = None
        if config.rate_limit_per_s > 0:
            url = config.resolved_broker_url
            if url.startswith(("redis://", "rediss://")):
                self.buckets = RedisBuckets(url, config.rate_limit_per_s, config.rate_limit_burst)
            else:
                self.buckets = LocalBuckets(config.rate_limit_per_s, config.rate_limit_burst)

    def check(self, tenant_id: str) -> None:
        if self.buckets is None:
            return
        decision = self.buckets.take(tenant_id)
        if decision.allowed:
            return
        raise ApiError(
            429,
            "rate_limited",
            f"more than {self.config.rate_limit_burst} requests in a burst or "
            f"{self.config.rate_limit_per_s:g} per second on average; retry after Retry-After",
            retry_after_s=max(1, math.ceil(decision.retry_after_s)),
            limit_per_s=self.config.rate_limit_per_s,
            burst=self.config.rate_limit_burst,
        )
