"""Webhook targets over real processes: the API refuses every non-public form at submission
with a problem+json, a worker refuses again at delivery (what a lenient API let through, as
when DNS changes between submission and delivery), and a worker never follows a redirect.

Audits are canceled while queued, which sends their webhook without running them, and only a
CPU-queue worker runs, so each delivery costs milliseconds. Every receiver is on loopback, and
the deliveries a worker makes here only ever target this machine.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.service.embedded import start_worker
from tests.security.test_webhook_targets import REFUSED, Receiver, url_of
from tests.servers import Api, Server, Worker, assert_problem, new_key, start_server
from tests.service.test_end_to_end import DIGITS_MODEL, digits_zip


@pytest.fixture(scope="module")
def hooks_config(pg_config: Config) -> Config:
    """Queues of this module's own (nothing else consumes them), one delivery attempt."""
    suffix = secrets.token_hex(3)
    return pg_config.with_overrides(
        queue=f"gpu-hooks-{suffix}", cpu_queue=f"cpu-hooks-{suffix}", webhook_max_attempts=1
    )


@pytest.fixture(scope="module")
def strict_server(hooks_config: Config) -> Iterator[Server]:
    server = start_server(hooks_config.with_overrides(webhook_allow_private=False), "--no-worker")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lenient_server(hooks_config: Config) -> Iterator[Server]:
    server = start_server(hooks_config.with_overrides(webhook_allow_private=True), "--no-worker")
    yield server
    server.stop()


Inputs = tuple[str, str, str]


def tenant_inputs(server: Server, database: Database) -> Inputs:
    """A new tenant's key, and a model and dataset of its own: a submission that passes every
    other check, so only the webhook URL can refuse it."""
    key = new_key(database)
    api = Api(server.url, key)
    return key, api.upload_model(DIGITS_MODEL)["id"], api.upload_dataset(digits_zip(4))["id"]


@pytest.fixture(scope="module")
def refused_inputs(lenient_server: Server, pg_database: Database) -> Inputs:
    """The tenant of the refused submissions: it never has an audit."""
    return tenant_inputs(lenient_server, pg_database)


@pytest.fixture(scope="module")
def delivered_inputs(lenient_server: Server, pg_database: Database) -> Inputs:
    return tenant_inputs(lenient_server, pg_database)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def audit_body(inputs: Inputs, webhook_url: str) -> dict[str, Any]:
    _, model_id, dataset_id = inputs
    return {
        "model_id": model_id,
        "dataset_id": dataset_id,
        "methods": ["gradient"],
        "tests": ["cascading"],
        "webhook_url": webhook_url,
    }


@contextmanager
def delivery_worker(config: Config, timeout_s: float = 90.0) -> Iterator[Worker]:
    """A real Celery worker on the CPU queue only: it delivers webhooks, runs no audit."""
    log = config.data_dir / f"hooks-worker-{secrets.token_hex(3)}.log"
    worker = Worker(start_worker(config, log, queues=[config.cpu_queue]), log)
    try:
        deadline = time.monotonic() + timeout_s
        while " ready." not in worker.log_text():
            assert worker.process.poll() is None, worker.log_text()
            assert time.monotonic() < deadline, f"worker not ready:\n{worker.log_text()}"
            time.sleep(0.2)
        yield worker
    finally:
        worker.stop()


def submit_and_cancel(api: Api, body: dict[str, Any]) -> str:
    accepted = api.post("/v1/audits", json=body)
    assert accepted.status_code == 202, accepted.text
    audit_id: str = accepted.json()["id"]
    canceled = api.delete(f"/v1/audits/{audit_id}")
    assert canceled.status_code == 200 and canceled.json()["state"] == "canceled", canceled.text
    return audit_id


def wait_for_webhooks(api: Api, audit_ids: list[str], timeout_s: float = 60.0) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        hooks = [api.get(f"/v1/audits/{a}").json()["webhook"] for a in audit_ids]
        if all(h["state"] in ("delivered", "failed") for h in hooks):
            return hooks
        assert time.monotonic() < deadline, f"webhooks not attempted in {timeout_s} s: {hooks}"
        time.sleep(0.3)


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_submission_with_a_non_public_webhook_address_is_a_422_and_creates_nothing(
    strict_server: Server, refused_inputs: Inputs, address: str, reason: str
) -> None:
    api = Api(strict_server.url, refused_inputs[0])
    response = api.post("/v1/audits", json=audit_body(refused_inputs, url_of(address, 8443)))
    assert_problem(response, 422, "invalid_webhook_url")
    detail = response.json()["detail"]
    assert reason in detail and "only calls public unicast addresses" in detail, detail
    assert api.get("/v1/audits").json()["items"] == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://localhost:8443/hook", "resolves to"),
        ("http://hooks.example.com:65536/hook", "port must be a number in 1-65535"),
        ("http://hooks.example.com:0/hook", "port must be a number in 1-65535"),
        ("http://hooks.example.com:hook/hook", "port must be a number in 1-65535"),
        ("http://a..b/hook", "not a valid host name"),
    ],
)
def test_submission_with_a_bad_webhook_host_or_port_is_a_422(
    strict_server: Server,
    lenient_server: Server,
    refused_inputs: Inputs,
    url: str,
    message: str,
) -> None:
    servers = (
        [strict_server] if url.startswith("http://localhost") else [strict_server, lenient_server]
    )
    for server in servers:
        api = Api(server.url, refused_inputs[0])
        response = api.post("/v1/audits", json=audit_body(refused_inputs, url))
        assert_problem(response, 422, "invalid_webhook_url")
        assert message in response.json()["detail"]
    assert Api(strict_server.url, refused_inputs[0]).get("/v1/audits").json()["items"] == []


def test_the_worker_refuses_at_delivery_what_the_api_let_through(
    hooks_config: Config,
    lenient_server: Server,
    delivered_inputs: Inputs,
    receiver: Receiver,
) -> None:
    # forms that all lead to this machine, where the receiver listens: a worker that
    # delivered to one of them would be seen, and none can send anything off loopback
    forms = ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::", "localhost"]
    api = Api(lenient_server.url, delivered_inputs[0])
    audit_ids = [
        submit_and_cancel(api, audit_body(delivered_inputs, url_of(form, receiver.port)))
        for form in forms
    ]
    with delivery_worker(hooks_config.with_overrides(webhook_allow_private=False)):
        hooks = wait_for_webhooks(api, audit_ids)
    for form, hook in zip(forms, hooks, strict=True):
        assert hook["state"] == "failed" and hook["attempts"] == 1, (form, hook)
        assert "only calls public unicast addresses" in hook["error"], (form, hook)
    assert receiver.calls == []


def test_the_worker_never_follows_a_redirect(
    hooks_config: Config,
    lenient_server: Server,
    delivered_inputs: Inputs,
    receiver: Receiver,
) -> None:
    redirector = Receiver(status=302, location=receiver.url)
    try:
        api = Api(lenient_server.url, delivered_inputs[0])
        audit_id = submit_and_cancel(api, audit_body(delivered_inputs, redirector.url))
        with delivery_worker(hooks_config.with_overrides(webhook_allow_private=True)):
            [hook] = wait_for_webhooks(api, [audit_id])
    finally:
        redirector.close()
    assert hook["state"] == "failed" and hook["error"] == "HTTP 302 (redirects are not followed)"
    assert len(redirector.calls) == 1 and receiver.calls == []
