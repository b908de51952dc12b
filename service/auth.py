"""API keys and tenants.

A key looks like ``sak_<prefix>_<secret>``. The prefix is public and indexes the row; the row
stores the sha256 of the whole key, compared in constant time. Keys are high-entropy random
strings (256 bits of secret), so a plain sha256 is the right hash: a slow password hash would
only slow every request down. A key is printed once, at creation, and never stored in clear.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from flask import g, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import ApiKey, Tenant, utcnow
from .problems import ApiError

KEY_SCHEME = "sak"
_DUMMY_SHA = hashlib.sha256(b"no such key").hexdigest()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant_name: str, label: str | None = None) -> tuple[str, Tenant]:
    """Create the tenant if it does not exist and a new key for it; returns the key in clear."""
    tenant = session.scalars(select(Tenant).where(Tenant.name == tenant_name)).one_or_none()
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    prefix = secrets.token_hex(6)
    key = f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(tenant_id=tenant.id, prefix=prefix, key_sha256=hash_key(key), label=label))
    return key, tenant


def revoke_key(session: Session, prefix: str) -> bool:
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    return True


def tenant_for_key(session: Session, key: str) -> str | None:
    """The tenant id a valid, unrevoked key belongs to, else None."""
    parts = key.split("_", 2)
    prefix = parts[1] if len(parts) == 3 and parts[0] == KEY_SCHEME else ""
    row = (
        session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()
        if prefix
        else None
    )
    # compare even when there is no row, so a miss costs what a hit costs
    expected = row.key_sha256 if row is not None else _DUMMY_SHA
    matches = hmac.compare_digest(hash_key(key), expected)
    if row is None or not matches or row.revoked_at is not None:
        return None
    return row.tenant_id


def require_tenant(session: Session) -> str:
    """Authenticate the request (``Authorization: Bearer KEY``); sets and returns g.tenant_id."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(
            401,
            "unauthenticated",
            "send an API key as 'Authorization: Bearer KEY' (create one with "
            "'saliency-audit keys create --tenant NAME')",
        )
    tenant_id = tenant_for_key(session, key.strip())
    if tenant_id is None:
        raise ApiError(401, "invalid_key", "the API key is unknown or revoked")
    g.tenant_id = tenant_id
    return tenant_id
