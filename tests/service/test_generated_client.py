"""A client generated from the served ``/openapi.json`` by openapi-python-client, the way a user
makes one (``openapi-python-client generate --url ... --meta none``, default settings), runs the
whole flow against a real API and worker: it uploads a model and an image set (binary file
parts), submits an audit, polls it, reads report.json as the typed ``Report`` and parses an
error as the one ``Problem`` type.

Only the PDF and PNG bodies stay untyped in the generated code (openapi-python-client has no
type for those media types; ``response.content`` holds the bytes).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.service.openapi import openapi_document
from tests.servers import REFERENCE, Server, Worker, new_key

GENERATOR = Path(sys.executable).with_name("openapi-python-client")
PACKAGE = "saliency_audit_generated_client"
DIGITS_MODEL = REFERENCE / "digits_small_cnn.onnx"
# what the generator cannot type, and says so; everything else must be kept
UNTYPED = {
    "GET /v1/audits/{audit_id}/report.pdf",
    "GET /v1/audits/{audit_id}/heatmaps/{heatmap_id}.png",
}


def digits_zip(count: int = 4) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((REFERENCE / "digits_images").glob("*.png"))[:count]:
            archive.write(path, path.name)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def generated_at(pg_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The folder holding the client package generated from the running server's document
    (once per module: generating takes a few seconds), on sys.path."""
    root = tmp_path_factory.mktemp("generated-client")
    # the generator's default post-hooks run ruff, installed beside it
    env = {**os.environ, "PATH": f"{GENERATOR.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [
            str(GENERATOR),
            "generate",
            "--url",
            f"{pg_server.url}/openapi.json",
            "--meta",
            "none",
            "--output-path",
            str(root / PACKAGE),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert set(re.findall(r"WARNING parsing (\S+ \S+) within", output)) == UNTYPED, output

    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


@pytest.fixture
def generated(generated_at: Path) -> Callable[[str], ModuleType]:
    """Imports a module of the generated client: ``"models"``, ``"api.audits.get_audit"``."""
    return lambda name: importlib.import_module(f"{PACKAGE}.{name}" if name else PACKAGE)


def test_the_document_uses_shapes_generators_keep() -> None:
    """Without a server: the shapes the generated client below relies on."""
    doc = openapi_document()
    schemas = doc["components"]["schemas"]
    for form in ("ModelUpload", "DatasetUpload"):
        assert schemas[form]["properties"]["file"]["format"] == "binary"
    problems = [
        media["schema"]
        for item in doc["paths"].values()
        for op in item.values()
        if isinstance(op, dict) and "responses" in op
        for response in op["responses"].values()
        for name, media in response.get("content", {}).items()
        if name == "application/problem+json"
    ] + [
        r["content"]["application/problem+json"]["schema"]
        for r in doc["components"]["responses"].values()
        if "content" in r
    ]
    assert len(problems) > 30
    for schema in problems:
        assert schema["$ref"] == "#/components/schemas/Problem" and "allOf" not in schema
        assert isinstance(schema["properties"]["status"]["const"], int)
    report = doc["paths"]["/v1/audits/{audit_id}/report.json"]["get"]["responses"]["200"]
    assert {"$ref": "#/components/schemas/Report"} in report["content"]["application/json"][
        "schema"
    ]["anyOf"]


def test_the_generated_models_have_one_type_per_shape(
    generated: Callable[[str], ModuleType], generated_at: Path
) -> None:
    models = generated("models")
    files = {p.stem for p in (generated_at / PACKAGE / "models").glob("*.py")}
    # a nullable enum is one enum type (with None), not one per JSON type
    assert not [f for f in files if re.search(r"_type_\d+_type_\d+$", f)], sorted(files)
    # the nullable enums are named components: one type each, shared by every field using it
    assert {"documents_state", "webhook_state", "verdict_value"} <= files
    assert not [f for f in files if re.search(r"state_type_\d+$", f)], sorted(files)
    assert {m.value for m in models.DocumentsState} == {"pending", "ready", "failed"}
    # every error of every operation is the one Problem type
    assert not [f for f in files if re.search(r"_response_[45]\d\d$", f)], sorted(files)
    # the upload's file part is a binary file
    upload = (generated_at / PACKAGE / "models" / "model_upload.py").read_text()
    assert "file: File" in upload


def test_a_generated_client_uploads_audits_and_reads_a_typed_report(
    generated: Callable[[str], ModuleType],
    pg_server: Server,
    pg_config: Config,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
) -> None:
    worker_factory(pg_config)
    package = generated("")
    models = generated("models")
    file_type = generated("types").File

    def api(operation: str) -> Any:
        return generated(f"api.{operation}")

    client = package.AuthenticatedClient(
        base_url=pg_server.url,
        token=new_key(pg_database),
        raise_on_unexpected_status=True,
        timeout=60.0,
    )

    created = api("models.upload_model").sync_detailed(
        client=client,
        body=models.ModelUpload(
            file=file_type(payload=io.BytesIO(DIGITS_MODEL.read_bytes()), file_name="cnn.onnx"),
            metadata=models.ModelMetadata(name="digits cnn"),
        ),
    )
    assert created.status_code == 201, created.content
    model = created.parsed
    assert isinstance(model, models.Model)
    assert model.name == "digits cnn" and model.format_ == models.ModelFormat.ONNX

    uploaded = api("datasets.upload_dataset").sync_detailed(
        client=client,
        body=models.DatasetUpload(file=file_type(payload=digits_zip(), file_name="digits.zip")),
    )
    assert uploaded.status_code == 201, uploaded.content
    dataset = uploaded.parsed
    assert isinstance(dataset, models.Dataset) and dataset.n_images == 4

    submitted = api("audits.submit_audit").sync_detailed(
        client=client,
        body=models.AuditRequest(
            model_id=model.id,
            dataset_id=dataset.id,
            methods=[models.AuditRequestMethodsType0Item.GRADIENT],
            tests=[models.AuditRequestTestsType0Item.CASCADING],
            measures=[models.AuditRequestMeasuresType0Item.SSIM],
        ),
    )
    assert submitted.status_code == 202, submitted.content
    audit = submitted.parsed
    assert isinstance(audit, models.Audit) and audit.state == models.AuditState.QUEUED

    final = {models.AuditState.SUCCEEDED, models.AuditState.FAILED, models.AuditState.CANCELED}
    deadline = time.monotonic() + 240
    while audit.state not in final and time.monotonic() < deadline:
        time.sleep(0.3)
        polled = api("audits.get_audit").sync_detailed(client=client, audit_id=audit.id)
        assert polled.status_code == 200 and isinstance(polled.parsed, models.Audit)
        audit = polled.parsed
    assert audit.state == models.AuditState.SUCCEEDED, audit.to_dict()
    assert {(v.method, v.test) for v in audit.verdicts} >= {("gradient", "cascading")}

    fetched = api("results.audit_report").sync_detailed(client=client, audit_id=audit.id)
    assert fetched.status_code == 200
    report = fetched.parsed
    assert isinstance(report, models.Report), fetched.content[:500]
    # the Report component (derived from the served report schema) holds a real report exactly
    components = openapi_document()["components"]
    Draft202012Validator(
        {"$ref": "#/components/schemas/Report", "components": components}
    ).validate(json.loads(fetched.content))
    assert report.model.sha256 == model.sha256
    assert all(isinstance(v, models.ReportVerdict) for v in report.verdicts)
    assert {(v.method, v.test, v.verdict.value) for v in report.verdicts} == {
        (v.method, v.test, v.verdict.value) for v in audit.verdicts
    }

    # errors: the one Problem type, with the route's own fields kept
    missing = api("audits.get_audit").sync_detailed(client=client, audit_id="0" * 32)
    assert missing.status_code == 404 and isinstance(missing.parsed, models.Problem)
    assert (missing.parsed.status, missing.parsed.code) == (404, "not_found")
    missing_model = api("models.delete_model").sync_detailed(client=client, model_id="0" * 32)
    assert missing_model.status_code == 404 and isinstance(missing_model.parsed, models.Problem)
    refused = api("audits.submit_audit").sync_detailed(
        client=client,
        body=models.AuditRequest(
            model_id=model.id, dataset_id=dataset.id, methods="gradient,no_such_method"
        ),
    )
    assert refused.status_code == 422 and isinstance(refused.parsed, models.Problem)
    assert refused.parsed.code == "invalid_spec", refused.parsed.to_dict()
    assert refused.parsed["unknown"] == ["no_such_method"]

    # a finished audit is deleted by the same operation that cancels an active one
    deleted = api("audits.cancel_audit").sync_detailed(client=client, audit_id=audit.id)
    assert deleted.status_code == 204
