"""500 concurrent submissions from a bounded client on loopback: every one is accepted exactly
once (a retried request with the same Idempotency-Key is the same audit), and all complete."""

from __future__ import annotations

import concurrent.futures
import time
import uuid

import requests

from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.service.embedded import start_worker, stop_worker
from tests.servers import Api, Server, new_key
from tests.service.test_end_to_end import DIGITS_MODEL, digits_zip

SUBMISSIONS = 500
CLIENT_THREADS = 32


def test_500_concurrent_submissions_are_each_accepted_once_and_all_complete(
    pg_config: Config, pg_server: Server, pg_database: Database
) -> None:
    api = Api(pg_server.url, new_key(pg_database))
    model = api.upload_model(DIGITS_MODEL)
    dataset = api.upload_dataset(digits_zip(1))
    keys = [f"load-{uuid.uuid4()}" for _ in range(SUBMISSIONS)]
    headers = dict(api.http.headers)

    def post(key: str) -> tuple[str, int, str]:
        response = requests.post(
            api.url + "/v1/audits",
            json={
                "model_id": model["id"],
                "dataset_id": dataset["id"],
                "methods": ["gradient"],
                "tests": [],
                "seed": 0,
            },
            headers={**headers, "Idempotency-Key": key},
            timeout=60,
        )
        return key, response.status_code, response.json().get("id", response.text)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(CLIENT_THREADS) as pool:
        first = list(pool.map(post, keys))
        # a client that retries a tenth of its requests (lost responses) with the same keys
        retried = list(pool.map(post, keys[::10]))
    submit_s = time.monotonic() - started
    assert {status for _, status, _ in first} == {202}, [r for r in first if r[1] != 202][:3]
    ids = {key: audit_id for key, _, audit_id in first}
    assert len(set(ids.values())) == SUBMISSIONS
    assert all(ids[key] == audit_id for key, _, audit_id in retried)
    listing = api.get("/v1/audits", params={"limit": 1}).json()
    assert listing["total"] == SUBMISSIONS

    # two audit workers (the report queue is left alone: this is about the audits)
    workers = [
        start_worker(pg_config, pg_config.data_dir / f"load-{i}.log", [pg_config.queue])
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 900

        def succeeded() -> int:
            body = api.get("/v1/audits", params={"state": "succeeded", "limit": 1}).json()
            return int(body["total"])

        while succeeded() < SUBMISSIONS and time.monotonic() < deadline:
            time.sleep(2)
        done = succeeded()
    finally:
        for worker in workers:
            stop_worker(worker)
    assert done == SUBMISSIONS, f"{done} of {SUBMISSIONS} succeeded"
    failed = api.get("/v1/audits", params={"state": "failed", "limit": 1}).json()["total"]
    assert failed == 0
    print(f"submitted {SUBMISSIONS} (+{len(retried)} retries) in {submit_s:.1f} s")
