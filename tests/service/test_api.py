"""The HTTP contract against a real API process on PostgreSQL and Redis: authentication,
tenant isolation on every endpoint, idempotent submission, validation, problem+json errors."""

from __future__ import annotations

import concurrent.futures
import uuid
from typing import Any

import pytest
import requests

from saliency_audit.service.db import Database
from tests.servers import Api, Server, assert_problem, new_key
from tests.service.test_end_to_end import DIGITS_MODEL, digits_zip


@pytest.fixture(scope="module")
def two_tenants(pg_server: Server, pg_database: Database) -> tuple[Api, Api]:
    return Api(pg_server.url, new_key(pg_database)), Api(pg_server.url, new_key(pg_database))


@pytest.fixture(scope="module")
def owned(two_tenants: tuple[Api, Api]) -> dict[str, Any]:
    """A model, a dataset and an audit (queued: no worker runs in this module) of tenant A."""
    a, _ = two_tenants
    model = a.upload_model(DIGITS_MODEL)
    dataset = a.upload_dataset(digits_zip(2))
    audit = a.post(
        "/v1/audits",
        json={"model_id": model["id"], "dataset_id": dataset["id"], "methods": ["gradient"]},
    ).json()
    return {"model": model, "dataset": dataset, "audit": audit}


def test_every_v1_endpoint_needs_a_valid_key(pg_server: Server) -> None:
    for path in ("/v1/models", "/v1/datasets", "/v1/audits", "/v1/methods"):
        missing = requests.get(pg_server.url + path, timeout=10)
        assert_problem(missing, 401, "unauthenticated")
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = requests.get(
            pg_server.url + path, headers={"Authorization": "Bearer sak_000000000000_x"}, timeout=10
        )
        assert_problem(wrong, 401, "invalid_key")


def test_another_tenants_ids_give_404_on_every_endpoint(
    two_tenants: tuple[Api, Api], owned: dict[str, Any]
) -> None:
    a, b = two_tenants
    model, dataset, audit = owned["model"]["id"], owned["dataset"]["id"], owned["audit"]["id"]
    calls = [
        ("get", f"/v1/models/{model}"),
        ("delete", f"/v1/models/{model}"),
        ("get", f"/v1/datasets/{dataset}"),
        ("delete", f"/v1/datasets/{dataset}"),
        ("get", f"/v1/audits/{audit}"),
        ("delete", f"/v1/audits/{audit}"),
        ("get", f"/v1/audits/{audit}/report.json"),
        ("get", f"/v1/audits/{audit}/results"),
        ("get", f"/v1/audits/{audit}/heatmaps"),
        ("get", f"/v1/audits/{audit}/heatmaps/1.png"),
    ]
    for method, path in calls:
        assert_problem(getattr(b, method)(path), 404, "not_found")
    # nor do B's lists show A's rows, nor can B audit A's model
    for path in ("/v1/models", "/v1/datasets", "/v1/audits"):
        assert b.get(path).json()["items"] == []
    response = b.post(
        "/v1/audits", json={"model_id": model, "dataset_id": dataset, "methods": ["gradient"]}
    )
    assert_problem(response, 422, "unknown_model")
    # and A still sees everything: B's attempts changed nothing
    assert a.get(f"/v1/audits/{audit}").json()["state"] == "queued"
    assert a.get(f"/v1/models/{model}").status_code == 200


def test_the_same_upload_is_one_model_per_tenant(two_tenants: tuple[Api, Api]) -> None:
    a, b = two_tenants
    first, again = a.upload_model(DIGITS_MODEL), a.upload_model(DIGITS_MODEL)
    assert first["id"] == again["id"]
    other = b.upload_model(DIGITS_MODEL)
    assert other["id"] != first["id"] and other["sha256"] == first["sha256"]


def _audit_body(owned: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {
        "model_id": owned["model"]["id"],
        "dataset_id": owned["dataset"]["id"],
        "methods": ["gradient", "gradcam"],
        "tests": ["cascading"],
        **changes,
    }


def test_idempotency_key_same_body_same_audit_other_body_422(
    two_tenants: tuple[Api, Api], owned: dict[str, Any]
) -> None:
    a, b = two_tenants
    key = f"release-{uuid.uuid4()}"
    body = _audit_body(owned)
    first = a.post("/v1/audits", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 202
    replay = a.post("/v1/audits", json=body, headers={"Idempotency-Key": key})
    assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == first.json()["id"]
    assert replay.headers["Location"] == first.headers["Location"]
    changed = a.post(
        "/v1/audits", json=_audit_body(owned, seed=7), headers={"Idempotency-Key": key}
    )
    assert_problem(changed, 422, "idempotency_key_reused")
    # keys are per tenant: B's same key is B's own audit (here: of a model B cannot see)
    other = b.post("/v1/audits", json=body, headers={"Idempotency-Key": key})
    assert_problem(other, 422, "unknown_model")
    # without a key, every submission is a new audit
    ids = {a.post("/v1/audits", json=body).json()["id"] for _ in range(2)}
    assert len(ids) == 2


def test_concurrent_submissions_with_one_key_create_one_audit(
    two_tenants: tuple[Api, Api], owned: dict[str, Any]
) -> None:
    a, _ = two_tenants
    key = f"race-{uuid.uuid4()}"
    body = _audit_body(owned, seed=11)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(
                lambda _: requests.post(
                    a.url + "/v1/audits",
                    json=body,
                    headers={"Idempotency-Key": key, **a.http.headers},
                    timeout=30,
                ),
                range(8),
            )
        )
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"methods": ["gradient", "no_such_method"]}, 422, "invalid_spec"),
        ({"methods": []}, 422, "invalid_field"),
        ({"tests": ["cascading", "telepathy"]}, 422, "invalid_spec"),
        ({"measures": ["ssim", "vibes"]}, 422, "invalid_spec"),
        ({"seed": "zero"}, 422, "invalid_field"),
        ({"policy": {"format": 99}}, 422, "invalid_policy"),
        ({"params": {"ig_steps": 0}}, 422, "invalid_spec"),
        ({"params": {"warp": 9}}, 422, "invalid_spec"),
        ({"tests": ["data_randomization"]}, 422, "training_set_required"),
        ({"layers": [1, 2]}, 422, "invalid_field"),
        ({"layer": 3}, 422, "invalid_field"),
        ({"colour": "blue"}, 422, "unknown_fields"),
        ({"dataset_id": "nope"}, 422, "unknown_dataset"),
    ],
)
def test_invalid_submissions_are_422_problems_and_create_nothing(
    two_tenants: tuple[Api, Api],
    owned: dict[str, Any],
    change: dict[str, Any],
    status: int,
    code: str,
) -> None:
    a, _ = two_tenants
    before = a.get("/v1/audits").json()["total"]
    assert_problem(a.post("/v1/audits", json=_audit_body(owned, **change)), status, code)
    assert a.get("/v1/audits").json()["total"] == before


def test_an_unlabeled_set_is_refused_as_a_training_set(
    two_tenants: tuple[Api, Api], owned: dict[str, Any]
) -> None:
    a, _ = two_tenants
    body = _audit_body(owned, tests=["data_randomization"], train_dataset_id=owned["dataset"]["id"])
    assert_problem(a.post("/v1/audits", json=body), 422, "unlabeled_training_set")


def test_errors_are_problem_json_everywhere(
    pg_server: Server, two_tenants: tuple[Api, Api]
) -> None:
    a, _ = two_tenants
    assert_problem(a.get("/v1/no-such-thing"), 404, "not_found")
    assert_problem(requests.get(pg_server.url + "/nowhere", timeout=10), 404, "not_found")
    not_allowed = a.put("/v1/models")
    assert_problem(not_allowed, 405, "method_not_allowed")
    assert "POST" in not_allowed.headers["Allow"]
    assert_problem(a.post("/v1/audits", data="x"), 415, "unsupported_media_type")
    assert_problem(
        a.post("/v1/audits", data="{", headers={"Content-Type": "application/json"}),
        400,
        "invalid_json",
    )
    assert_problem(a.post("/v1/models", files={"other": ("x", b"1")}), 400, "missing_file")
    assert_problem(a.get("/v1/audits", params={"limit": 0}), 400, "invalid_pagination")
    assert_problem(a.get("/v1/audits", params={"state": "lost"}), 400, "invalid_filter")


def test_queued_audits_can_be_canceled_and_report_is_409_until_done(
    two_tenants: tuple[Api, Api], owned: dict[str, Any]
) -> None:
    a, _ = two_tenants
    audit = a.post("/v1/audits", json=_audit_body(owned, seed=5)).json()
    assert_problem(a.get(f"/v1/audits/{audit['id']}/report.json"), 409, "audit_not_succeeded")
    canceled = a.delete(f"/v1/audits/{audit['id']}")
    assert canceled.status_code == 200 and canceled.json()["state"] == "canceled"
    # once final, DELETE deletes it (before real deletion: 409 audit_finished)
    assert a.delete(f"/v1/audits/{audit['id']}").status_code == 204
    assert_problem(a.get(f"/v1/audits/{audit['id']}"), 404, "not_found")


def test_a_model_with_a_queued_audit_cannot_be_deleted(
    two_tenants: tuple[Api, Api], owned: dict[str, Any]
) -> None:
    a, _ = two_tenants
    assert_problem(a.delete(f"/v1/models/{owned['model']['id']}"), 409, "model_in_use")
    assert_problem(a.delete(f"/v1/datasets/{owned['dataset']['id']}"), 409, "dataset_in_use")


def test_lists_are_paginated(two_tenants: tuple[Api, Api], owned: dict[str, Any]) -> None:
    a, _ = two_tenants
    total = a.get("/v1/audits").json()["total"]
    assert total >= 3
    first = a.get("/v1/audits", params={"limit": 2}).json()
    assert len(first["items"]) == 2 and first["next"]
    second = a.get(first["next"]).json()
    assert {i["id"] for i in first["items"]}.isdisjoint(i["id"] for i in second["items"])
    seen = [i["id"] for i in first["items"]] + [i["id"] for i in second["items"]]
    assert len(seen) == min(total, 4)


def test_methods_lists_the_catalogue_and_the_default_policy(two_tenants: tuple[Api, Api]) -> None:
    a, _ = two_tenants
    body = a.get("/v1/methods").json()
    names = [m["name"] for m in body["methods"]]
    assert {"gradient", "gradcam", "lrp", "relevance_cam", "control_sobel"} <= set(names)
    assert "cascading" in [t["name"] for t in body["tests"]]
    assert body["default_policy"]["name"] and "ssim" in body["measures"]


def test_health_and_readiness(pg_server: Server) -> None:
    assert requests.get(pg_server.url + "/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(pg_server.url + "/readyz", timeout=10)
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_concurrent_uploads_of_the_same_bytes_make_one_model(
    pg_server: Server, pg_database: Database
) -> None:
    api = Api(pg_server.url, new_key(pg_database))
    data = DIGITS_MODEL.read_bytes()

    def upload(_: int) -> requests.Response:
        return requests.post(
            api.url + "/v1/models",
            files={"file": ("m.onnx", data)},
            headers=dict(api.http.headers),
            timeout=60,
        )

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(upload, range(6)))
    assert sorted(r.status_code for r in responses).count(201) == 1
    assert {r.status_code for r in responses} <= {200, 201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert api.get("/v1/models").json()["total"] == 1
