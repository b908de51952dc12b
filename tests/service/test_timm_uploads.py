"""Weights for a timm architecture (``timm:NAME``) over the API: the API, which has no timm,
checks the name's syntax at upload; the worker's inspection loads the model and records a
problem when timm does not have the name or is not installed, and POST /v1/audits refuses
the audit with that problem instead of queueing one that would fail.

Embedded mode (SQLite, in process); the inspection task runs here, as a worker runs it."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from saliency_audit.service import db as service_db
from saliency_audit.service.app import create_app
from saliency_audit.service.auth import create_key
from saliency_audit.service.config import Config
from saliency_audit.service.jobs import Runtime
from saliency_audit.service.models import ModelRecord
from saliency_audit.workers.engine.contract.architectures import TIMM_MISSING
from saliency_audit.workers.tasks import inspect_model
from tests.engine.timm_models import hide_timm, safetensors_weights, timm_model
from tests.service.test_end_to_end import digits_zip

ARCH = "mobilenetv3_small_050"


@pytest.fixture(scope="module")
def weights() -> bytes:
    return safetensors_weights(timm_model(ARCH, num_classes=3))


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    config = Config(data_dir=tmp_path, reconcile_in_api=False)
    service_db.upgrade(config.resolved_database_url)
    return create_app(config)


@pytest.fixture
def inspections(app: Flask, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The model ids the API asks a worker to inspect (no worker consumes the queue here)."""
    asked: list[str] = []
    enqueue = app.extensions["saliency_audit"].enqueue
    monkeypatch.setattr(enqueue, "inspect_model", lambda model_id: asked.append(model_id) or True)
    return asked


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    with app.extensions["saliency_audit"].db.session() as session:
        key, _ = create_key(session, "tenant-timm")
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client


def upload(client: FlaskClient, weights: bytes, architecture: str) -> Any:
    return client.post(
        "/v1/models",
        data={
            "file": (io.BytesIO(weights), "w.safetensors"),
            "metadata": json.dumps({"architecture": architecture}),
        },
    )


def inspect(app: Flask, model_id: str) -> tuple[str, dict[str, Any]]:
    """The worker's inspection of the model, then the model's stored details."""
    state = app.extensions["saliency_audit"]
    outcome = inspect_model(Runtime.from_config(state.config), model_id)
    with state.db.session() as session:
        row = session.get(ModelRecord, model_id)
        assert row is not None
        return outcome, dict(row.details or {})


def submit(client: FlaskClient, model_id: str) -> Any:
    dataset = client.post("/v1/datasets", data={"file": (io.BytesIO(digits_zip(2)), "d.zip")})
    assert dataset.status_code in (200, 201), dataset.get_data(as_text=True)  # 200: stored
    body = {"model_id": model_id, "dataset_id": dataset.get_json()["id"], "methods": ["gradient"]}
    return client.post("/v1/audits", json=body)


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/problem+json"
    problem: dict[str, Any] = response.get_json()
    assert problem["code"] == code
    return problem


def test_timm_weights_upload_and_the_worker_lists_their_layers(
    app: Flask, client: FlaskClient, inspections: list[str], weights: bytes
) -> None:
    refused = upload(client, weights, "timm:MobileNet-V3")
    problem = assert_problem(refused, 422, "unknown_architecture")
    assert "lowercase letters, digits and underscores" in problem["detail"]

    response = upload(client, weights, f"timm:{ARCH}")
    assert response.status_code == 201, response.get_data(as_text=True)
    model = response.get_json()
    assert model["architecture"] == f"timm:{ARCH}" and model["format"] == "safetensors"
    assert any("timm has that model" in note for note in model["details"]["notes"])
    assert inspections == [model["id"]]

    outcome, details = inspect(app, model["id"])
    assert outcome == "inspected"
    assert "blocks.5.0.conv" in details["layers"]["conv"]
    # the input size timm's pretrained_cfg gives the model, for the cost estimate at submit
    assert details["input_shape"] == [None, 3, 224, 224]
    assert submit(client, model["id"]).status_code == 202


def test_a_name_timm_does_not_have_is_refused_at_submit_with_close_names(
    app: Flask, client: FlaskClient, inspections: list[str], weights: bytes
) -> None:
    model = upload(client, weights, "timm:mobilenetv3_small_05").get_json()
    outcome, details = inspect(app, model["id"])
    assert outcome == "not_loadable"
    assert details["load_problem"]["code"] == "unknown_architecture"
    problem = assert_problem(submit(client, model["id"]), 422, "model_not_loadable")
    assert problem["cause"] == "unknown_architecture"
    assert "has no model 'mobilenetv3_small_05'; did you mean" in problem["detail"]
    assert ARCH in problem["detail"]


def test_without_timm_in_the_worker_submit_says_how_to_install_it_until_it_is(
    app: Flask,
    client: FlaskClient,
    inspections: list[str],
    weights: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = upload(client, weights, f"timm:{ARCH}").get_json()
    with monkeypatch.context() as patch:
        hide_timm(patch)
        outcome, details = inspect(app, model["id"])
    assert outcome == "not_loadable"
    assert details["load_problem"] == {"code": "architecture_unavailable", "message": TIMM_MISSING}
    problem = assert_problem(submit(client, model["id"]), 422, "model_not_loadable")
    assert problem["detail"] == f"the model does not load in the worker: {TIMM_MISSING}"
    assert problem["cause"] == "architecture_unavailable"

    # timm installed since: the same file uploaded again is inspected again, and loads
    again = upload(client, weights, f"timm:{ARCH}")
    assert again.status_code == 200 and again.get_json()["id"] == model["id"]
    assert inspections == [model["id"], model["id"]]
    outcome, details = inspect(app, model["id"])
    assert outcome == "inspected" and "load_problem" not in details
    assert submit(client, model["id"]).status_code == 202
