"""``layer`` and ``layers`` names are checked at submit, with the engine's words.

After an upload, a CPU worker loads the model as an audit would and records the names a spec
may give it (``details.layers``). POST /v1/audits then refuses an unknown name with a 422
``invalid_spec`` whose detail is exactly what the worker would have failed the audit with; each
test computes that message by running the engine on the same file.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable
from typing import Any

import pytest
import torch

from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.engine.layers import resolve_layers
from saliency_audit.workers.engine.methods.base import cam_layer_choice
from saliency_audit.workers.engine.models.loader import load_model
from tests.servers import REFERENCE, Api, Server, Worker, assert_problem, new_key

MODEL = REFERENCE / "shapes_small_cnn.onnx"


def images_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((REFERENCE / "shapes_images").glob("*.png"))[:2]:
            archive.write(path, path.name)
    return buffer.getvalue()


def inspected(api: Api, model_id: str, timeout_s: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        details: dict[str, Any] = api.get(f"/v1/models/{model_id}").json()["details"]
        if "layers" in details:
            return details
        time.sleep(0.3)
    raise AssertionError(f"model {model_id} was not inspected within {timeout_s} s")


def engine_message(check: Callable[[], object]) -> str:
    with pytest.raises(SpecError) as caught:
        check()
    return str(caught.value)


@pytest.fixture(scope="module")
def loaded() -> Any:
    return load_model(MODEL.read_bytes())


def test_unknown_layer_names_are_refused_at_submit_with_the_engines_message(
    pg_config: Config,
    pg_server: Server,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
    loaded: Any,
) -> None:
    worker_factory(pg_config)
    api = Api(pg_server.url, new_key(pg_database))
    model = api.upload_model(MODEL)
    dataset = api.upload_dataset(images_zip())
    details = inspected(api, model["id"])

    module = loaded.module.eval()
    spec = loaded.input_spec
    example = torch.zeros(1, spec.channels, spec.height, spec.width)
    names = [name for name, _ in module.named_modules() if name]
    assert details["layers"]["modules"] == names
    convs = details["layers"]["conv"]
    assert convs and set(convs) <= set(names)

    body = {"model_id": model["id"], "dataset_id": dataset["id"], "methods": ["gradcam"]}
    unknown = api.post("/v1/audits", json={**body, "layer": "features.nope"})
    assert_problem(unknown, 422, "invalid_spec")
    assert unknown.json()["detail"] == engine_message(
        lambda: cam_layer_choice(module, "features.nope")
    )

    analysis = {**body, "tests": ["layers"], "layers": [convs[0], "no_such_block"]}
    refused = api.post("/v1/audits", json=analysis)
    assert_problem(refused, 422, "invalid_spec")
    with torch.no_grad():
        expected = engine_message(
            lambda: resolve_layers(module, [convs[0], "no_such_block"], example)
        )
    assert refused.json()["detail"] == expected

    # a real name passes the check and the audit runs on it
    accepted = api.post("/v1/audits", json={**body, "layer": convs[-1]})
    assert accepted.status_code == 202, accepted.text
    done = api.wait(accepted.json()["id"])
    assert done["state"] == "succeeded", done


def test_before_the_inspection_the_worker_still_decides(
    pg_config: Config, pg_server: Server, pg_database: Database
) -> None:
    """No worker runs here, so the model is never inspected: submit accepts the name (the audit
    stays queued, to fail in the worker with the same message once one runs)."""
    api = Api(pg_server.url, new_key(pg_database))
    model = api.upload_model(MODEL, {"name": "not inspected"})
    dataset = api.upload_dataset(images_zip())
    assert "layers" not in api.get(f"/v1/models/{model['id']}").json()["details"]
    response = api.post(
        "/v1/audits",
        json={
            "model_id": model["id"],
            "dataset_id": dataset["id"],
            "methods": ["gradcam"],
            "layer": "features.nope",
        },
    )
    assert response.status_code == 202, response.text
    assert api.delete(f"/v1/audits/{response.json()['id']}").status_code in (200, 202)
