"""Every hostile upload of the corpus, posted over HTTP to a real API process: a 4xx
problem+json with its code, no row, no file in the artifact store, and the service still up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.service.models import DatasetRecord, ModelRecord
from tests.servers import Api, Server, assert_problem, new_key
from tests.service.hostile import (
    HostileCase,
    hostile_datasets,
    hostile_models,
    valid_dataset_zip,
    valid_labeled_zip,
)

CASES = [("/v1/models", c) for c in hostile_models()] + [
    ("/v1/datasets", c) for c in hostile_datasets()
]


def stored_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def row_counts(database: Database) -> tuple[int, int]:
    with database.session() as session:
        return (
            session.scalar(select(func.count()).select_from(ModelRecord)) or 0,
            session.scalar(select(func.count()).select_from(DatasetRecord)) or 0,
        )


@pytest.fixture(scope="module")
def api(pg_server: Server, pg_database: Database) -> Api:
    return Api(pg_server.url, new_key(pg_database))


@pytest.mark.parametrize(("endpoint", "case"), CASES, ids=[f"{e[4:]}:{c.name}" for e, c in CASES])
def test_hostile_upload_is_refused_and_leaves_no_trace(
    api: Api,
    pg_config: Config,
    pg_database: Database,
    endpoint: str,
    case: HostileCase,
) -> None:
    store = pg_config.resolved_artifact_dir
    files_before, rows_before = stored_files(store), row_counts(pg_database)
    files: dict[str, Any] = {"file": (case.filename, case.data)}
    if case.metadata:
        files["metadata"] = (None, json.dumps(case.metadata), "application/json")
    response = api.post(endpoint, files=files)
    assert_problem(response, case.expected_status, case.expected_code)
    assert response.json()["detail"]
    assert stored_files(store) == files_before
    assert row_counts(pg_database) == rows_before
    assert api.get("/healthz").status_code == 200


def test_an_oversized_request_is_413_before_it_is_read(
    pg_config: Config, pg_database: Database, tmp_path: Path
) -> None:
    from tests.servers import start_server

    small = pg_config.with_overrides(
        data_dir=tmp_path, max_request_bytes=200_000, max_model_bytes=100_000
    )
    server = start_server(small, "--no-worker")
    try:
        api = Api(server.url, new_key(pg_database))
        assert_problem(api.post("/v1/models", files={"file": ("m.onnx", b"\0" * 300_000)}), 413)
        assert_problem(
            api.post("/v1/models", files={"file": ("m.onnx", b"\0" * 150_000)}),
            413,
            "payload_too_large",
        )
        assert stored_files(small.resolved_artifact_dir) == set()
    finally:
        server.stop()


def test_valid_archives_are_accepted_with_their_labels_masks_and_boxes(api: Api) -> None:
    plain = api.upload_dataset(valid_dataset_zip(6, masks=True, boxes=True), "set.zip")
    assert plain["n_images"] == 6 and plain["has_masks"] and plain["has_boxes"]
    assert not plain["labeled"]
    labeled = api.upload_dataset(valid_labeled_zip(3), "train.zip", {"purpose": "training"})
    assert labeled["labeled"] and len(labeled["class_names"]) >= 2
    detail = api.get(labeled["links"]["self"]).json()
    assert {i["label"] for i in detail["images"]} == set(labeled["class_names"])
