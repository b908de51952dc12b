"""The OpenAPI document against the app: same routes, valid 3.1, and real responses that
validate against the schemas it documents.

The responses come from the real app over Flask's test client, with two stand-ins so no
database table is needed: authentication is replaced by a fixed tenant, and the database
session by an in-memory one that holds rows and answers the routes' queries (their WHERE
clauses of =, IS, IN, AND and OR are evaluated; ordering is the insertion order).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import html
import io
import json
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, g
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator, ValidationError
from openapi_spec_validator import OpenAPIV31SpecValidator
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BooleanClauseList, Null
from werkzeug.test import TestResponse

import saliency_audit.service.auth
import saliency_audit.service.purge
from saliency_audit.service.api import audits as audits_api
from saliency_audit.service.api import datasets as datasets_api
from saliency_audit.service.api import meta as meta_api
from saliency_audit.service.api import models as models_api
from saliency_audit.service.app import State, create_app
from saliency_audit.service.config import Config
from saliency_audit.service.models import (
    AUDIT_STATES,
    Audit,
    AuditArtifact,
    DatasetRecord,
    ModelRecord,
    ResultRow,
    VerdictRow,
    new_id,
)
from saliency_audit.service.openapi import (
    DATASET_REJECTIONS,
    MODEL_REJECTIONS,
    REPORT_SCHEMA_PATH,
    SIGNATURE_PATTERN,
    docs_html,
    openapi_document,
    operation_anchor,
)
from saliency_audit.service.problems import ApiError
from saliency_audit.service.webhooks import SIGNATURE_HEADER, payload, sign, verify
from saliency_audit.workers.engine.errors import EngineError
from saliency_audit.workers.engine.result import SCHEMA_VERSION
from saliency_audit.workers.engine.spec import AuditSpec
from saliency_audit.workers.reports.schema import report_schema

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "examples" / "reference"
TENANT = "tenant-openapi"
TRACKED_HEADERS = ("Location", "Retry-After", "Idempotent-Replayed", "ETag", "Allow")
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
NOW = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


# --- an in-memory session -------------------------------------------------------------------


class FakeResult:
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def all(self) -> list[Any]:
        return self.items

    def one_or_none(self) -> Any:
        assert len(self.items) <= 1, self.items
        return self.items[0] if self.items else None

    def first(self) -> Any:
        return self.items[0] if self.items else None


def matches(row: Any, clause: Any) -> bool:
    """Evaluate the WHERE clauses the routes use on a row."""
    if isinstance(clause, BooleanClauseList):
        results = [matches(row, c) for c in clause.clauses]
        return all(results) if clause.operator is operators.and_ else any(results)
    assert isinstance(clause, BinaryExpression), clause
    left: Any = clause.left
    value = getattr(row, left.key)
    right: Any = None if isinstance(clause.right, Null) else clause.right.value
    if clause.operator is operators.eq:
        return bool(value == right)
    if clause.operator is operators.is_:
        return value is right
    if clause.operator is operators.in_op:
        return value in right
    raise AssertionError(f"unsupported clause {clause}")


class FakeSession:
    """Rows by class, answering a select of an entity or of one of its columns."""

    def __init__(self) -> None:
        self.rows: dict[type, list[Any]] = {}

    def _select(self, stmt: Any) -> list[Any]:
        desc = stmt.column_descriptions[0]
        rows = [
            r
            for r in self.rows.get(desc["entity"], [])
            if all(matches(r, c) for c in stmt._where_criteria)
        ]
        if desc["expr"] is not desc["entity"]:  # a column, such as Audit.id
            rows = [getattr(r, desc["name"]) for r in rows]
        offset, limit = stmt._offset or 0, stmt._limit
        return rows[offset : None if limit is None else offset + limit]

    def scalars(self, stmt: Any) -> FakeResult:
        return FakeResult(self._select(stmt))

    def scalar(self, stmt: Any) -> int:
        # paginated(): select(count()).select_from(<the page query>.subquery())
        return len(self._select(stmt.get_final_froms()[0].element))

    def get(self, model: type, key: Any) -> Any:
        return next((r for r in self.rows.get(model, []) if r.id == key), None)

    def add(self, row: Any) -> Any:
        """Store the row with its column defaults filled in, as a flush would."""
        for column in row.__table__.columns:
            if getattr(row, column.key) is None and column.default is not None:
                arg = column.default.arg
                value = arg(None) if callable(arg) else arg
                setattr(row, column.key, value)
        if getattr(row, "id", None) is None:
            row.id = len(self.rows.get(type(row), [])) + 1
        kept = self.rows.setdefault(type(row), [])
        if row not in kept:
            kept.append(row)
        return row

    def flush(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return openapi_document()


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    return create_app(Config(data_dir=tmp_path, reconcile_in_api=False))


@pytest.fixture
def fake(app: Flask, monkeypatch: pytest.MonkeyPatch) -> FakeSession:
    """Authenticated as TENANT, with the in-memory session and no broker."""
    session = FakeSession()
    st: State = app.extensions["saliency_audit"]

    @contextmanager
    def open_session() -> Iterator[FakeSession]:
        yield session

    def require_tenant(_session: Any) -> str:
        g.tenant_id = TENANT
        return TENANT

    monkeypatch.setattr(st.db, "session", open_session)
    monkeypatch.setattr(saliency_audit.service.auth, "require_tenant", require_tenant)

    class Enqueue:  # nothing is sent: the audit task and the model inspection
        def __call__(self, db: Any, audit_id: str) -> bool:
            return True

        def inspect_model(self, model_id: str) -> bool:
            return True

    monkeypatch.setattr(st, "enqueue", Enqueue())
    # what a deletion removes is tested on PostgreSQL (test_deletion.py); here only the rows go
    monkeypatch.setattr(
        saliency_audit.service.purge,
        "delete_upload",
        lambda _s, row, cascade, deleted: session.rows[type(row)].remove(row) or set(),
    )
    monkeypatch.setattr(
        saliency_audit.service.purge,
        "delete_audits",
        lambda _s, ids, deleted: (
            session.rows.update({Audit: [a for a in session.rows[Audit] if a.id not in ids]})
            or set()
        ),
    )
    monkeypatch.setattr(
        saliency_audit.service.purge,
        "remove_unreferenced",
        lambda *args, **kwargs: saliency_audit.service.purge.Deleted(),
    )
    return session


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def app_routes(app: Flask) -> dict[str, set[str]]:
    """``{openapi path: {methods}}`` of the app, without Flask's automatic HEAD/OPTIONS."""
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        methods = {m.lower() for m in rule.methods or ()} - {"head", "options"}
        routes.setdefault(path, set()).update(methods)
    return routes


def documented_routes(doc: dict[str, Any]) -> dict[str, set[str]]:
    return {path: set(item) & METHODS for path, item in doc["paths"].items()}


# --- checking a response against the document -------------------------------------------------


def resolve(doc: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def validate(doc: dict[str, Any], instance: Any, schema: dict[str, Any]) -> None:
    """Validate against a schema of the document, its ``#/components/...`` refs included."""
    root = {**copy.deepcopy(schema), "components": doc["components"]}
    Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER).validate(
        instance
    )


def check(doc: dict[str, Any], response: TestResponse, path: str, method: str) -> Any:
    """The status is documented for the operation and the body matches its schema; every
    tracked header the response carries is documented. Returns the parsed JSON body."""
    op = doc["paths"][path][method]
    status = str(response.status_code)
    assert status in op["responses"], (path, method, status, response.get_data(as_text=True))
    documented = resolve(doc, op["responses"][status])
    headers = documented.get("headers", {})
    for name in TRACKED_HEADERS:
        if name in response.headers:
            assert name in headers, (path, method, status, name)
    content = documented.get("content")
    if not content:
        assert response.get_data() == b""
        return None
    media = response.mimetype
    assert media in content, (path, method, status, media, list(content))
    schema = content[media].get("schema", {})
    if media in ("application/json", "application/problem+json", "application/schema+json"):
        body = response.get_json()
        validate(doc, body, schema)
        return body
    if media == "image/png":
        assert response.get_data().startswith(b"\x89PNG\r\n\x1a\n")
        return response.get_data()
    if media == "application/pdf":
        assert response.get_data().startswith(b"%PDF-")
        return response.get_data()
    assert media in ("text/html", "text/plain"), media
    return response.get_data(as_text=True)


# --- rows -------------------------------------------------------------------------------------


def png_bytes(size: int = 4) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def add_model(session: FakeSession) -> ModelRecord:
    row = ModelRecord(
        id=new_id(),
        tenant_id=TENANT,
        name="cnn",
        format="onnx",
        architecture=None,
        sha256="a" * 64,
        size_bytes=1234,
        input_spec={"height": 8},
        class_names=["zero", "one"],
        details={"format": "onnx"},
        created_at=NOW,
    )
    return session.add(row)


def add_dataset(session: FakeSession) -> DatasetRecord:
    images = [
        {"name": "cat/a.png", "sha256": "b" * 64, "label": "cat", "width": 8, "height": 8},
        {"name": "dog/b.png", "sha256": "c" * 64, "label": "dog", "width": 8, "height": 8},
    ]
    row = DatasetRecord(
        id=new_id(),
        tenant_id=TENANT,
        name="pets",
        sha256="d" * 64,
        size_bytes=999,
        n_images=2,
        labeled=True,
        has_masks=False,
        has_boxes=False,
        class_names=["cat", "dog"],
        manifest={"images": images},
        created_at=NOW,
    )
    return session.add(row)


def add_audit(session: FakeSession, state: str, **extra: Any) -> Audit:
    model = (
        add_model(session) if not session.rows.get(ModelRecord) else session.rows[ModelRecord][0]
    )
    dataset = (
        add_dataset(session)
        if not session.rows.get(DatasetRecord)
        else session.rows[DatasetRecord][0]
    )
    final = state in ("succeeded", "failed", "canceled")
    values: dict[str, Any] = {
        "id": new_id(),
        "tenant_id": TENANT,
        "model_id": model.id,
        "dataset_id": dataset.id,
        "train_dataset_id": None,
        "spec": AuditSpec.from_dict({"methods": ["gradient"], "tests": ["cascading"]}).to_dict(),
        "state": state,
        "progress": 1.0 if final else 0.25,
        "step": state,
        "attempts": 0 if state == "queued" else 1,
        "error": {"code": "boom", "message": "it broke"} if state == "failed" else None,
        "request_sha256": "e" * 64,
        "cancel_requested": False,
        "verdict_summary": {"gradient": {"cascading": "PASS"}} if state == "succeeded" else None,
        "created_at": NOW,
        "started_at": None if state == "queued" else NOW,
        "heartbeat_at": None if state == "queued" else NOW,
        "finished_at": NOW if final else None,
    }
    values.update(extra)
    return session.add(Audit(**values))


def add_results(session: FakeSession, audit: Audit, store: Any) -> AuditArtifact:
    session.add(
        VerdictRow(
            tenant_id=TENANT,
            audit_id=audit.id,
            method="gradient",
            test="cascading",
            verdict="PASS",
            reason="the maps change",
            measure="ssim",
            stage="first",
            threshold=0.51,
            mean=0.2,
            ci_low=0.1,
            ci_high=0.3,
            n=4,
            is_control=False,
            policy_version="1.0.0",
        )
    )
    session.add(
        VerdictRow(
            tenant_id=TENANT,
            audit_id=audit.id,
            method="gradient",
            test="independent",
            verdict="INCONCLUSIVE",
            reason="test not run",
            measure=None,
            stage=None,
            threshold=None,
            mean=None,
            ci_low=None,
            ci_high=None,
            n=0,
            is_control=False,
            policy_version=None,
        )
    )
    session.add(
        ResultRow(
            tenant_id=TENANT,
            audit_id=audit.id,
            method="gradient",
            test="cascading",
            measure="ssim",
            stage="fc",
            stage_index=0,
            mean=None,
            ci_low=None,
            ci_high=None,
            n=4,
            n_undefined=4,
        )
    )
    return session.add(
        AuditArtifact(
            tenant_id=TENANT,
            audit_id=audit.id,
            kind="heatmap_png",
            method="gradient",
            test="model",
            stage="trained",
            image="a.png",
            sha256=store.put_bytes(png_bytes()),
            media_type="image/png",
            size_bytes=10,
        )
    )


# --- the document and the app's routes --------------------------------------------------------


def test_every_route_is_documented_with_its_methods(app: Flask, doc: dict[str, Any]) -> None:
    routes = app_routes(app)
    assert "/v1/audits/{audit_id}/heatmaps/{heatmap_id}.png" in routes  # the <int:> converter
    assert documented_routes(doc) == routes


def test_every_documented_operation_is_served(app: Flask, doc: dict[str, Any]) -> None:
    adapter = app.url_map.bind("localhost")
    for path, methods in documented_routes(doc).items():
        concrete = re.sub(r"\{[^}]+\}", "7", path)
        for method in methods:
            endpoint, _ = adapter.match(concrete, method=method.upper())
            assert endpoint != "static", (path, method)


def test_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    errors = [str(e.message) for e in OpenAPIV31SpecValidator(doc).iter_errors()]
    assert errors == []


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert len(refs) > 50
    for ref in refs:
        assert ref.startswith("#/components/"), ref
        assert isinstance(resolve(doc, {"$ref": ref}), dict), ref
    used = {ref.rsplit("/", 1)[1] for ref in refs if ref.startswith("#/components/schemas/")}
    assert set(doc["components"]["schemas"]) - used == set()


def test_document_is_built_once_and_handed_out_as_a_copy() -> None:
    first = openapi_document()
    first["paths"].clear()
    assert openapi_document()["paths"]
    assert docs_html() is docs_html()


def test_info_and_job_states(doc: dict[str, Any]) -> None:
    from importlib import metadata

    assert doc["info"]["title"] == "saliency-audit"
    assert doc["info"]["version"] == metadata.version("saliency-audit")
    assert (
        "queued` -> `running` -> `succeeded` | `failed` | `canceled" in doc["info"]["description"]
    )


def test_security_applies_to_v1_only(doc: dict[str, Any]) -> None:
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    for path, item in doc["paths"].items():
        for method in set(item) & METHODS:
            op = item[method]
            if path.startswith("/v1/"):
                assert op["security"] == [{"bearerAuth": []}], (path, method)
                assert "401" in op["responses"] and "503" in op["responses"], (path, method)
            else:
                assert "security" not in op, (path, method)
            for status, response in op["responses"].items():
                content = resolve(doc, response).get("content", {})
                if status.startswith(("4", "5")):
                    assert list(content) == ["application/problem+json"], (path, status)


def test_schemas_follow_the_code(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    request = schemas["AuditRequest"]
    assert set(request["properties"]) == audits_api.BODY_KEYS
    assert set(request["required"]) == {"model_id", "dataset_id", "methods"}
    assert request["additionalProperties"] is False
    assert set(schemas["ModelMetadata"]["properties"]) == models_api.METADATA_KEYS
    assert set(schemas["DatasetMetadata"]["properties"]) == datasets_api.METADATA_KEYS
    assert schemas["AuditState"]["enum"] == list(AUDIT_STATES)
    assert set(schemas["AuditSpec"]["properties"]) == set(AuditSpec.__dataclass_fields__)
    state_filter = [
        p for p in doc["paths"]["/v1/audits"]["get"]["parameters"] if p.get("name") == "state"
    ]
    assert state_filter[0]["schema"] == {"$ref": "#/components/schemas/AuditState"}
    for form, metadata_schema in (
        ("ModelUpload", "ModelMetadata"),
        ("DatasetUpload", "DatasetMetadata"),
    ):
        assert schemas[form]["required"] == ["file"]
        assert schemas[form]["properties"]["metadata"]["$ref"].endswith(metadata_schema)


def test_upload_metadata_schemas(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    model = {"name": "n", "architecture": "resnet18", "input_spec": {"height": 8}}
    validate(doc, {**model, "class_names": ["a", "b"]}, schemas["ModelMetadata"])
    validate(doc, {"architecture": None, "input_spec": None}, schemas["ModelMetadata"])
    for bad in ({"architecture": "resnet-18"}, {"input_spec": {"depth": 3}}, {"colour": 1}):
        with pytest.raises(ValidationError):
            validate(doc, bad, schemas["ModelMetadata"])
    validate(doc, {"name": "pets", "purpose": "training"}, schemas["DatasetMetadata"])
    with pytest.raises(ValidationError):
        validate(doc, {"purpose": "fun"}, schemas["DatasetMetadata"])


def test_building_the_document_does_not_import_torch() -> None:
    code = (
        "import sys; from saliency_audit.service.openapi import openapi_document, docs_html; "
        "openapi_document(); docs_html(); "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_audit_request_schema_accepts_and_refuses_like_the_route(doc: dict[str, Any]) -> None:
    schema = doc["components"]["schemas"]["AuditRequest"]
    good = {
        "model_id": "m",
        "dataset_id": "d",
        "methods": ["gradient", "gradcam"],
        "tests": "all",
        "layers": ["features.3"],
        "seed": 1,
        "params": {"ig_steps": 8},
        "training": None,
        "measures": "ssim,spearman",
    }
    validate(doc, good, schema)
    audits_api.engine_spec(good)  # the route accepts it too
    bad_bodies = (
        {k: v for k, v in good.items() if k != "methods"},
        {**good, "colour": "red"},
        {**good, "methods": ["no_such_method"]},
        {**good, "layer": 3},
        {**good, "seed": "1"},
        {**good, "params": {"no_such_param": 1}},
        {**good, "granularity": "layer"},
    )
    for bad in bad_bodies:
        with pytest.raises(ValidationError):
            validate(doc, bad, schema)
    for engine_refuses in bad_bodies[2:]:  # what engine_spec itself checks
        with pytest.raises((ApiError, EngineError)):
            audits_api.engine_spec(engine_refuses)


def test_upload_rejection_codes_match_service_uploads() -> None:
    """Every (status, code) that saliency_audit.service.uploads can raise is documented on an
    upload."""
    modules = sorted((REPO / "service" / "uploads").glob("*.py"))
    tree = ast.Module([n for m in modules for n in ast.parse(m.read_text()).body], [])
    raised: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        if node.func.id == "UploadRejected":
            code_node = keywords.get("code")
        elif node.func.id == "_reject":
            code_node = node.args[1] if len(node.args) > 1 else keywords.get("code")
        else:
            continue
        status_node = keywords.get("status")
        if not isinstance(code_node, ast.Constant) or not (
            status_node is None or isinstance(status_node, ast.Constant)
        ):
            continue  # a helper passing its own parameters through
        status = 422 if status_node is None else int(str(status_node.value))
        raised.add((status, str(code_node.value)))
    documented = {
        (status, code)
        for table in (MODEL_REJECTIONS, DATASET_REJECTIONS)
        for status, codes in table.items()
        for code in codes
    }
    assert len(raised) > 20
    assert raised == documented


# --- the documentation endpoints --------------------------------------------------------------


def test_openapi_json_and_docs_answer(client: FlaskClient, doc: dict[str, Any]) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.get_json() == doc
    check(doc, response, "/openapi.json", "get")

    page = client.get("/docs")
    assert page.status_code == 200
    text = check(doc, page, "/docs", "get")
    for path, methods in documented_routes(doc).items():
        assert f"<code>{html.escape(path)}</code>" in text, path
        for method in methods:
            anchor = operation_anchor(method, path)
            assert f'id="{anchor}"' in text and f'href="#{anchor}"' in text, (path, method)
    for name in doc["components"]["schemas"]:
        assert f'id="schema-{name}"' in text
    # self-contained: nothing to fetch
    for needle in ("<script", "<link", "src=", "url(", "@import", "//cdn"):
        assert needle not in text.lower(), needle


def test_docs_escape_what_they_show(monkeypatch: pytest.MonkeyPatch) -> None:
    from saliency_audit.service import openapi

    document = openapi_document()
    document["paths"]["/healthz"]["get"]["summary"] = "<b>&up</b>"
    monkeypatch.setattr(openapi, "_document", lambda: document)
    openapi._docs_html.cache_clear()
    try:
        text = openapi.docs_html()
    finally:
        openapi._docs_html.cache_clear()
    assert "&lt;b&gt;&amp;up&lt;/b&gt;" in text and "<b>&up</b>" not in text


# --- real responses against their documented schemas ----------------------------------------


def test_health_and_readiness(
    client: FlaskClient, doc: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert check(doc, client.get("/healthz"), "/healthz", "get") == {"status": "ok"}
    monkeypatch.setattr(meta_api, "broker_ping", lambda config: None)
    assert check(doc, client.get("/readyz"), "/readyz", "get")["status"] == "ready"

    def down(config: Any) -> None:
        raise ConnectionError("no broker")

    monkeypatch.setattr(meta_api, "broker_ping", down)
    response = client.get("/readyz")
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert check(doc, response, "/readyz", "get")["checks"]["broker"].startswith("unreachable")


def test_errors_outside_operations(client: FlaskClient, doc: dict[str, Any]) -> None:
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404
    validate(
        doc,
        missing.get_json(),
        resolve(doc, doc["components"]["responses"]["NotFound"])["content"][
            "application/problem+json"
        ]["schema"],
    )
    wrong = client.put("/healthz")
    assert wrong.status_code == 405 and "GET" in wrong.headers["Allow"]
    not_allowed = resolve(doc, doc["components"]["responses"]["MethodNotAllowed"])
    validate(doc, wrong.get_json(), not_allowed["content"]["application/problem+json"]["schema"])


def test_unauthenticated(client: FlaskClient, doc: dict[str, Any]) -> None:
    for path, method, url in (
        ("/v1/models", "get", "/v1/models"),
        ("/v1/audits/{audit_id}", "delete", "/v1/audits/x"),
        ("/v1/methods", "get", "/v1/methods"),
        ("/v1/models/{model_id}/audits", "get", "/v1/models/x/audits"),
        ("/v1/audits/{audit_id}/report.pdf", "get", "/v1/audits/x/report.pdf"),
        (REPORT_SCHEMA_PATH, "get", REPORT_SCHEMA_PATH),
    ):
        response = client.open(url, method=method.upper())
        assert response.status_code == 401
        assert check(doc, response, path, method)["code"] == "unauthenticated"


def test_methods_catalogue(client: FlaskClient, fake: FakeSession, doc: dict[str, Any]) -> None:
    body = check(doc, client.get("/v1/methods"), "/v1/methods", "get")
    assert body["methods"] and body["tests"] and body["default_policy"]


def test_models(client: FlaskClient, fake: FakeSession, doc: dict[str, Any]) -> None:
    first = add_model(fake)
    second = add_model(fake)
    page = check(doc, client.get("/v1/models?limit=1"), "/v1/models", "get")
    assert page["total"] == 2 and page["items"][0]["id"] == first.id and page["next"]
    bad_page = client.get("/v1/models?limit=0")
    assert check(doc, bad_page, "/v1/models", "get")["code"] == "invalid_pagination"

    one = client.get(f"/v1/models/{second.id}")
    assert check(doc, one, "/v1/models/{model_id}", "get")["id"] == second.id
    assert set(one.get_json()) == set(doc["components"]["schemas"]["Model"]["properties"])
    check(doc, client.get("/v1/models/nope"), "/v1/models/{model_id}", "get")

    add_audit(fake, "running")
    busy = client.delete(f"/v1/models/{first.id}")
    assert busy.status_code == 409
    assert check(doc, busy, "/v1/models/{model_id}", "delete")["audits"]
    fake.rows[Audit].clear()
    gone = client.delete(f"/v1/models/{first.id}")
    assert gone.status_code == 204
    check(doc, gone, "/v1/models/{model_id}", "delete")


def test_model_upload(client: FlaskClient, fake: FakeSession, doc: dict[str, Any]) -> None:
    path = "/v1/models"
    data = (REFERENCE / "digits_small_cnn.onnx").read_bytes()

    def upload(content: bytes, metadata: Any = None) -> TestResponse:
        form: dict[str, Any] = {"file": (io.BytesIO(content), "cnn.onnx")}
        if metadata is not None:
            form["metadata"] = metadata if isinstance(metadata, str) else json.dumps(metadata)
        return client.post(path, data=form, content_type="multipart/form-data")

    created = upload(data, {"name": "digits", "input_spec": {"height": 8, "width": 8}})
    assert created.status_code == 201, created.get_data(as_text=True)
    body = check(doc, created, path, "post")
    assert created.headers["Location"] == body["links"]["self"]
    again = upload(data)
    assert again.status_code == 200 and check(doc, again, path, "post")["id"] == body["id"]

    no_file = client.post(path, data={}, content_type="multipart/form-data")
    assert check(doc, no_file, path, "post")["code"] == "missing_file"
    assert check(doc, upload(data, "{not json"), path, "post")["code"] == "invalid_metadata"
    assert check(doc, upload(data, {"colour": 1}), path, "post")["code"] == "unknown_fields"
    assert check(doc, upload(b""), path, "post")["code"] == "empty_file"
    refused = upload(b"\x08\x07 certainly not onnx")
    assert refused.status_code == 422 and check(doc, refused, path, "post")["code"] == (
        "invalid_onnx"
    )


def test_datasets(client: FlaskClient, fake: FakeSession, doc: dict[str, Any]) -> None:
    path = "/v1/datasets"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for image in sorted((REFERENCE / "digits_images").glob("*.png"))[:2]:
            archive.write(image, image.name)

    def upload(content: bytes, metadata: Any = None) -> TestResponse:
        form: dict[str, Any] = {"file": (io.BytesIO(content), "digits.zip")}
        if metadata is not None:
            form["metadata"] = json.dumps(metadata)
        return client.post(path, data=form, content_type="multipart/form-data")

    created = upload(buffer.getvalue(), {"name": "digits", "purpose": "audit"})
    assert created.status_code == 201, created.get_data(as_text=True)
    body = check(doc, created, path, "post")
    assert upload(buffer.getvalue()).status_code == 200
    assert check(doc, upload(b"plain text"), path, "post")["code"] == "unsupported_format"
    invalid = upload(buffer.getvalue(), {"purpose": "fun"})
    assert check(doc, invalid, path, "post")["code"] == "invalid_metadata"

    page = check(doc, client.get(path), path, "get")
    assert page["total"] == 1 and page["next"] is None
    one = client.get(f"{path}/{body['id']}")
    detail = check(doc, one, "/v1/datasets/{dataset_id}", "get")
    assert len(detail["images"]) == 2
    labeled = add_dataset(fake)
    check(doc, client.get(f"{path}/{labeled.id}"), "/v1/datasets/{dataset_id}", "get")
    check(doc, client.get(f"{path}/nope"), "/v1/datasets/{dataset_id}", "get")

    add_audit(fake, "queued", dataset_id=labeled.id)
    busy = client.delete(f"{path}/{labeled.id}")
    assert check(doc, busy, "/v1/datasets/{dataset_id}", "delete")["code"] == "dataset_in_use"
    fake.rows[Audit].clear()
    gone = client.delete(f"{path}/{labeled.id}")
    assert gone.status_code == 204
    assert check(doc, gone, "/v1/datasets/{dataset_id}", "delete") is None


def test_audit_submission(client: FlaskClient, fake: FakeSession, doc: dict[str, Any]) -> None:
    path = "/v1/audits"
    model, dataset = add_model(fake), add_dataset(fake)
    body = {"model_id": model.id, "dataset_id": dataset.id, "methods": ["gradient"]}
    headers = {"Idempotency-Key": "k-1"}
    accepted = client.post(path, json=body, headers=headers)
    assert accepted.status_code == 202, accepted.get_data(as_text=True)
    audit = check(doc, accepted, path, "post")
    assert audit["state"] == "queued" and accepted.headers["Retry-After"]
    assert accepted.headers["Location"] == audit["links"]["self"]
    assert set(audit) == set(doc["components"]["schemas"]["Audit"]["properties"]) - {"verdicts"}

    replay = client.post(path, json=body, headers=headers)
    assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"
    check(doc, replay, path, "post")
    fake.rows[Audit][0].state = "succeeded"
    finished = client.post(path, json=body, headers=headers)
    assert finished.status_code == 200 and check(doc, finished, path, "post")["id"] == audit["id"]
    reused = client.post(path, json={**body, "seed": 3}, headers=headers)
    assert check(doc, reused, path, "post")["code"] == "idempotency_key_reused"

    fake.rows[Audit].clear()
    for request_body, code in (
        ({**body, "methods": ["nope"]}, "invalid_spec"),
        ({**body, "colour": "red"}, "unknown_fields"),
        ({**body, "model_id": "missing"}, "unknown_model"),
        ({**body, "tests": ["data_randomization"]}, "training_set_required"),
        ({**body, "layer": 3}, "invalid_field"),
        ({**body, "webhook_url": 5}, "invalid_field"),
        ({**body, "webhook_url": "ftp://hooks.example.com/x"}, "invalid_webhook_url"),
        ({**body, "webhook_url": "http://10.0.0.1/hook"}, "invalid_webhook_url"),
        ({**body, "policy": "strict"}, "invalid_policy"),
        ([1, 2], "invalid_json"),
    ):
        response = client.post(path, json=request_body)
        assert check(doc, response, path, "post")["code"] == code
    text = client.post(path, data="x", content_type="text/plain")
    assert check(doc, text, path, "post")["code"] == "unsupported_media_type"
    long_key = client.post(path, json=body, headers={"Idempotency-Key": "k" * 201})
    assert check(doc, long_key, path, "post")["code"] == "invalid_idempotency_key"


def test_audit_submission_with_a_webhook(
    app: Flask,
    client: FlaskClient,
    fake: FakeSession,
    doc: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    st: State = app.extensions["saliency_audit"]
    # a private host: no name is resolved, nothing is called (the enqueuer is a stand-in)
    monkeypatch.setattr(st, "config", dataclasses.replace(st.config, webhook_allow_private=True))
    model, dataset = add_model(fake), add_dataset(fake)
    url = "https://hooks.internal.example/saliency"
    body = {
        "model_id": model.id,
        "dataset_id": dataset.id,
        "methods": ["gradient"],
        "webhook_url": url,
    }
    validate(doc, body, doc["components"]["schemas"]["AuditRequest"])
    accepted = client.post("/v1/audits", json=body)
    assert accepted.status_code == 202, accepted.get_data(as_text=True)
    audit = check(doc, accepted, "/v1/audits", "post")
    assert audit["webhook"] == {"url": url, "state": None, "attempts": 0, "error": None}
    assert audit["documents_state"] is None

    row = fake.rows[Audit][0]
    row.state, row.finished_at, row.error = "failed", NOW, {"code": "boom", "message": "no"}
    row.webhook_state, row.webhook_attempts, row.webhook_error = "failed", 6, "HTTP 500"
    polled = check(doc, client.get(audit["links"]["self"]), "/v1/audits/{audit_id}", "get")
    assert polled["webhook"] == {"url": url, "state": "failed", "attempts": 6, "error": "HTTP 500"}

    callback = doc["paths"]["/v1/audits"]["post"]["callbacks"]["auditFinished"]
    assert list(callback) == ["{$request.body#/webhook_url}"]


def test_audit_lifecycle(client: FlaskClient, fake: FakeSession, doc: dict[str, Any]) -> None:
    item = "/v1/audits/{audit_id}"
    queued = add_audit(fake, "queued")
    running = add_audit(fake, "running")
    failed = add_audit(fake, "failed")

    page = check(
        doc, client.get(f"/v1/audits?model_id={queued.model_id}&limit=2"), "/v1/audits", "get"
    )
    assert page["total"] == 3 and len(page["items"]) == 2 and "model_id=" in page["next"]
    only = check(doc, client.get("/v1/audits?state=running"), "/v1/audits", "get")
    assert [a["id"] for a in only["items"]] == [running.id] and only["next"] is None
    bad = client.get("/v1/audits?state=sleeping")
    assert check(doc, bad, "/v1/audits", "get")["code"] == "invalid_filter"

    polled = client.get(f"/v1/audits/{running.id}")
    assert polled.headers["Retry-After"] and "verdicts" not in check(doc, polled, item, "get")
    assert check(doc, client.get(f"/v1/audits/{failed.id}"), item, "get")["error"]
    check(doc, client.get("/v1/audits/nope"), item, "get")

    canceled = client.delete(f"/v1/audits/{queued.id}")
    assert canceled.status_code == 200 and check(doc, canceled, item, "delete")["state"] == (
        "canceled"
    )
    requested = client.delete(f"/v1/audits/{running.id}")
    assert requested.status_code == 202
    assert check(doc, requested, item, "delete")["cancel_requested"] is True
    for suffix, path in (
        ("/results", "/v1/audits/{audit_id}/results"),
        ("/heatmaps", "/v1/audits/{audit_id}/heatmaps"),
        ("/report.json", "/v1/audits/{audit_id}/report.json"),
    ):
        response = client.get(f"/v1/audits/{failed.id}{suffix}")
        assert check(doc, response, path, "get")["code"] == "audit_not_succeeded"
    # a final audit is deleted (before real deletion: 409 audit_finished)
    finished = client.delete(f"/v1/audits/{failed.id}")
    assert finished.status_code == 204 and check(doc, finished, item, "delete") is None
    assert client.get(f"/v1/audits/{failed.id}").status_code == 404


def test_audit_results(
    app: Flask, client: FlaskClient, fake: FakeSession, doc: dict[str, Any]
) -> None:
    store = app.extensions["saliency_audit"].store
    report = store.put_bytes(json.dumps({"audit": "report"}).encode())
    audit = add_audit(fake, "succeeded", report_sha256=report)
    heatmap = add_results(fake, audit, store)
    base = f"/v1/audits/{audit.id}"

    body = check(doc, client.get(base), "/v1/audits/{audit_id}", "get")
    assert [v["verdict"] for v in body["verdicts"]] == ["PASS", "INCONCLUSIVE"]
    assert set(body) == set(doc["components"]["schemas"]["Audit"]["properties"])
    verdict_keys = set(doc["components"]["schemas"]["Verdict"]["properties"])
    assert set(body["verdicts"][0]) == verdict_keys

    results = check(
        doc, client.get(base + "/results?test=cascading"), "/v1/audits/{audit_id}/results", "get"
    )
    assert set(results["items"][0]) == set(doc["components"]["schemas"]["Result"]["properties"])
    maps = check(doc, client.get(base + "/heatmaps"), "/v1/audits/{audit_id}/heatmaps", "get")
    assert set(maps["items"][0]) == set(doc["components"]["schemas"]["Heatmap"]["properties"])

    png_path = "/v1/audits/{audit_id}/heatmaps/{heatmap_id}.png"
    png = client.get(maps["items"][0]["url"])
    assert png.status_code == 200
    check(doc, png, png_path, "get")
    cached = client.get(maps["items"][0]["url"], headers={"If-None-Match": png.headers["ETag"]})
    assert cached.status_code == 304
    check(doc, cached, png_path, "get")
    check(doc, client.get(f"{base}/heatmaps/{heatmap.id + 1}.png"), png_path, "get")

    report_path = "/v1/audits/{audit_id}/report.json"
    full = client.get(base + "/report.json")
    assert check(doc, full, report_path, "get") == {"audit": "report"}
    store.delete(report)
    missing = client.get(base + "/report.json")
    assert check(doc, missing, report_path, "get")["code"] == "report_missing"


def add_verdict(
    session: FakeSession, audit: Audit, test: str, verdict: str, mean: float | None
) -> VerdictRow:
    return session.add(
        VerdictRow(
            tenant_id=TENANT,
            audit_id=audit.id,
            method="gradient",
            test=test,
            verdict=verdict,
            reason="because",
            measure="ssim" if mean is not None else None,
            stage=None,
            threshold=None,
            mean=mean,
            ci_low=None,
            ci_high=None,
            n=4,
            is_control=False,
            policy_version="1.0.0",
        )
    )


def test_audit_documents(
    app: Flask, client: FlaskClient, fake: FakeSession, doc: dict[str, Any]
) -> None:
    """report.pdf and report: every answer a route gives without a worker."""
    store = app.extensions["saliency_audit"].store
    routes = (
        ("pdf", "/v1/audits/{audit_id}/report.pdf", "report_pdf", "application/pdf"),
        ("html", "/v1/audits/{audit_id}/report", "report_html", "text/html; charset=utf-8"),
    )
    failed = add_audit(fake, "failed")
    rendering = add_audit(fake, "succeeded", documents_state="pending")
    broken = add_audit(
        fake, "succeeded", documents_state="failed", documents_error="RuntimeError: no font"
    )
    ready = add_audit(fake, "succeeded", documents_state="ready")
    for link, path, kind, media_type in routes:
        data = b"%PDF-1.7\n%%EOF\n" if link == "pdf" else b"<!DOCTYPE html><title>r</title>"
        fake.add(
            AuditArtifact(
                tenant_id=TENANT,
                audit_id=ready.id,
                kind=kind,
                sha256=store.put_bytes(data),
                media_type=media_type,
                size_bytes=len(data),
            )
        )

        def url(audit: Audit, link: str = link) -> str:
            links = check(doc, client.get(f"/v1/audits/{audit.id}"), "/v1/audits/{audit_id}", "get")
            return str(links["links"][link])

        missing = client.get(url(failed).replace(failed.id, "nope"))
        assert missing.status_code == 404
        check(doc, missing, path, "get")

        early = client.get(url(failed))
        assert early.status_code == 409 and "Retry-After" not in early.headers
        assert check(doc, early, path, "get")["code"] == "audit_not_succeeded"

        wait = client.get(url(rendering))
        assert wait.status_code == 409
        assert wait.headers["Retry-After"] == str(audits_api.RETRY_AFTER_S)
        problem = check(doc, wait, path, "get")
        assert problem["code"] == "report_rendering" and problem["documents_state"] == "pending"

        gave_up = client.get(url(broken))
        assert gave_up.status_code == 500
        assert check(doc, gave_up, path, "get")["code"] == "report_render_failed"

        served = client.get(url(ready))
        assert served.status_code == 200 and served.get_data() == data
        check(doc, served, path, "get")
        cached = client.get(url(ready), headers={"If-None-Match": served.headers["ETag"]})
        assert cached.status_code == 304
        check(doc, cached, path, "get")
        store.delete(served.headers["ETag"].strip('"'))
        lost = client.get(url(ready))
        assert lost.status_code == 500
        assert check(doc, lost, path, "get")["code"] == "artifact_missing"


def test_model_history(client: FlaskClient, fake: FakeSession, doc: dict[str, Any]) -> None:
    path = "/v1/models/{model_id}/audits"
    model = add_model(fake)
    first = add_audit(
        fake,
        "succeeded",
        verdict_summary={"gradient": {"cascading": "PASS", "independent": "FAIL"}},
    )
    add_verdict(fake, first, "cascading", "PASS", 0.2)
    add_verdict(fake, first, "independent", "FAIL", 0.9)
    second = add_audit(fake, "succeeded", verdict_summary={"gradient": {"cascading": "FAIL"}})
    add_verdict(fake, second, "cascading", "FAIL", 0.8)
    add_audit(fake, "queued")

    history = client.get(f"/v1/models/{model.id}/audits?limit=2")
    body = check(doc, history, path, "get")
    assert body["total"] == 3 and len(body["items"]) == 2 and body["next"]
    audit_keys = set(doc["components"]["schemas"]["Audit"]["properties"]) - {"verdicts"}
    assert all(set(item) == audit_keys for item in body["items"])
    assert [p["audit_id"] for p in body["trend"]["gradient"]] == [first.id, second.id]
    comparison = body["comparison"]
    assert (comparison["previous_audit_id"], comparison["latest_audit_id"]) == (
        first.id,
        second.id,
    )
    changes = {c["test"]: c for c in comparison["changes"]}
    assert changes["cascading"]["changed"] is True and changes["cascading"]["latest"] == "FAIL"
    assert changes["independent"]["latest"] is None and changes["independent"]["changed"]

    lonely = add_model(fake)
    add_audit(fake, "succeeded", model_id=lonely.id)
    alone = check(doc, client.get(f"/v1/models/{lonely.id}/audits"), path, "get")
    assert alone["total"] == 1 and alone["comparison"] is None and alone["next"] is None

    unknown = client.get("/v1/models/nope/audits")
    assert unknown.status_code == 404
    check(doc, unknown, path, "get")
    bad_page = client.get(f"/v1/models/{model.id}/audits?limit=0")
    assert check(doc, bad_page, path, "get")["code"] == "invalid_pagination"


def test_report_schema_endpoint(
    client: FlaskClient, fake: FakeSession, doc: dict[str, Any]
) -> None:
    response = client.get(REPORT_SCHEMA_PATH)
    assert response.status_code == 200 and response.mimetype == "application/schema+json"
    schema = check(doc, response, REPORT_SCHEMA_PATH, "get")
    Draft202012Validator.check_schema(schema)
    assert schema == report_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["schema_version"] == {"const": SCHEMA_VERSION}

    # report.json points at it (an external $ref would not be checked by the validator)
    report = doc["paths"]["/v1/audits/{audit_id}/report.json"]["get"]["responses"]["200"]
    assert report["content"]["application/json"]["schema"]["type"] == "object"
    assert REPORT_SCHEMA_PATH in report["description"]
    assert (
        report["links"]["schema"]["operationId"]
        == (doc["paths"][REPORT_SCHEMA_PATH]["get"]["operationId"])
    )


def test_webhook_event_is_what_service_webhooks_sends(
    fake: FakeSession, doc: dict[str, Any]
) -> None:
    schema = doc["components"]["schemas"]["WebhookEvent"]
    for state in ("succeeded", "failed", "canceled"):
        audit = add_audit(fake, state, webhook_url="https://hooks.example.com/x")
        event = payload(audit)
        validate(doc, event, schema)
        assert set(event) == set(schema["properties"])

    callback = doc["paths"]["/v1/audits"]["post"]["callbacks"]["auditFinished"]
    operation = callback["{$request.body#/webhook_url}"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/WebhookEvent"
    }
    [header] = operation["parameters"]
    assert header["name"] == SIGNATURE_HEADER and header["in"] == "header"
    signature = sign("whsec_test", b'{"event":"audit.finished"}', 1_700_000_000)
    assert re.fullmatch(SIGNATURE_PATTERN, signature)
    assert re.fullmatch(header["schema"]["pattern"], signature)
    fresh = sign("whsec_test", b"{}", int(datetime.now(UTC).timestamp()))
    assert verify("whsec_test", b"{}", fresh) and not verify("whsec_other", b"{}", fresh)


def test_api_error_codes_are_documented(doc: dict[str, Any]) -> None:
    """Every ``ApiError(status, "code")`` the routes raise is a documented (status, code)."""
    raised: set[tuple[int, str]] = set()
    for source in [*sorted((REPO / "service" / "api").glob("*.py")), REPO / "service" / "auth.py"]:
        for node in ast.walk(ast.parse(source.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "ApiError"
                and len(node.args) >= 2
                and all(isinstance(a, ast.Constant) for a in node.args[:2])
            ):
                status, code = node.args[0], node.args[1]
                assert isinstance(status, ast.Constant) and isinstance(code, ast.Constant)
                raised.add((int(str(status.value)), str(code.value)))
    documented: set[tuple[int, str]] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            # a problem response: the Problem component narrowed by keywords beside its $ref
            if node.get("$ref") == "#/components/schemas/Problem" and "properties" in node:
                fields = node["properties"]
                documented.update((fields["status"]["const"], c) for c in fields["code"]["enum"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert {(409, "report_rendering"), (422, "invalid_webhook_url")} <= raised
    assert raised - documented == set()
