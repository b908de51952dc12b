"""What users take away, over HTTP: report.json against its published schema, the PDF and HTML
reports rendered on the CPU queue, a model's audit history, and the signed webhook."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import pytest
from sqlalchemy import select

from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.service.embedded import config_environment
from saliency_audit.service.models import Tenant
from saliency_audit.service.webhooks import SIGNATURE_HEADER, verify
from tests.servers import Api, Server, Worker, assert_problem, new_key
from tests.service.test_end_to_end import DIGITS_MODEL, digits_zip


class Receiver:
    """A webhook endpoint on loopback that fails its first ``failures`` deliveries."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers), body))
                status = 503 if len(receiver.calls) <= receiver.failures else 204
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/audit"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(failures=2)
    yield r
    r.close()


@pytest.fixture(scope="module")
def tenant(pg_server: Server, pg_database: Database) -> Api:
    return Api(pg_server.url, new_key(pg_database))


def submit(api: Api, seed: int = 0, **extra: Any) -> tuple[str, str]:
    model = api.upload_model(DIGITS_MODEL)
    dataset = api.upload_dataset(digits_zip(4))
    response = api.post(
        "/v1/audits",
        json={
            "model_id": model["id"],
            "dataset_id": dataset["id"],
            "methods": ["gradient", "guided_backprop"],
            "tests": ["cascading"],
            "seed": seed,
            **extra,
        },
    )
    assert response.status_code == 202, response.text
    return response.json()["id"], model["id"]


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_report_json_validates_against_the_published_schema(
    pg_config: Config, tenant: Api, worker_factory: Callable[[Config], Worker]
) -> None:
    worker_factory(pg_config)
    audit_id, _ = submit(tenant)
    assert tenant.wait(audit_id)["state"] == "succeeded"
    schema_response = tenant.get("/v1/schemas/report.json")
    assert schema_response.headers["Content-Type"].startswith("application/schema+json")
    report = tenant.get(f"/v1/audits/{audit_id}/report.json").json()
    jsonschema.Draft202012Validator(schema_response.json()).validate(report)
    assert report["audit_id"] == audit_id and len(report["dataset"]["sha256"]) == 64
    assert report["links"]["report_pdf"] == f"/v1/audits/{audit_id}/report.pdf"
    # every artifact link in the report answers with the file
    for artifact in report["artifacts"][:5]:
        picture = tenant.get(artifact["url"])
        assert picture.status_code == 200 and picture.headers["Content-Type"] == "image/png"


def test_pdf_and_html_reports_are_rendered_on_the_cpu_queue(
    pg_config: Config, tenant: Api, worker_factory: Callable[[Config], Worker]
) -> None:
    worker_factory(pg_config)
    audit_id, _ = submit(tenant, seed=1)
    assert tenant.wait(audit_id)["state"] == "succeeded"
    wait_until(
        lambda: tenant.get(f"/v1/audits/{audit_id}").json()["documents_state"] == "ready",
        120,
        "the reports to be rendered",
    )
    pdf = tenant.get(f"/v1/audits/{audit_id}/report.pdf")
    assert pdf.status_code == 200 and pdf.headers["Content-Type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF")
    html = tenant.get(f"/v1/audits/{audit_id}/report")
    assert html.status_code == 200 and html.headers["Content-Type"].startswith("text/html")
    assert "guided_backprop" in html.text and "data:image/png;base64," in html.text


def test_documents_of_an_unfinished_audit_are_409(tenant: Api) -> None:
    audit_id, _ = submit(tenant, seed=99)  # no worker consumes it here
    for path in ("report.pdf", "report"):
        assert_problem(tenant.get(f"/v1/audits/{audit_id}/{path}"), 409, "audit_not_succeeded")
    tenant.delete(f"/v1/audits/{audit_id}")


def test_a_models_history_shows_the_trend_and_the_last_change(
    pg_config: Config,
    pg_database: Database,
    pg_server: Server,
    worker_factory: Callable[[Config], Worker],
) -> None:
    api = Api(pg_server.url, new_key(pg_database))
    worker_factory(pg_config)
    first, model_id = submit(api, seed=2)
    api.wait(first)
    second, _ = submit(api, seed=3)
    api.wait(second)
    history = api.get(f"/v1/models/{model_id}/audits").json()
    assert [a["id"] for a in history["items"]] == [second, first]
    assert [entry["audit_id"] for entry in history["trend"]["gradient"]] == [first, second]
    comparison = history["comparison"]
    assert (comparison["previous_audit_id"], comparison["latest_audit_id"]) == (first, second)
    keys = {(c["method"], c["test"]) for c in comparison["changes"]}
    assert ("guided_backprop", "cascading") in keys
    for change in comparison["changes"]:
        assert change["changed"] == (change["previous"] != change["latest"])
    other = Api(pg_server.url, new_key(pg_database))
    assert_problem(other.get(f"/v1/models/{model_id}/audits"), 404, "not_found")


def test_a_signed_webhook_is_delivered_with_retries(
    pg_config: Config,
    pg_database: Database,
    pg_server: Server,
    worker_factory: Callable[[Config], Worker],
    receiver: Receiver,
) -> None:
    api = Api(pg_server.url, new_key(pg_database))
    worker_factory(pg_config)
    audit_id, _ = submit(api, seed=4, webhook_url=receiver.url)
    assert api.wait(audit_id)["state"] == "succeeded"
    audit = wait_until(
        lambda: (
            (a := api.get(f"/v1/audits/{audit_id}").json())["webhook"]["state"] == "delivered" and a
        ),
        60,
        "the webhook to be delivered",
    )
    assert audit["webhook"]["attempts"] == 3 and len(receiver.calls) == 3
    headers, body = receiver.calls[-1]
    with pg_database.session() as session:
        tenant_name = session.scalars(
            select(Tenant.name).where(Tenant.webhook_secret.is_not(None))
        ).all()
    # the tenant reads its secret with the CLI, as a receiver's operator would
    secrets = [
        subprocess.run(
            [
                sys.executable,
                "-m",
                "saliency_audit.service.cli",
                "keys",
                "webhook-secret",
                "--tenant",
                name,
            ],
            env=config_environment(pg_config),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for name in tenant_name
    ]
    assert any(verify(s, body, headers[SIGNATURE_HEADER]) for s in secrets)
    assert not any(verify(s, body + b" ", headers[SIGNATURE_HEADER]) for s in secrets)
    event = json.loads(body)
    assert event["event"] == "audit.finished" and event["audit_id"] == audit_id
    assert event["state"] == "succeeded" and "guided_backprop" in event["verdict_summary"]


def test_a_webhook_url_must_be_http(tenant: Api) -> None:
    response = tenant.post(
        "/v1/audits",
        json={
            "model_id": "x",
            "dataset_id": "y",
            "methods": ["gradient"],
            "webhook_url": "file:///etc/passwd",
        },
    )
    assert_problem(response, 422, "invalid_webhook_url")


def test_metrics_are_prometheus_text_from_the_shared_state(pg_server: Server, tenant: Api) -> None:
    import requests

    audit_id, _ = submit(tenant, seed=123)  # queued: nothing consumes this queue here
    response = requests.get(pg_server.url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    lines = response.text.splitlines()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line and not line.startswith("#")
    }
    assert samples['saliency_audit_audits{state="queued"}'] >= 1
    assert samples["saliency_audit_audit_duration_seconds_count"] >= 0
    queue_keys = [k for k in samples if k.startswith("saliency_audit_queue_depth")]
    assert len(queue_keys) == 2 and all(samples[k] >= 0 for k in queue_keys)
    # every sample's family is declared with HELP and TYPE
    families = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    for name in samples:
        base = name.split("{")[0]
        assert any(base == f or base.startswith(f + "_") for f in families), name
    tenant.delete(f"/v1/audits/{audit_id}")
