"""Tenant isolation over every endpoint: the route list comes from the running app's URL map,
so an endpoint added later is covered without editing this test. Another tenant's ids answer
404 exactly like ids that do not exist, lists never show another tenant's rows, and nothing
the other tenant tries changes the owner's data."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from saliency_audit.service.app import create_app
from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from tests.servers import Api, Server, assert_problem, launch_worker, new_key
from tests.service.test_end_to_end import DIGITS_MODEL, digits_zip

PUBLIC = {
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/v1/methods",
    "/v1/schemas/report.json",
}


def routes(config: Config) -> list[tuple[str, str]]:
    app = create_app(config)
    out = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append((method, rule.rule))
    return out


@pytest.fixture(scope="module")
def owner_data(pg_config: Config, pg_server: Server, pg_database: Database) -> dict[str, Any]:
    owner = Api(pg_server.url, new_key(pg_database))
    model = owner.upload_model(DIGITS_MODEL)
    dataset = owner.upload_dataset(digits_zip(2))
    worker = launch_worker(pg_config)
    try:
        audit = owner.post(
            "/v1/audits",
            json={"model_id": model["id"], "dataset_id": dataset["id"], "methods": ["gradient"]},
        ).json()
        assert owner.wait(audit["id"])["state"] == "succeeded"
        # the reports too, so the document routes have something to hide
        deadline = time.monotonic() + 120
        while owner.get(f"/v1/audits/{audit['id']}").json()["documents_state"] == "pending":
            assert time.monotonic() < deadline, "reports not rendered"
            time.sleep(0.5)
    finally:
        worker.stop()
    heatmap = owner.get(f"/v1/audits/{audit['id']}/heatmaps").json()["items"][0]
    return {
        "owner": owner,
        "ids": {
            "model_id": model["id"],
            "dataset_id": dataset["id"],
            "audit_id": audit["id"],
            "heatmap_id": heatmap["url"].rsplit("/", 1)[1].split(".")[0],
            "sha256": heatmap["sha256"],
        },
    }


def test_every_endpoint_hides_another_tenants_resources(
    pg_config: Config, pg_server: Server, pg_database: Database, owner_data: dict[str, Any]
) -> None:
    owner, ids = owner_data["owner"], owner_data["ids"]
    intruder = Api(pg_server.url, new_key(pg_database))
    checked = 0
    for method, rule in routes(pg_config):
        path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: str(ids[m.group(1)]), rule)
        if rule in PUBLIC:
            continue
        if "<" not in rule:
            # collections: the intruder's lists are empty, its creations are its own
            if method == "GET":
                assert intruder.get(path).json()["items"] == [], path
                checked += 1
            continue
        response = getattr(intruder, method.lower())(path)
        assert_problem(response, 404, "not_found")
        checked += 1
    assert checked >= 15
    # the owner's data is intact after every attempt (the DELETEs included)
    audit = owner.get(f"/v1/audits/{ids['audit_id']}").json()
    assert audit["state"] == "succeeded" and not audit["cancel_requested"]
    assert owner.get(f"/v1/models/{ids['model_id']}").status_code == 200
    assert owner.get(f"/v1/datasets/{ids['dataset_id']}").status_code == 200
    assert owner.get(f"/v1/audits/{ids['audit_id']}/report.json").status_code == 200


def test_an_intruder_cannot_audit_the_owners_model_or_data(
    pg_server: Server, pg_database: Database, owner_data: dict[str, Any]
) -> None:
    ids = owner_data["ids"]
    intruder = Api(pg_server.url, new_key(pg_database))
    for body, code in (
        ({"model_id": ids["model_id"], "dataset_id": "x"}, "unknown_model"),
        ({"model_id": "x", "dataset_id": ids["dataset_id"]}, "unknown_model"),
    ):
        response = intruder.post("/v1/audits", json={**body, "methods": ["gradient"]})
        assert_problem(response, 422, code)
