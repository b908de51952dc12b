"""Every request is bounded before it is queued (issue 18, item 1).

Upper bounds on every parameter come from the contract (a 422 with the field and the bound,
and the same bounds in /openapi.json); JSON bodies have their own small limit (413 before the
body is read).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, g
from flask.testing import FlaskClient

import saliency_audit.service.auth
from saliency_audit.service.app import State, create_app
from saliency_audit.service.config import Config
from saliency_audit.workers.engine.contract import spec as contract
from tests.service.test_openapi import TENANT, FakeSession, add_dataset, add_model

SUBMIT = {"model_id": "m", "dataset_id": "d", "methods": ["gradient"]}


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    return create_app(Config(data_dir=tmp_path, reconcile_in_api=False))


@pytest.fixture
def client(app: Flask, monkeypatch: pytest.MonkeyPatch) -> FlaskClient:
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
    return app.test_client()


def submit(client: FlaskClient, **fields: Any) -> Any:
    response = client.post("/v1/audits", json={**SUBMIT, **fields})
    assert response.mimetype == "application/problem+json", response.get_data(as_text=True)
    return response


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        (
            {"params": {"noise_samples": 10**7}},
            "noise_samples",
            "noise_samples must be in [1, 1024]",
        ),
        ({"params": {"ig_steps": 5000}}, "ig_steps", "ig_steps must be in [1, 1024]"),
        ({"params": {"smprt_samples": 10**6}}, "smprt_samples", "in [1, 1024]"),
        ({"training": {"max_epochs": 10**6}}, "max_epochs", "max_epochs must be in [1, 2000]"),
        ({"training": {"batch_size": 10**6}}, "batch_size", "in [1, 4096]"),
        ({"batch_size": 10**5}, "batch_size", "batch_size must be in [1, 1024]"),
        ({"seed": 2**64}, "seed", f"seed must be in [0, {2**63 - 1}]"),
        ({"seed": 2**63}, "seed", f"seed must be in [0, {2**63 - 1}]"),
        ({"seed": -1}, "seed", "seed must be in [0, "),
        ({"layers": [f"m{i}" for i in range(300)]}, "layers", "at most 256 items"),
        ({"layer": "x" * 500}, "layer", "at most 200 characters"),
    ],
)
def test_a_parameter_above_its_bound_is_refused_at_submit_with_the_field_and_the_bound(
    client: FlaskClient, fields: dict[str, Any], field: str, words: str
) -> None:
    response = submit(client, **fields)
    assert response.status_code == 422
    body = response.get_json()
    assert body["code"] == "invalid_spec"
    assert body["field"] == field
    assert words in body["detail"]


def test_the_largest_allowed_values_are_accepted_by_the_contract() -> None:
    spec = contract.AuditSpec(
        methods=("gradient",),
        seed=contract.MAX_SEED,
        batch_size=contract.MAX_BATCH,
        params=contract.MethodParams(
            noise_samples=contract.MAX_SAMPLES, ig_steps=contract.MAX_SAMPLES
        ),
    )
    assert spec.seed == 2**63 - 1


def test_the_largest_seed_is_accepted_by_every_rng_the_engine_seeds() -> None:
    import numpy as np
    import torch

    torch.Generator().manual_seed(contract.MAX_SEED)
    np.random.default_rng(contract.MAX_SEED)
    np.random.SeedSequence(contract.MAX_SEED).spawn(2)


def test_the_bounds_are_in_the_openapi_document(client: FlaskClient) -> None:
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    params = schemas["MethodParams"]["properties"]
    for name in ("noise_samples", "ig_steps", "smprt_samples"):
        assert params[name]["maximum"] == contract.MAX_SAMPLES
    assert params["faithfulness_steps"]["maximum"] == contract.MAX_CURVE_STEPS
    training = schemas["TrainRecipe"]["properties"]
    assert training["max_epochs"]["maximum"] == contract.MAX_EPOCHS
    assert training["max_seconds"]["maximum"] == contract.MAX_TRAIN_SECONDS
    request = schemas["AuditRequest"]["properties"]
    assert request["seed"]["maximum"] == 2**63 - 1
    assert request["batch_size"]["maximum"] == contract.MAX_BATCH
    assert schemas["AuditSpec"]["properties"]["layers"]["anyOf"][0]["maxItems"] == 256


class CountingStream(io.BytesIO):
    """A request body that records how many bytes the server read from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.read_bytes = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.read_bytes += len(chunk)
        return chunk

    def readline(self, size: int | None = -1) -> bytes:
        chunk = super().readline(size)
        self.read_bytes += len(chunk)
        return chunk


def big_json(size: int) -> bytes:
    body = json.dumps({**SUBMIT, "layer": ""}).encode()
    return body[:-3] + b'"' + b"x" * (size - len(body)) + b'"}'


def test_a_2_mb_json_body_is_a_413_before_the_api_reads_it(client: FlaskClient) -> None:
    data = big_json(2 * 1024 * 1024)
    stream = CountingStream(data)
    response = client.post(
        "/v1/audits",
        input_stream=stream,
        content_type="application/json",
        headers={"Content-Length": str(len(data))},
    )
    assert response.status_code == 413
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["code"] == "body_too_large"
    assert body["limit_bytes"] == 1024 * 1024
    assert stream.read_bytes == 0


def test_a_chunked_json_body_is_cut_off_at_the_limit(client: FlaskClient) -> None:
    stream = CountingStream(big_json(2 * 1024 * 1024))
    response = client.post(
        "/v1/audits",
        input_stream=stream,
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},
        # what gunicorn and werkzeug's server say of a chunked body they de-chunk
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["code"] == "body_too_large"
    assert stream.read_bytes <= 1024 * 1024 + 64 * 1024


def test_a_json_body_under_the_limit_is_parsed_as_before(client: FlaskClient) -> None:
    response = submit(client, params={"noise_samples": 10**7}, layer="x" * 1000)
    assert response.status_code == 422  # read, parsed and validated: not a 413


def test_the_json_limit_is_configurable_and_uploads_keep_theirs(tmp_path: Path) -> None:
    app = create_app(Config(data_dir=tmp_path, reconcile_in_api=False, max_json_bytes=100))
    small = app.test_client()
    assert (
        small.post(
            "/v1/audits", data=b"{" + b" " * 200 + b"}", content_type="application/json"
        ).status_code
        == 413
    )
    # a multipart upload of more than max_json_bytes is not refused by the JSON limit (401:
    # it reaches authentication)
    response = small.post(
        "/v1/models",
        data={"file": (io.BytesIO(b"x" * 1000), "m.onnx")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 401


@pytest.fixture
def costly_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FlaskClient, Any]:
    """A client whose tenant may spend 60 s of estimated worker time per audit."""
    app = create_app(Config(data_dir=tmp_path, reconcile_in_api=False, max_audit_cost_s=60.0))
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
    model, dataset = add_model(session), add_dataset(session)
    model.input_spec = {"height": 224, "width": 224}
    model.details = {"format": "onnx", "tensors": 62}  # a resnet18's weights and biases
    dataset.n_images = 64
    app.config["COSTLY_MODEL"] = model
    return app.test_client(), (model.id, dataset.id)


def test_an_audit_above_the_budget_is_refused_with_the_estimate_and_the_limit(
    costly_client: tuple[FlaskClient, Any],
) -> None:
    client, (model_id, dataset_id) = costly_client
    response = client.post(
        "/v1/audits",
        json={
            "model_id": model_id,
            "dataset_id": dataset_id,
            "methods": ["smoothgrad", "integrated_gradients"],
            "tests": ["cascading"],
            "granularity": "module",
            "params": {"noise_samples": 1024},
        },
    )
    assert response.status_code == 422
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["code"] == "audit_too_costly"
    assert body["limit_s"] == 60.0
    # 31 stages (62 tensors), of which the cascading rule's plan computes 9 (its top quarter,
    # stages 1-8, and the last): 64 images x (1024 + 32) rows x 10 model states x 2.5 s per
    # row-megapixel x 0.05 MP
    assert body["estimated_cost_s"] > 80_000
    assert body["forward_backward_rows"] == 64 * (1024 + 32) * 10
    assert f"{body['estimated_cost_s']:,.0f} s" in body["detail"]
    assert "60 s" in body["detail"]


def test_with_measured_pass_times_the_budget_refuses_on_the_prediction(
    costly_client: tuple[FlaskClient, Any],
) -> None:
    """Once a worker has timed the model's passes (details.pass_prices), the refusal states
    the cost model's prediction, the same number the engine's ``predict`` gives."""
    from saliency_audit.service.api.audits import engine_spec
    from saliency_audit.workers.engine.catalogue import catalogue
    from saliency_audit.workers.engine.contract.cost import (
        Line,
        PassPrices,
        families_of,
        predict,
    )
    from saliency_audit.workers.engine.policy import load_policy

    client, (model_id, dataset_id) = costly_client
    prices = PassPrices(
        device="cpu",
        threads=2,
        height=224,
        width=224,
        forward_backward=Line(0.2, 0.2),
        forward=Line(0.05, 0.06),
        forward_ort=Line(0.05, 0.03),
        export_s=3.0,
        lrp_passes=2.5,
        score_s=0.002,
        scored_measures=("ssim",),
        stages={"block": 7, "module": 41},
        cam_layer="layer4.1.conv2",
        channels={"layer4.1.conv2": 512},
        measured_s=9.0,
    )
    body = {"model_id": model_id, "dataset_id": dataset_id, "methods": ["scorecam", "gradient"]}
    # the fixture's model: priced at the default rate until a worker has measured it
    unmeasured = client.post("/v1/audits", json=body)
    assert unmeasured.status_code == 422
    assert unmeasured.get_json()["estimate"]["measured"] is False
    assert "default price" in unmeasured.get_json()["estimate"]["basis"]

    model = client.application.config["COSTLY_MODEL"]
    model.details = {**model.details, "pass_prices": prices.to_dict()}
    refused = client.post("/v1/audits", json=body)
    assert refused.status_code == 422
    problem = refused.get_json()
    expected = predict(
        contract.AuditSpec.from_dict(engine_spec(body)),
        families_of(catalogue()["methods"]),
        prices,
        images=64,
        onnx=True,
        rule_stages={t: r.stage for t, r in load_policy(None).rules.items()},
    )
    assert problem["estimated_cost_s"] == round(expected.seconds, 1)
    assert problem["estimate"]["measured"] is True
    assert f"{expected.seconds:,.0f} s" in problem["detail"]
    assert problem["estimate"]["predicted_s"] == round(expected.seconds, 1)
    assert problem["estimate"]["parts_s"]["scorecam masked (ONNX Runtime)"] > 0


def test_the_cost_estimate_prices_rows_by_input_size() -> None:
    from saliency_audit.workers.engine.catalogue import catalogue
    from saliency_audit.workers.engine.contract.cost import estimate, families_of

    spec = contract.AuditSpec(methods=("gradient",), tests=("cascading",))
    families = families_of(catalogue()["methods"])
    small = estimate(
        spec, families, images=4, stages=3, height=32, width=32, fb_s_per_row_megapixel=2.5
    )
    large = estimate(
        spec, families, images=4, stages=3, height=224, width=224, fb_s_per_row_megapixel=2.5
    )
    assert small.forward_backward_rows == large.forward_backward_rows == 4 * 4  # 4 states
    assert large.seconds == pytest.approx(small.seconds * 49)


def test_the_limits_table_in_the_docs_is_the_contracts() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "service.md").read_text()
    assert contract.limits_table() in docs
    fields = {name for _, name, _ in contract.limits()}
    assert {"noise_samples", "ig_steps", "smprt_samples", "seed", "max_epochs"} <= fields
