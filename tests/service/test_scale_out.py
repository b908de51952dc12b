"""A split audit over real workers: two workers share it, the merged result is what the
audit gives in one piece, and a single worker still completes it alone."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.service.models import AuditPart
from tests.servers import Api, Worker, new_key, start_server
from tests.service.test_end_to_end import DIGITS_MODEL, digits_zip

METHODS = ["gradient", "gradcam", "smoothgrad", "integrated_gradients", "guided_backprop", "lrp"]


def split_config(pg_config: Config, tmp: Any) -> Config:
    return pg_config.with_overrides(
        data_dir=tmp,
        artifact_dir=pg_config.resolved_artifact_dir,  # one store beside the one database
        audit_parts=2,
        queue=f"gpu-split-{secrets.token_hex(3)}",
        cpu_queue=f"cpu-split-{secrets.token_hex(3)}",
    )


def audit_once(api: Api, seed: int) -> dict[str, Any]:
    model = api.upload_model(DIGITS_MODEL)
    dataset = api.upload_dataset(digits_zip(8))
    audit = api.post(
        "/v1/audits",
        json={
            "model_id": model["id"],
            "dataset_id": dataset["id"],
            "methods": METHODS,
            "tests": ["cascading", "random_logit"],
            "seed": seed,
            "params": {"noise_samples": 4, "ig_steps": 8},
        },
    ).json()
    final = api.wait(audit["id"], timeout_s=300)
    assert final["state"] == "succeeded", final
    report: dict[str, Any] = api.get(f"/v1/audits/{audit['id']}/report.json").json()
    return report


def parts_of(database: Database, audit_id: str) -> list[AuditPart]:
    with database.session() as session:
        return list(
            session.scalars(
                select(AuditPart)
                .where(AuditPart.audit_id == audit_id)
                .order_by(AuditPart.part_index)
            ).all()
        )


def test_two_workers_share_a_split_audit_and_the_merge_equals_the_whole(
    pg_config: Config,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
    tmp_path: Any,
) -> None:
    whole_server = start_server(pg_config, "--no-worker")
    split = split_config(pg_config, tmp_path / "split")
    split_server = start_server(split, "--no-worker")
    try:
        worker_factory(pg_config)
        worker_factory(split)
        worker_factory(split)
        key = new_key(pg_database)
        whole = audit_once(Api(whole_server.url, key), seed=5)
        merged = audit_once(Api(split_server.url, key), seed=5)
    finally:
        whole_server.stop()
        split_server.stop()
    parts = parts_of(pg_database, merged["audit_id"])
    assert [p.state for p in parts] == ["done", "done"]
    assert sorted(m for p in parts for m in p.methods) == sorted(METHODS)
    assert merged["timings_s"].get("parts_total") is not None
    for key in ("verdicts", "tests", "images", "model", "fidelity", "policy"):
        assert merged[key] == whole[key], key
    for name, method in whole["methods"].items():
        method.pop("family_time_s")
        merged["methods"][name].pop("family_time_s")
    assert merged["methods"] == whole["methods"]


def test_a_single_worker_completes_a_split_audit_alone(
    pg_config: Config,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
    tmp_path: Any,
) -> None:
    split = split_config(pg_config, tmp_path / "alone")
    server = start_server(split, "--no-worker")
    try:
        worker_factory(split)
        report = audit_once(Api(server.url, new_key(pg_database)), seed=6)
    finally:
        server.stop()
    parts = parts_of(pg_database, report["audit_id"])
    assert len(parts) == 2 and {p.worker for p in parts} == {parts[0].worker}
