"""The API edge in embedded mode (SQLite, in process): the same refusals as on PostgreSQL
(tests/security/test_input_edges.py), no file left in the store when a row cannot be written,
the HTML responses' headers, and the Waitress server of ``saliency-audit serve``."""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from saliency_audit.service import db as service_db
from saliency_audit.service.api import datasets as datasets_api
from saliency_audit.service.api import models as models_api
from saliency_audit.service.app import HTML_CSP, create_app
from saliency_audit.service.auth import create_key
from saliency_audit.service.config import Config
from saliency_audit.service.embedded import make_server
from saliency_audit.service.models import AuditArtifact
from tests.security.test_hostile_uploads import stored_files
from tests.service.test_end_to_end import DIGITS_MODEL, digits_zip

MODEL = DIGITS_MODEL.read_bytes()


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    config = Config(data_dir=tmp_path, reconcile_in_api=False)
    service_db.upgrade(config.resolved_database_url)
    return create_app(config)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    with app.extensions["saliency_audit"].db.session() as session:
        key, _ = create_key(session, "tenant-embedded")
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client


def assert_problem(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["code"] == code


def test_sqlite_refuses_what_postgres_refuses(client: FlaskClient) -> None:
    assert_problem(client.get("/v1/models/a%00b"), 400, "invalid_characters")
    assert_problem(client.get("/v1/audits?model_id=%01"), 400, "invalid_characters")
    assert_problem(client.get("/v1/datasets?offset=9223372036854775808"), 400, "invalid_pagination")
    assert_problem(client.get("/v1/audits/x/heatmaps/9223372036854775808.png"), 400, "out_of_range")
    deep = '{"model_id": "m", "policy": ' + "[" * 1000 + "]" * 1000 + "}"
    assert_problem(
        client.post("/v1/audits", data=deep, content_type="application/json"), 400, "too_deep"
    )
    twice = '{"model_id": "m", "model_id": "n"}'
    assert_problem(
        client.post("/v1/audits", data=twice, content_type="application/json"),
        400,
        "duplicate_key",
    )
    nul = '{"model_id": "m\\u0000"}'
    assert_problem(
        client.post("/v1/audits", data=nul, content_type="application/json"),
        400,
        "invalid_characters",
    )


def test_names_with_control_or_bidi_characters_are_refused(app: Flask, client: FlaskClient) -> None:
    store = app.extensions["saliency_audit"].config.resolved_artifact_dir
    before = stored_files(store)
    for name in ("a\u202egpj.onnx", "a\tb.onnx", "a\u2067b.onnx"):
        response = client.post("/v1/models", data={"file": (io.BytesIO(MODEL), name)})
        assert_problem(response, 422, "invalid_name")
        meta = json.dumps({"name": name.replace("\t", "\u200e")})
        response = client.post(
            "/v1/models", data={"file": (io.BytesIO(MODEL), "m.onnx"), "metadata": meta}
        )
        assert_problem(response, 422, "invalid_name")
    assert stored_files(store) == before


def _fail_render(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the row could not be written")


def test_a_model_whose_row_fails_leaves_no_file(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = app.extensions["saliency_audit"].config.resolved_artifact_dir
    before = stored_files(store)
    monkeypatch.setattr(models_api, "render", _fail_render)
    response = client.post("/v1/models", data={"file": (io.BytesIO(MODEL), "m.onnx")})
    assert_problem(response, 500, "internal_error")
    assert stored_files(store) == before
    monkeypatch.undo()
    assert (
        client.post("/v1/models", data={"file": (io.BytesIO(MODEL), "m.onnx")}).status_code == 201
    )
    assert len(stored_files(store)) == len(before) + 1


def test_a_dataset_whose_row_fails_leaves_no_image(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = app.extensions["saliency_audit"].config.resolved_artifact_dir
    before = stored_files(store)
    archive = digits_zip(2)
    monkeypatch.setattr(datasets_api, "render", _fail_render)
    response = client.post("/v1/datasets", data={"file": (io.BytesIO(archive), "d.zip")})
    assert_problem(response, 500, "internal_error")
    assert stored_files(store) == before
    monkeypatch.undo()
    assert (
        client.post("/v1/datasets", data={"file": (io.BytesIO(archive), "d.zip")}).status_code
        == 201
    )
    assert len(stored_files(store)) == len(before) + 2


def test_html_has_a_csp_and_one_charset(app: Flask, client: FlaskClient) -> None:
    docs = client.get("/docs")
    assert docs.headers["Content-Security-Policy"] == HTML_CSP
    assert docs.headers["Content-Type"] == "text/html; charset=utf-8"

    # the stored HTML report, served as stored
    from saliency_audit.service.api.audits import send_stored

    st = app.extensions["saliency_audit"]
    sha = st.store.put_bytes(b"<!DOCTYPE html><title>r</title>")
    media_type = AuditArtifact(media_type="text/html; charset=utf-8").media_type
    with app.test_request_context("/v1/audits/a/report"):
        response = app.process_response(send_stored(sha, media_type))
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["Content-Security-Policy"] == HTML_CSP
    # other responses have none
    assert "Content-Security-Policy" not in client.get("/healthz").headers


# --- the Waitress server of `saliency-audit serve` --------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Any, Config]]:
    config = Config(data_dir=tmp_path, reconcile_in_api=False, max_request_bytes=10_000)
    service_db.upgrade(config.resolved_database_url)
    server = make_server(create_app(config), config, "127.0.0.1", 0, threads=2)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield server, config
    server.close()
    thread.join(timeout=10)


def _raw(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send ``request`` (a body past the limit is not sent whole: the server answers, then
    closes, before reading it) and read the answer to the end."""
    with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return status, headers, body


def test_serve_accepts_up_to_the_configured_limit(served: tuple[Any, Config]) -> None:
    server, config = served
    assert server.adj.max_request_body_size == config.max_request_bytes
    assert Config().max_request_bytes == 2100 * 2**20  # as docs/service.md states


def test_serve_answers_its_own_errors_as_problem_json(served: tuple[Any, Config]) -> None:
    server, config = served
    port = server.effective_port
    status, headers, raw = _raw(
        port,
        b"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        + f"Content-Length: {config.max_request_bytes + 1}\r\n\r\n".encode(),
    )
    assert status.split()[1] == "413", status
    assert headers["content-type"] == "application/problem+json"
    problem = json.loads(raw)
    assert problem["status"] == 413 and problem["code"] == "payload_too_large"
    # a chunked body past the limit, which only Waitress sees whole
    chunk = b"x" * 6000
    status, headers, raw = _raw(
        port,
        b"POST /v1/models HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * 2,
    )
    assert status.split()[1] == "413", status
    assert headers["content-type"] == "application/problem+json"
    # a malformed request
    status, headers, raw = _raw(
        port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"
    )
    assert status.split()[1] == "400", status
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(raw)["code"] == "bad_request"
