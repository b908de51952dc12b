"""Webhooks: a signed POST when an audit ends (succeeded, failed or canceled).

The body is JSON; the header ``Saliency-Audit-Signature: t=<unix seconds>,v1=<hex>`` carries
HMAC-SHA256 over ``"<t>.<body>"`` with the tenant's webhook secret (``saliency-audit keys
webhook-secret --tenant NAME`` shows it). A receiver recomputes the HMAC over the raw body,
compares in constant time and rejects old timestamps (see :func:`verify`). Delivery is at
least once: a non-2xx answer or a network error is retried with exponential backoff
(``webhook_backoff_s`` x 1, 2, 4, ...) up to ``webhook_max_attempts``; receivers deduplicate by
``delivery_id``.

URLs must be http(s) with a port in 1-65535 and no credentials. Unless
``webhook_allow_private`` is set, only public unicast addresses receive webhooks
(:func:`refusal` is the rule): the host is resolved at submission and again at delivery (DNS
can change in between), every address it resolves to must pass, and the delivery connects to
an address it checked instead of looking the name up again, so a tenant cannot make the
service call into its own network. Redirects are never followed.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import os
import re
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

SIGNATURE_HEADER = "Saliency-Audit-Signature"
MAX_URL = 2000
DEFAULT_PORTS = {"http": 80, "https": 443}
# what a host name may hold once IDNA-encoded (underscores: names some DNS zones do serve)
HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
Net4 = ipaddress.IPv4Network
Net6 = ipaddress.IPv6Network


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


# ---------------------------------------------------------------------------------------------
# Which addresses may receive a webhook


def _low_32(address: IPv6) -> tuple[IPv4, ...]:
    return (IPv4(int(address) & 0xFFFFFFFF),)


def _six_to_four(address: IPv6) -> tuple[IPv4, ...]:
    return (address.sixtofour,) if address.sixtofour is not None else ()


def _teredo(address: IPv6) -> tuple[IPv4, ...]:
    # (server, client); ipaddress already undoes the xor of the client address
    return address.teredo or ()


# IPv6 forms that carry an IPv4 address: a packet to them reaches that IPv4 host (through a
# translator, a tunnel or the host's own stack), so the IPv4 address must be public too
EMBEDDED_IPV4: tuple[tuple[Net6, str, Callable[[IPv6], tuple[IPv4, ...]]], ...] = (
    (Net6("::/96"), "IPv4-compatible (RFC 4291)", _low_32),
    (Net6("::ffff:0:0:0/96"), "IPv4-translated (RFC 2765)", _low_32),
    (Net6("64:ff9b::/96"), "NAT64 (RFC 6052)", _low_32),
    (Net6("2002::/16"), "6to4 (RFC 3056)", _six_to_four),
    (Net6("2001::/32"), "Teredo (RFC 4380)", _teredo),
)

# Ranges refused whatever they embed, from the IANA special-purpose registries: those that the
# Python release at hand may not know yet. ipaddress's is_global follows the registry as of
# its release (3.11.7 still calls 2002::/16 and 64:ff9b:1::/48 global, 3.11.10 does not, none
# knows 3fff::/20 yet); listing them here keeps the rule the same on every 3.11.
NOT_GLOBALLY_REACHABLE: tuple[tuple[Net4 | Net6, str], ...] = (
    (Net4("192.88.99.0/24"), "a 6to4 relay anycast address (deprecated by RFC 7526)"),
    (Net6("::/96"), "a deprecated IPv4-compatible address (RFC 4291)"),
    (Net6("::ffff:0:0:0/96"), "an IPv4-translated address (RFC 2765), not globally reachable"),
    # the local-use NAT64 prefix: the IPv4 address sits at a place each network chooses
    (Net6("64:ff9b:1::/48"), "a local-use NAT64 address (RFC 8215), not globally reachable"),
    (Net6("100:0:0:1::/64"), "a dummy IPv6 prefix address (RFC 9780), not globally reachable"),
    (Net6("2001::/23"), "an IETF protocol assignment (RFC 2928), not globally reachable"),
    (Net6("2002::/16"), "a 6to4 address (RFC 3056; deprecated by RFC 7526)"),
    (Net6("3fff::/20"), "a documentation address (RFC 9637)"),
    (Net6("5f00::/16"), "a segment routing (SRv6) SID (RFC 9602), not globally reachable"),
)

# what an address is, in the words of the refusal; the first that holds is named
KINDS = (
    ("is_unspecified", "the unspecified address"),
    ("is_loopback", "a loopback address"),
    ("is_multicast", "a multicast address"),
    ("is_link_local", "a link-local address"),
    ("is_site_local", "a site-local address (RFC 3879)"),
)


def refusal(address: Address) -> str | None:
    """Why ``address`` may not receive a webhook; None when it may.

    The rule: a unicast address that is ``is_global`` and outside ``NOT_GLOBALLY_REACHABLE``,
    and whose every embedded IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo
    server and client) passes the same rule. Pure: no name is resolved, nothing is connected.
    """
    if isinstance(address, IPv6) and address.ipv4_mapped is not None:
        # ::ffff:a.b.c.d is how a dual-stack socket spells the IPv4 host itself
        reason = refusal(address.ipv4_mapped)
        if reason is None:
            return None
        return f"the IPv4-mapped form of {address.ipv4_mapped}, which is {reason}"
    for attribute, kind in KINDS:
        if getattr(address, attribute, False):
            return kind
    if isinstance(address, IPv6):
        for network, form, embedded in EMBEDDED_IPV4:
            if address in network:
                for inner in embedded(address):
                    reason = refusal(inner)
                    if reason is not None:
                        return f"the {form} form of {inner}, which is {reason}"
    for block, reason in NOT_GLOBALLY_REACHABLE:
        if address in block:
            return reason
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "not a globally reachable address"
    return None


# ---------------------------------------------------------------------------------------------
# URLs and their targets


@dataclass(frozen=True)
class Target:
    """Where one delivery goes: the URL's parts and the addresses its host resolved to."""

    scheme: str
    host: str  # ASCII (IDNA); the Host header and the TLS server name
    port: int
    path: str  # path and query: the request line
    addresses: tuple[Address, ...] = ()


def parse_url(url: str) -> Target:
    """The parts of a webhook URL, or :class:`WebhookUrlError` saying what is wrong with it."""
    if len(url) > MAX_URL:
        raise WebhookUrlError(f"webhook_url is longer than {MAX_URL} characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # a bracket left open around an IPv6 literal, ...
        raise WebhookUrlError(f"webhook_url is not a valid URL: {exc}") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise WebhookUrlError("webhook_url must be an http or https URL with a host")
    if parts.username or parts.password:
        raise WebhookUrlError("webhook_url must not carry credentials")
    try:
        port = parts.port  # ValueError past 65535, when negative or not a number
    except ValueError:
        port = 0
    if port == 0:
        raise WebhookUrlError("webhook_url port must be a number in 1-65535")
    host = parts.hostname
    if _literal(host) is None:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise WebhookUrlError(f"webhook_url host {host!r} is not a valid host name") from None
        if not HOST_NAME.fullmatch(host):
            raise WebhookUrlError(f"webhook_url host {host!r} is not a valid host name")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # the request line is ASCII: escape what a browser would, keep escapes already there
    path = quote(path, safe="!$%&'()*+,/:;=?@[]~")
    return Target(parts.scheme, host, port or DEFAULT_PORTS[parts.scheme], path)


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def lookup(host: str, port: int) -> list[Address]:
    """Every address ``host`` resolves to (one DNS query; tests replace this function)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0])) for info in infos))


def resolve(url: str, allow_private: bool) -> Target:
    """The URL's target with its host resolved once, every address checked by :func:`refusal`
    (unless private addresses are allowed)."""
    target = parse_url(url)
    literal = _literal(target.host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            addresses = lookup(target.host, target.port)
        except (OSError, UnicodeError, ValueError) as exc:
            raise WebhookUrlError(
                f"webhook_url host {target.host!r} does not resolve: {exc}"
            ) from None
        if not addresses:
            raise WebhookUrlError(f"webhook_url host {target.host!r} does not resolve")
    if not allow_private:
        for address in addresses:
            reason = refusal(address)
            if reason is not None:
                where = "is" if literal is not None else f"resolves to {address},"
                raise WebhookUrlError(
                    f"webhook_url host {target.host!r} {where} {reason}; the service only "
                    "calls public unicast addresses"
                )
    return Target(target.scheme, target.host, target.port, target.path, tuple(addresses))


def check_url(url: str, allow_private: bool) -> None:
    """At submission: the URL is well formed and, unless private addresses are allowed, its
    host resolves to public addresses only (delivery checks again)."""
    if allow_private:
        parse_url(url)
    else:
        resolve(url, allow_private)


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


# ---------------------------------------------------------------------------------------------
# Delivery


def open_connection(address: Address, port: int, timeout_s: float | None) -> socket.socket:
    """The one place a delivery opens a socket: to an address already checked, given as a
    number so that nothing is looked up again (tests replace this function)."""
    if isinstance(address, IPv6) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    family = socket.AF_INET6 if isinstance(address, IPv6) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect((str(address), port))
    except BaseException:
        sock.close()
        raise
    return sock


def _tls_context() -> ssl.SSLContext:
    """The CA bundle requests would use: an operator's ``REQUESTS_CA_BUNDLE`` (or
    ``CURL_CA_BUNDLE``) when set, else certifi's, so a private CA keeps working."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        return ssl.create_default_context(cafile=bundle)
    try:
        import certifi  # the CA bundle requests used before: the same receivers verify
    except ImportError:  # pragma: no cover - certifi comes with requests
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


class PinnedConnection(http.client.HTTPConnection):
    """HTTP or HTTPS to the addresses of a resolved :class:`Target`, tried in order, with the
    URL's host in the Host header and as the TLS server name (certificates are checked
    against it). Pinning closes the DNS-rebinding gap: the name is never looked up again
    between the check and the connection."""

    def __init__(self, target: Target, timeout_s: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout_s)
        self.target = target
        self.default_port = DEFAULT_PORTS[target.scheme]  # no ":443" in the Host header

    def connect(self) -> None:
        error: OSError | None = None
        for address in self.target.addresses:
            try:
                sock = open_connection(address, self.target.port, self.timeout)
            except OSError as exc:
                error = exc
                continue
            if self.target.scheme == "https":
                try:
                    sock = _tls_context().wrap_socket(sock, server_hostname=self.target.host)
                except BaseException:
                    sock.close()
                    raise
            self.sock = sock
            return
        raise error or OSError(f"no address to connect to for {self.target.host!r}")


def post(
    url: str, secret: str, body: dict[str, Any], timeout_s: float, allow_private: bool
) -> tuple[bool, str]:
    """One delivery attempt: (delivered, what happened). The host is resolved and checked here
    and the connection goes to the checked addresses; a redirect is an answer, not followed."""
    try:
        target = resolve(url, allow_private)
    except WebhookUrlError as exc:
        return False, str(exc)
    raw = json.dumps(body, sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "saliency-audit-webhook",
        SIGNATURE_HEADER: sign(secret, raw, int(time.time())),
    }
    connection = PinnedConnection(target, timeout_s)
    try:
        connection.request("POST", target.path, body=raw, headers=headers)
        status = connection.getresponse().status
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}"[:500]
    finally:
        connection.close()
    if 200 <= status < 300:
        return True, f"HTTP {status}"
    if 300 <= status < 400:
        return False, f"HTTP {status} (redirects are not followed)"
    return False, f"HTTP {status}"
