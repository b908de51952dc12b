"""The API process never imports torch: it starts fast and its image stays small.

A fresh interpreter that makes ``import torch`` (and torchvision) fail loudly builds the app,
migrates its database, uploads a model and a dataset, submits an audit, lists, reads the
catalogue, the OpenAPI document and the docs page, and finally checks ``sys.modules``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.servers import REPO

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, io, json, sys, zipfile
    from pathlib import Path

    class Forbid(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"the API process imported {name}")
            return None

    sys.meta_path.insert(0, Forbid())

    from saliency_audit.service import db
    from saliency_audit.service.app import create_app
    from saliency_audit.service.auth import create_key
    from saliency_audit.service.config import Config

    data = Path(sys.argv[1])
    repo = Path(sys.argv[2])
    config = Config(data_dir=data, reconcile_in_api=False)
    db.upgrade(config.resolved_database_url)
    app = create_app(config)
    with app.extensions["saliency_audit"].db.session() as session:
        key, _ = create_key(session, "no-torch")
    client = app.test_client()
    auth = {"Authorization": f"Bearer {key}"}
    model = client.post(
        "/v1/models",
        headers=auth,
        data={"file": (open(repo / "examples/reference/digits_small_cnn.onnx", "rb"), "m.onnx")},
    )
    assert model.status_code == 201, model.get_data(as_text=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for p in sorted((repo / "examples/reference/digits_images").glob("*.png"))[:3]:
            archive.write(p, p.name)
    dataset = client.post(
        "/v1/datasets", headers=auth, data={"file": (io.BytesIO(buffer.getvalue()), "d.zip")}
    )
    assert dataset.status_code == 201, dataset.get_data(as_text=True)
    audit = client.post(
        "/v1/audits",
        headers=auth,
        json={
            "model_id": model.json["id"],
            "dataset_id": dataset.json["id"],
            "methods": ["gradient", "lrp"],
            "tests": ["cascading", "smprt"],
            "policy": {"extends": "default"},
        },
    )
    assert audit.status_code == 202, audit.get_data(as_text=True)
    for path in ("/v1/methods", "/v1/audits", f"/v1/audits/{audit.json['id']}", "/v1/models",
                 "/openapi.json", "/docs", "/healthz", "/readyz"):
        response = client.get(path, headers=auth)
        assert response.status_code == 200, (path, response.status_code)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
    assert not loaded, loaded
    print("OK no torch;", len(sys.modules), "modules")
    """
)


def test_the_api_process_never_imports_torch(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK no torch" in done.stdout
