"""Explainers installed by the operator as entry points (group ``saliency_audit.explainers``):
the worker loads them at start, ``saliency-audit methods`` and ``GET /v1/methods`` list them,
and an audit names one like a built-in method. Users never upload code.

The entry point is registered the way ``pip install`` would leave it, as a ``*.dist-info``
folder with an ``entry_points.txt``, in a temporary folder put on the API's and the worker's
``PYTHONPATH`` (nothing is installed)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from tests.servers import REFERENCE, REPO, Api, Worker, new_key, start_server

DIGITS_MODEL = REFERENCE / "digits_small_cnn.onnx"


@pytest.fixture
def occlusion_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``occlusion = tests.engine.explainers:occlusion`` (Captum's Occlusion), installed for
    the processes this test starts."""
    site = tmp_path / "site"
    dist = site / "operator_explainers-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: operator-explainers\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[saliency_audit.explainers]\nocclusion = tests.engine.explainers:occlusion\n"
    )
    paths = [str(site), os.environ.get("PYTHONPATH", ""), str(REPO)]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    return site


def messy_digits_zip(count: int = 4) -> bytes:
    """Digit images with a note, macOS metadata and a hidden file, as a user zips a folder."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((REFERENCE / "digits_images").glob("*.png"))[:count]:
            archive.write(path, path.name)
        archive.writestr("notes.txt", "taken on Tuesday\n")
        archive.writestr(".DS_Store", b"\0\0\0\1Bud1")
        archive.writestr("__MACOSX/._0_0.png", b"\0\5\26\7")
    return buffer.getvalue()


def test_an_entry_point_explainer_is_listed_and_audited_by_the_service(
    occlusion_plugin: Path,
    pg_config: Config,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
) -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "saliency_audit.service.cli", "methods"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    line = next(x for x in listed.splitlines() if x.split()[:1] == ["occlusion"])
    assert line.split()[1] == "plugin"

    server = start_server(pg_config, "--no-worker")
    try:
        worker_factory(pg_config)
        api = Api(server.url, new_key(pg_database))
        catalogue = {m["name"]: m for m in api.get("/v1/methods").json()["methods"]}
        assert catalogue["occlusion"]["family"] == "plugin:occlusion"
        assert catalogue["occlusion"]["reference"] == "tests.engine.explainers:occlusion"

        model = api.upload_model(DIGITS_MODEL, {"name": "digits cnn"})
        dataset = api.upload_dataset(messy_digits_zip(), "digits.zip")
        assert dataset["n_images"] == 4
        assert dataset["skipped"] == [
            ".DS_Store (hidden)",
            "__MACOSX/._0_0.png (macOS metadata)",
            "notes.txt (not an image)",
        ]
        response = api.post(
            "/v1/audits",
            json={
                "model_id": model["id"],
                "dataset_id": dataset["id"],
                "methods": ["gradient", "occlusion"],
                "tests": ["cascading"],
            },
        )
        assert response.status_code == 202, response.text
        final = api.wait(response.json()["id"])
        assert final["state"] == "succeeded", final
        verdicts = {(v["method"], v["test"]): v["verdict"] for v in final["verdicts"]}
        assert verdicts[("occlusion", "cascading")] in ("PASS", "FAIL", "INCONCLUSIVE")
        report = api.get(f"/v1/audits/{final['id']}/report.json").json()
        assert report["methods"]["occlusion"]["status"] == "ok"
        assert report["methods"]["occlusion"]["family"] == "plugin:occlusion"
    finally:
        server.stop()
