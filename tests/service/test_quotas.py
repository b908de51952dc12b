"""Tenant quotas against a real API process on PostgreSQL and Redis: a full queue is 429
``too_many_audits``, an upload past the stored-bytes limit is 507 ``storage_quota_exceeded``,
a tenant past its request rate is 429 ``rate_limited``; each with the numbers, and Retry-After
where waiting helps."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from saliency_audit.service.config import Config, ConfigError
from saliency_audit.service.db import Database
from saliency_audit.service.models import Tenant
from saliency_audit.service.openapi import openapi_document
from saliency_audit.service.quotas import LocalBuckets
from tests.servers import Api, Server, assert_problem, new_key, start_server
from tests.service.test_end_to_end import DIGITS_MODEL, digits_zip

QUEUED_LIMIT = 2
RATE_PER_S = 0.5
BURST = 12


@pytest.fixture(scope="module")
def quota_server(pg_config: Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Room for the digits model and a one-image dataset, two queued audits, and a burst of
    twelve requests refilled every two seconds; no worker (audits stay queued), a queue of its
    own."""
    room = DIGITS_MODEL.stat().st_size + len(digits_zip(1)) + 100
    config = pg_config.with_overrides(
        data_dir=tmp_path_factory.mktemp("quota"),
        queue=f"gpu-quota-{secrets.token_hex(3)}",
        cpu_queue=f"cpu-quota-{secrets.token_hex(3)}",
        max_queued_audits_per_tenant=QUEUED_LIMIT,
        max_stored_bytes_per_tenant=room,
        rate_limit_per_s=RATE_PER_S,
        rate_limit_burst=BURST,
    )
    server = start_server(config, "--no-worker")
    yield server
    server.stop()


def test_a_full_queue_is_429_too_many_audits_with_retry_after(
    quota_server: Server, pg_database: Database
) -> None:
    api = Api(quota_server.url, new_key(pg_database))
    model = api.upload_model(DIGITS_MODEL)
    dataset = api.upload_dataset(digits_zip(1))
    body = {"model_id": model["id"], "dataset_id": dataset["id"], "methods": ["gradient"]}
    for _ in range(QUEUED_LIMIT):
        assert api.post("/v1/audits", json=body).status_code == 202
    refused = api.post("/v1/audits", json=body)
    assert_problem(refused, 429, "too_many_audits")
    assert int(refused.headers["Retry-After"]) > 0
    assert refused.json()["queued"] == QUEUED_LIMIT and refused.json()["limit"] == QUEUED_LIMIT
    # another tenant's queue is its own
    other = Api(quota_server.url, new_key(pg_database))
    model = other.upload_model(DIGITS_MODEL)
    dataset = other.upload_dataset(digits_zip(1))
    accepted = other.post(
        "/v1/audits",
        json={"model_id": model["id"], "dataset_id": dataset["id"], "methods": ["gradient"]},
    )
    assert accepted.status_code == 202, accepted.text
    # a canceled audit leaves the queue: there is room again
    first = api.get("/v1/audits", params={"state": "queued", "limit": 1}).json()["items"][0]
    assert api.delete(f"/v1/audits/{first['id']}").status_code == 200
    body["seed"] = 1
    assert api.post("/v1/audits", json=body).status_code == 202


def test_an_upload_past_the_stored_bytes_limit_is_507_with_the_numbers(
    quota_server: Server, pg_database: Database
) -> None:
    api = Api(quota_server.url, new_key(pg_database))
    model = api.upload_model(DIGITS_MODEL)
    bigger = digits_zip(4)
    refused = api.post("/v1/datasets", files={"file": ("images.zip", bigger)})
    assert_problem(refused, 507, "storage_quota_exceeded")
    problem = refused.json()
    assert problem["used_bytes"] == model["size_bytes"]
    assert problem["upload_bytes"] == len(bigger)
    assert problem["limit_bytes"] == DIGITS_MODEL.stat().st_size + len(digits_zip(1)) + 100
    assert api.get("/v1/datasets").json()["items"] == []
    # what fits is stored; the same bytes again add nothing and are answered as before
    api.upload_dataset(digits_zip(1))
    assert api.upload_dataset(digits_zip(1))["size_bytes"] == len(digits_zip(1))
    # deleting makes room
    assert_problem(
        api.post("/v1/datasets", files={"file": ("images.zip", bigger)}),
        507,
        "storage_quota_exceeded",
    )
    assert api.delete(f"/v1/models/{model['id']}").status_code == 204
    assert api.post("/v1/datasets", files={"file": ("images.zip", bigger)}).status_code == 201


def test_a_tenant_past_its_request_rate_is_429_rate_limited_kept_in_redis(
    quota_server: Server, pg_database: Database, pg_config: Config
) -> None:
    name = f"rate-{secrets.token_hex(3)}"
    api = Api(quota_server.url, new_key(pg_database, name))
    answers = [api.get("/v1/models").status_code for _ in range(BURST)]
    assert answers == [200] * BURST
    refused = api.get("/v1/models")
    assert_problem(refused, 429, "rate_limited")
    assert 1 <= int(refused.headers["Retry-After"]) <= 1 / RATE_PER_S + 1
    assert refused.json()["limit_per_s"] == RATE_PER_S and refused.json()["burst"] == BURST
    # the bucket is the tenant's, in Redis: another tenant is not limited
    other = Api(quota_server.url, new_key(pg_database))
    assert other.get("/v1/models").status_code == 200
    with pg_database.session() as session:
        tenant_id = session.scalars(select(Tenant.id).where(Tenant.name == name)).one()
    client = redis.Redis.from_url(pg_config.resolved_broker_url)
    try:
        assert client.exists(f"saliency-audit:rate:{tenant_id}")
    finally:
        client.close()


def test_the_in_process_bucket_refills_at_its_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("saliency_audit.service.quotas.time.monotonic", lambda: clock[0])
    buckets = LocalBuckets(rate_per_s=2.0, burst=3)
    assert [buckets.take("t").allowed for _ in range(4)] == [True, True, True, False]
    assert buckets.take("t").retry_after_s == pytest.approx(0.5)
    assert buckets.take("other").allowed
    clock[0] += 0.5
    assert buckets.take("t").allowed and not buckets.take("t").allowed


def test_quota_settings_come_from_the_environment_and_refuse_negatives() -> None:
    config = Config.from_env(
        {
            "SALIENCY_AUDIT_MAX_QUEUED_AUDITS_PER_TENANT": "5",
            "SALIENCY_AUDIT_MAX_RUNNING_AUDITS_PER_TENANT": "2",
            "SALIENCY_AUDIT_RATE_LIMIT_PER_S": "0",
            "SALIENCY_AUDIT_MAX_STORED_BYTES_PER_TENANT": "1000",
        }
    )
    assert config.max_queued_audits_per_tenant == 5 and config.max_running_audits_per_tenant == 2
    assert config.rate_limit_per_s == 0 and config.max_stored_bytes_per_tenant == 1000
    with pytest.raises(ConfigError, match="max_queued_audits_per_tenant"):
        Config(max_queued_audits_per_tenant=-1)


def test_the_quota_answers_are_documented(tmp_path: Path) -> None:
    doc = openapi_document()
    submit = doc["paths"]["/v1/audits"]["post"]["responses"]["429"]
    codes = submit["content"]["application/problem+json"]["schema"]["properties"]["code"]["enum"]
    assert set(codes) == {"too_many_audits", "rate_limited"} and "Retry-After" in submit["headers"]
    for path in ("/v1/models", "/v1/datasets"):
        upload = doc["paths"][path]["post"]["responses"]["507"]
        assert "storage_quota_exceeded" in upload["description"]
    listing = doc["paths"]["/v1/models"]["get"]["responses"]["429"]
    assert "Retry-After" in listing["headers"]
