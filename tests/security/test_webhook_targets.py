"""Which addresses a webhook may reach, and how a delivery connects: only public unicast
addresses (their embedded IPv4 addresses included), the name resolved once and the connection
pinned to the address that was checked, redirects never followed.

Nothing here leaves loopback: the decision is a pure function, and where a delivery to a
"public" address is exercised, the connect step is replaced by one that records the address
and connects to a receiver on 127.0.0.1 instead.
"""

from __future__ import annotations

import http.server
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from saliency_audit.service import webhooks
from saliency_audit.service.webhooks import WebhookUrlError, check_url, parse_url, post, refusal

# (address, what the refusal names): every form of issue 18, item 6, and their neighbours
REFUSED = [
    ("64:ff9b::127.0.0.1", "NAT64 (RFC 6052) form of 127.0.0.1, which is a loopback"),
    ("64:ff9b::10.0.0.1", "NAT64 (RFC 6052) form of 10.0.0.1, which is a private"),
    ("64:ff9b:1::8.8.8.8", "local-use NAT64"),
    ("2002:7f00:1::1", "6to4 (RFC 3056) form of 127.0.0.1, which is a loopback"),
    ("2002:c0a8:101::1", "6to4 (RFC 3056) form of 192.168.1.1, which is a private"),
    ("2002:808:808::1", "6to4 address"),
    # Teredo: server 8.8.8.8, client 127.0.0.1 stored xor-ed (0x80fffffe)
    ("2001:0:808:808::80ff:fffe", "Teredo (RFC 4380) form of 127.0.0.1, which is a loopback"),
    ("::127.0.0.1", "IPv4-compatible (RFC 4291) form of 127.0.0.1, which is a loopback"),
    ("::8.8.8.8", "deprecated IPv4-compatible"),
    ("::ffff:127.0.0.1", "IPv4-mapped form of 127.0.0.1, which is a loopback"),
    ("::ffff:169.254.169.254", "IPv4-mapped form of 169.254.169.254, which is a link-local"),
    ("::ffff:0:127.0.0.1", "IPv4-translated"),
    ("fec0::1", "site-local"),
    ("fe80::1", "link-local"),
    ("fc00::1", "private"),
    ("fd00::1", "private"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("2001:db8::1", "private"),
    ("3fff::1", "documentation"),
    ("5f00::1", "SRv6"),
    ("100:0:0:1::1", "dummy IPv6 prefix"),
    ("192.88.99.1", "6to4 relay anycast"),
    ("0.0.0.0", "unspecified"),
    ("127.0.0.1", "loopback"),
    ("10.0.0.1", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "not a globally reachable"),
    ("169.254.169.254", "link-local"),
    ("192.0.2.1", "private"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", "private"),
    ("255.255.255.255", "private"),
]
ALLOWED = [
    "8.8.8.8",
    "2606:4700:4700::1111",
    "64:ff9b::8.8.8.8",  # the well-known NAT64 prefix in front of a public IPv4 address
    "::ffff:8.8.8.8",  # how a dual-stack socket spells 8.8.8.8
]


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_a_non_public_address_or_one_that_embeds_one_is_refused(address: str, reason: str) -> None:
    said = refusal(ipaddress.ip_address(address))
    assert said is not None and reason in said, said


@pytest.mark.parametrize("address", ALLOWED)
def test_a_public_unicast_address_may_receive_webhooks(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_nat64_allows_only_the_public_embedded_address() -> None:
    forms = {v4: ipaddress.ip_address(f"64:ff9b::{v4}") for v4 in ("127.0.0.1", "10.0.0.1")}
    forms["8.8.8.8"] = ipaddress.ip_address("64:ff9b::8.8.8.8")
    allowed = [v4 for v4, address in forms.items() if refusal(address) is None]
    assert allowed == ["8.8.8.8"]


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com:65536/x",
        "http://hooks.example.com:99999999999/x",
        "http://hooks.example.com:0/x",
        "http://hooks.example.com:-1/x",
        "http://hooks.example.com:http/x",
        "https://[2606:4700:4700::1111]:70000/x",
    ],
)
def test_a_port_outside_1_to_65535_is_refused_before_any_lookup(url: str) -> None:
    for allow_private in (False, True):
        with pytest.raises(WebhookUrlError, match="port must be a number in 1-65535"):
            check_url(url, allow_private)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://a..b/x", "not a valid host name"),
        ("http://" + "a" * 64 + ".example.com/x", "not a valid host name"),
        ("http://hooks.example.com%0d%0aX-Evil:1/x", "not a valid host name"),
        ("http://[::1/x", "not a valid URL"),
        ("http://user:pw@hooks.example.com/x", "credentials"),
        ("gopher://hooks.example.com/x", "http or https"),
    ],
)
def test_a_malformed_url_is_a_clear_refusal(url: str, message: str) -> None:
    with pytest.raises(WebhookUrlError, match=message):
        check_url(url, allow_private=True)


def test_the_request_line_is_the_urls_path_and_query_escaped() -> None:
    target = parse_url("https://Bücher.example/hooks/a b?x=é#frag")
    assert (target.host, target.port) == ("xn--bcher-kva.example", 443)
    assert target.path == "/hooks/a%20b?x=%C3%A9"
    assert parse_url("http://[::1]:8080").path == "/"


# ---------------------------------------------------------------------------------------------
# Delivery, against receivers on loopback


class Receiver:
    """An HTTP server on 127.0.0.1 that records each request and answers ``status``."""

    def __init__(self, status: int = 204, location: str | None = None) -> None:
        self.calls: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.calls.append((self.path, dict(self.headers), body))
                self.send_response(status)
                if location is not None:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST  # a followed 302 would arrive as a GET

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/hooks/audit"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


class Network:
    """Stands in for DNS and the connect step: records what a delivery looked up and where it
    connected, and connects to a loopback receiver instead (or refuses to connect at all)."""

    def __init__(self, answers: list[list[str]], receiver: Receiver | None) -> None:
        self.answers = answers
        self.receiver = receiver
        self.lookups: list[str] = []
        self.connects: list[tuple[str, int]] = []

    def lookup(self, host: str, port: int) -> list[webhooks.Address]:
        self.lookups.append(host)
        answer = self.answers[min(len(self.lookups), len(self.answers)) - 1]
        return [ipaddress.ip_address(a) for a in answer]

    def open_connection(
        self, address: webhooks.Address, port: int, timeout_s: float | None
    ) -> socket.socket:
        self.connects.append((str(address), port))
        if self.receiver is None:
            raise ConnectionRefusedError("the test network connects nowhere")
        return socket.create_connection(("127.0.0.1", self.receiver.port), timeout=timeout_s)


def install(monkeypatch: pytest.MonkeyPatch, network: Network) -> Network:
    monkeypatch.setattr(webhooks, "lookup", network.lookup)
    monkeypatch.setattr(webhooks, "open_connection", network.open_connection)
    return network


def deliver(url: str, allow_private: bool = False) -> tuple[bool, str]:
    return post(url, "whsec_test", {"event": "audit.finished"}, 5.0, allow_private)


def url_of(address: str, port: int = 80) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}/hooks/audit"


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_delivery_to_a_refused_address_never_connects(
    address: str, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    network = install(monkeypatch, Network([], receiver=None))
    delivered, detail = deliver(url_of(address))
    assert not delivered and reason in detail and "public unicast" in detail
    assert network.connects == [] and network.lookups == []  # a literal is never looked up


def test_every_address_a_name_resolves_to_is_checked(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    network = install(monkeypatch, Network([["8.8.8.8", "::ffff:127.0.0.1"]], receiver))
    delivered, detail = deliver("http://hooks.example.com/x")
    assert not delivered
    assert "the IPv4-mapped form of 127.0.0.1, which is a loopback address" in detail
    assert network.connects == [] and receiver.calls == []


def test_delivery_connects_to_the_checked_address_and_never_looks_the_name_up_again(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    # DNS rebinding: the first answer is public, every later one points inside
    network = install(monkeypatch, Network([["64:ff9b::8.8.8.8"], ["127.0.0.1"]], receiver))
    delivered, detail = deliver("http://hooks.example.com:8080/hooks/audit?tenant=a")
    assert (delivered, detail) == (True, "HTTP 204")
    assert network.lookups == ["hooks.example.com"]
    assert network.connects == [("64:ff9b::808:808", 8080)]
    [(path, headers, body)] = receiver.calls
    assert path == "/hooks/audit?tenant=a" and headers["Host"] == "hooks.example.com:8080"
    assert webhooks.SIGNATURE_HEADER in headers and b"audit.finished" in body


def test_the_next_address_is_tried_when_one_does_not_answer(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    network = install(monkeypatch, Network([["2606:4700:4700::1111", "8.8.8.8"]], receiver))
    first_refuses = network.open_connection

    def open_connection(address: webhooks.Address, port: int, timeout_s: float | None) -> Any:
        if address.version == 6:
            network.connects.append((str(address), port))
            raise ConnectionRefusedError("no route")
        return first_refuses(address, port, timeout_s)

    monkeypatch.setattr(webhooks, "open_connection", open_connection)
    assert deliver("http://hooks.example.com/x") == (True, "HTTP 204")
    assert network.connects == [("2606:4700:4700::1111", 80), ("8.8.8.8", 80)]
    assert receiver.calls[0][1]["Host"] == "hooks.example.com"


def test_https_checks_the_certificate_against_the_urls_host(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    network = install(monkeypatch, Network([["8.8.8.8"]], receiver))
    server_names: list[str | None] = []

    class Context:
        def wrap_socket(self, sock: socket.socket, server_hostname: str | None) -> Any:
            server_names.append(server_hostname)
            raise ssl.SSLCertVerificationError("certificate verify failed (test)")

    monkeypatch.setattr(webhooks, "_tls_context", Context)
    delivered, detail = deliver("https://hooks.example.com/x")
    assert not delivered and "SSLCertVerificationError" in detail
    assert network.connects == [("8.8.8.8", 443)] and server_names == ["hooks.example.com"]
    assert receiver.calls == []  # nothing was sent in clear text


def test_a_redirect_is_never_followed(receiver: Receiver) -> None:
    redirector = Receiver(status=302, location=receiver.url)
    try:
        delivered, detail = deliver(redirector.url, allow_private=True)
    finally:
        redirector.close()
    assert not delivered and detail == "HTTP 302 (redirects are not followed)"
    assert len(redirector.calls) == 1 and receiver.calls == []


def test_allow_private_delivers_to_loopback_with_the_same_pinned_connection(
    receiver: Receiver,
) -> None:
    assert deliver(receiver.url, allow_private=False)[0] is False
    assert receiver.calls == []
    assert deliver(receiver.url, allow_private=True) == (True, "HTTP 204")
    assert receiver.calls[0][0] == "/hooks/audit"
