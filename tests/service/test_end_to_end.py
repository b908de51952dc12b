"""The whole flow over HTTP, as a client sees it: upload, audit, report.

Once against the production shape (a ``serve --no-worker`` API process, PostgreSQL, Redis and
a separate ``celery -A saliency_audit.workers worker`` process), once against the embedded mode
(``serve``
with no configuration: SQLite, an artifact folder and its own worker on the SQLAlchemy
transport).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from saliency_audit.service.config import Config
from saliency_audit.service.embedded import config_environment
from saliency_audit.service.models import ResultRow
from tests.servers import (
    REFERENCE,
    Api,
    Server,
    Worker,
    assert_problem,
    fast_lifecycle,
    new_key,
    start_server,
)

DIGITS_MODEL = REFERENCE / "digits_small_cnn.onnx"
METHODS = ["gradient", "gradcam"]


def digits_zip(count: int = 4) -> bytes:
    files = sorted((REFERENCE / "digits_images").glob("*.png"))[:count]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in files:
            archive.write(path, path.name)
    return buffer.getvalue()


def run_flow(api: Api) -> dict[str, Any]:
    """Upload the digits CNN and four images, audit two methods with cascading randomization,
    and check what a client reads back at every step."""
    model = api.upload_model(DIGITS_MODEL, {"name": "digits cnn"})
    assert model["format"] == "onnx" and model["name"] == "digits cnn"
    assert len(model["sha256"]) == 64
    dataset = api.upload_dataset(digits_zip(), "digits.zip")
    assert dataset["n_images"] == 4 and not dataset["labeled"]

    response = api.post(
        "/v1/audits",
        json={
            "model_id": model["id"],
            "dataset_id": dataset["id"],
            "methods": METHODS,
            "tests": ["cascading"],
            "seed": 0,
        },
    )
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == f"/v1/audits/{response.json()['id']}"
    assert int(response.headers["Retry-After"]) >= 1
    audit = response.json()
    assert audit["state"] == "queued" and audit["progress"] == 0

    final = api.wait(audit["id"])
    assert final["state"] == "succeeded", final
    assert final["progress"] == 1.0 and final["attempts"] == 1
    verdicts = {(v["method"], v["test"]): v for v in final["verdicts"]}
    # the two requested methods and the two controls, each with a verdict for the test
    assert set(verdicts) == {
        (m, "cascading") for m in [*METHODS, "control_sobel", "control_random"]
    }
    assert all(v["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE") for v in verdicts.values())

    report_response = api.get(f"/v1/audits/{audit['id']}/report.json")
    assert report_response.status_code == 200
    assert report_response.headers["Content-Type"].startswith("application/json")
    report = report_response.json()
    assert report["model"]["sha256"] == model["sha256"]
    assert [i["name"] for i in report["images"]] == sorted(
        p.name for p in sorted((REFERENCE / "digits_images").glob("*.png"))[:4]
    )
    # the verdicts served from the rows are the report's verdicts
    assert {(v["method"], v["test"]): v["verdict"] for v in report["verdicts"]} == {
        k: v["verdict"] for k, v in verdicts.items()
    }
    # every score of the report is a row, with the same mean and interval
    results = api.get(f"/v1/audits/{audit['id']}/results").json()["items"]
    scores = report["tests"]["cascading"]["scores"]
    assert len(results) == len(scores) > 0
    by_key = {(r["method"], r["measure"], r["stage"]): r for r in results}
    for score in scores:
        row = by_key[(score["method"], score["measure"], score["stage"])]
        assert (row["mean"], row["ci_low"], row["ci_high"], row["n"]) == pytest.approx(
            (score["mean"], score["ci_low"], score["ci_high"], score["n"])
        )

    heatmaps = api.get(f"/v1/audits/{audit['id']}/heatmaps", params={"method": "gradcam"})
    items = heatmaps.json()["items"]
    trained = [h for h in items if h["test"] == "model" and h["stage"] == "trained"]
    assert len(trained) == 4
    png = api.get(items[0]["url"])
    assert png.status_code == 200 and png.headers["Content-Type"] == "image/png"
    picture = Image.open(io.BytesIO(png.content))
    assert picture.format == "PNG" and min(picture.size) >= 128
    # pictures of every stage that got maps (the stage plan's), and of no other
    cascade = report["tests"]["cascading"]
    stages = {h["stage"] for h in items if h["test"] == "cascading"}
    computed = set(cascade["stage_plan"]["computed"])
    assert stages == {s["name"] for s in cascade["stages"] if s["index"] in computed}

    listing = api.get("/v1/audits", params={"model_id": model["id"], "state": "succeeded"})
    assert [a["id"] for a in listing.json()["items"]] == [audit["id"]]
    return {"audit": final, "report": report, "model": model, "dataset": dataset}


def test_upload_audit_report_over_http_with_postgres_redis_and_a_worker(
    pg_config: Config,
    pg_server: Server,
    worker_factory: Callable[[Config], Worker],
    pg_database: Any,
) -> None:
    worker_factory(pg_config)
    api = Api(pg_server.url, new_key(pg_database))
    outcome = run_flow(api)
    audit_id = outcome["audit"]["id"]
    with pg_database.session() as session:
        rows = session.query(ResultRow).filter(ResultRow.audit_id == audit_id).count()
    assert rows == len(outcome["report"]["tests"]["cascading"]["scores"])
    # the same bytes again: the same model, 200 instead of 201
    again = api.post("/v1/models", files={"file": ("x.onnx", DIGITS_MODEL.read_bytes())})
    assert again.status_code == 200 and again.json()["id"] == outcome["model"]["id"]
    # DELETE of a finished audit deletes it, its rows with it (before: 409 audit_finished)
    assert api.delete(f"/v1/audits/{audit_id}").status_code == 204
    with pg_database.session() as session:
        assert session.query(ResultRow).filter(ResultRow.audit_id == audit_id).count() == 0


def test_the_same_flow_in_embedded_mode(tmp_path: Path) -> None:
    """``serve`` with no configuration migrates its SQLite file and starts its own worker."""
    config = Config(data_dir=tmp_path / "embedded", **fast_lifecycle(reconcile_in_api=None))
    assert config.embedded
    server = start_server(config)
    try:
        # a key made with the CLI, as a user does it
        key = subprocess.run(
            [
                sys.executable,
                "-m",
                "saliency_audit.service.cli",
                "keys",
                "create",
                "--tenant",
                "local",
            ],
            env=config_environment(config),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert key.startswith("sak_")
        api = Api(server.url, key)
        run_flow(api)
        assert (config.data_dir / "saliency-audit.sqlite").is_file()
        assert (config.data_dir / "broker.sqlite").is_file()
        assert api.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
    finally:
        server.stop()
    assert " ready." in (config.data_dir / "worker.log").read_text(errors="replace")


def test_report_maps_match_the_engine_run_locally(
    pg_config: Config,
    pg_server: Server,
    worker_factory: Callable[[Config], Worker],
    pg_database: Any,
    tmp_path: Path,
) -> None:
    """The service computes what ``saliency-audit run`` computes on the same files and seed."""
    from saliency_audit.service.cli import main

    worker_factory(pg_config)
    api = Api(pg_server.url, new_key(pg_database))
    model = api.upload_model(DIGITS_MODEL)
    dataset = api.upload_dataset(digits_zip())
    audit = api.post(
        "/v1/audits",
        json={
            "model_id": model["id"],
            "dataset_id": dataset["id"],
            "methods": METHODS,
            "tests": ["cascading"],
            "seed": 3,
        },
    ).json()
    served = api.wait(audit["id"])
    assert served["state"] == "succeeded", served
    report = api.get(f"/v1/audits/{audit['id']}/report.json").json()

    images = tmp_path / "images"
    images.mkdir()
    with zipfile.ZipFile(io.BytesIO(digits_zip())) as archive:
        archive.extractall(images)
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                "--model",
                str(DIGITS_MODEL),
                "--images",
                str(images),
                "--methods",
                ",".join(METHODS),
                "--tests",
                "cascading",
                "--seed",
                "3",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    local = json.loads((out / "report.json").read_text())
    assert local["verdicts"] == report["verdicts"]
    assert local["tests"]["cascading"]["scores"] == report["tests"]["cascading"]["scores"]
    with np.load(out / "maps.npz") as maps:
        assert set(maps.files) == set(report["methods"])


def test_the_layers_analysis_over_http_with_masks_and_overlays(
    pg_config: Config,
    pg_server: Server,
    worker_factory: Callable[[Config], Worker],
    pg_database: Any,
) -> None:
    from tests.service.hostile import valid_dataset_zip

    worker_factory(pg_config)
    api = Api(pg_server.url, new_key(pg_database))
    model = api.upload_model(REFERENCE / "shapes_small_resnet.onnx")
    dataset = api.upload_dataset(valid_dataset_zip(3, masks=True), "shapes.zip")
    assert dataset["has_masks"]
    audit = api.post(
        "/v1/audits",
        json={
            "model_id": model["id"],
            "dataset_id": dataset["id"],
            "methods": ["gradcam"],
            "tests": ["layers"],
            "layers": ["layer1.0.relu2", "layer3.0.relu2"],
        },
    ).json()
    final = api.wait(audit["id"])
    assert final["state"] == "succeeded", final
    report = api.get(f"/v1/audits/{audit['id']}/report.json").json()
    table = report["tests"]["layers"]
    assert [s["name"] for s in table["stages"]] == ["layer1.0.relu2", "layer3.0.relu2"]
    assert {"iou", "pointing_game", "average_drop"} <= {s["measure"] for s in table["scores"]}
    # the per-layer table is also rows, reachable per metric
    rows = api.get(
        f"/v1/audits/{audit['id']}/results", params={"test": "layers", "measure": "iou"}
    ).json()["items"]
    assert {(r["stage"], r["method"]) for r in rows} == {
        (layer, m)
        for layer in ("layer1.0.relu2", "layer3.0.relu2")
        for m in ("relevance_cam", "gradcam", "gradcam_pp", "scorecam", "lrp", "control_random")
    }
    # overlays: one per image, method and layer, listed in the report and served by sha256
    overlays = [a for a in report["artifacts"] if a["kind"] == "overlay_png"]
    assert len(overlays) == 3 * 6 * 2
    listed = api.get(f"/v1/audits/{audit['id']}/heatmaps", params={"kind": "overlay_png"}).json()[
        "items"
    ]
    assert {h["sha256"] for h in listed} == {a["sha256"] for a in overlays}
    picture = api.get(overlays[0]["url"])
    assert picture.status_code == 200 and picture.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(picture.content)).size == (128, 128)
    assert_problem(api.get(f"/v1/audits/{audit['id']}/artifacts/{'0' * 64}"), 404, "not_found")
