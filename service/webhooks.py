"""Webhooks: a signed POST when an audit ends (succeeded, failed or canceled).

The body is JSON; the header ``Saliency-Audit-Signature: t=<unix seconds>,v1=<hex>`` carries
HMAC-SHA256 over ``"<t>.<body>"`` with the tenant's webhook secret (``saliency-audit keys
webhook-secret --tenant NAME`` shows it). A receiver recomputes the HMAC over the raw body,
compares in constant time and rejects old timestamps (see :func:`verify`). Delivery is at
least once: a non-2xx answer or a network error is retried with exponential backoff
(``webhook_backoff_s`` x 1, 2, 4, ...) up to ``webhook_max_attempts``; receivers deduplicate by
``delivery_id``.

URLs must be http(s). Unless ``webhook_allow_private`` is set, a URL whose host resolves to a
loopback, private, link-local or reserved address is refused at submission and again at
delivery (DNS can change in between), so a tenant cannot make the service call into its own
network.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
from typing import Any
from urllib.parse import urlsplit

SIGNATURE_HEADER = "Saliency-Audit-Signature"
MAX_URL = 2000


class WebhookUrlError(ValueError):
    pass


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, body: bytes, header: str, tolerance_s: float = 300.0) -> bool:
    """What a receiver does: check the signature and that the timestamp is recent."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def check_url(url: str, allow_private: bool) -> None:
    if len(url) > MAX_URL:
        raise WebhookUrlError(f"webhook_url is longer than {MAX_URL} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookUrlError("webhook_url must be an http or https URL with a host")
    if parts.username or parts.password:
        raise WebhookUrlError("webhook_url must not carry credentials")
    try:
        port = parts.port  # ValueError past 65535, when negative or not a number
    except ValueError:
        port = 0
    if port == 0:
        raise WebhookUrlError("webhook_url port must be a number in 1-65535")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise WebhookUrlError(
            f"webhook_url host {parts.hostname!r} does not resolve: {exc}"
        ) from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise WebhookUrlError(
                f"webhook_url host {parts.hostname!r} resolves to a non-public address "
                f"({address}); the service only calls public addresses"
            )


def payload(audit: Any) -> dict[str, Any]:
    """What a receiver gets: enough to act without another call, and the links to follow."""
    return {
        "event": "audit.finished",
        "delivery_id": f"{audit.id}:{audit.state}",
        "audit_id": audit.id,
        "state": audit.state,
        "model_id": audit.model_id,
        "dataset_id": audit.dataset_id,
        "verdict_summary": audit.verdict_summary,
        "error": audit.error,
        "finished_at": audit.finished_at.isoformat() if audit.finished_at else None,
        "links": {
            "audit": f"/v1/audits/{audit.id}",
            "report": f"/v1/audits/{audit.id}/report.json",
            "pdf": f"/v1/audits/{audit.id}/report.pdf",
        },
    }


def post(
    url: str, secret: str, body: dict[str, Any], timeout_s: float, allow_private: bool
) -> tuple[bool, str]:
    """One delivery attempt: (delivered, what happened)."""
    import requests

    try:
        check_url(url, allow_private)
    except WebhookUrlError as exc:
        return False, str(exc)
    raw = json.dumps(body, sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "saliency-audit-webhook",
        SIGNATURE_HEADER: sign(secret, raw, int(time.time())),
    }
    try:
        response = requests.post(
            url, data=raw, headers=headers, timeout=timeout_s, allow_redirects=False
        )
    except requests.RequestException as exc:
        return False, f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= response.status_code < 300:
        return True, f"HTTP {response.status_code}"
    return False, f"HTTP {response.status_code}"
