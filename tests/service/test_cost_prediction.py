"""The cost model at the service: a worker's inspection times the uploaded model's passes, the
submit answers with the predicted wall time (the number the engine's ``predict`` gives for the
stored prices), and the audit keeps it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from saliency_audit.service.api.audits import engine_spec
from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from saliency_audit.workers.engine.catalogue import catalogue
from saliency_audit.workers.engine.contract.cost import PassPrices, families_of, predict
from saliency_audit.workers.engine.contract.spec import AuditSpec
from saliency_audit.workers.engine.policy import load_policy
from saliency_audit.workers.engine.randomization import stages, units
from tests.servers import Api, Server, Worker, new_key
from tests.service.test_layer_names import MODEL, images_zip, inspected, loaded  # noqa: F401


def test_the_submit_answers_with_the_prediction_from_the_workers_timings(
    pg_config: Config,
    pg_server: Server,
    pg_database: Database,
    worker_factory: Callable[[Config], Worker],
    loaded: Any,  # noqa: F811
) -> None:
    api = Api(pg_server.url, new_key(pg_database))
    model = api.upload_model(MODEL, {"name": "priced"})
    dataset = api.upload_dataset(images_zip())
    body = {"model_id": model["id"], "dataset_id": dataset["id"], "methods": ["gradient"]}
    # no worker yet: the default price, said so
    early = api.post("/v1/audits", json=body)
    assert early.status_code == 202, early.text
    assert early.json()["estimate"]["measured"] is False
    assert early.json()["eta_s"] is None  # queued

    worker_factory(pg_config)
    details = inspected(api, model["id"])  # the prices are written with the layer names
    prices = PassPrices.from_dict(details["pass_prices"])
    module = loaded.module
    assert prices.stages["block"] == len(stages(units(module, "block"), "cascading"))
    assert prices.device == "cpu" and prices.forward_backward.at(16) > 0

    body = {**body, "methods": ["gradient", "scorecam"]}
    accepted = api.post("/v1/audits", json=body)
    assert accepted.status_code == 202, accepted.text
    estimate = accepted.json()["estimate"]
    expected = predict(
        AuditSpec.from_dict(engine_spec(body)),
        families_of(catalogue()["methods"]),
        prices,
        images=2,
        onnx=True,
        rule_stages={t: r.stage for t, r in load_policy(None).rules.items()},
    )
    assert estimate["measured"] is True
    assert estimate["predicted_s"] == round(expected.seconds, 1)
    assert set(estimate["parts_s"]) == set(expected.parts)
    done = api.wait(accepted.json()["id"])
    assert done["state"] == "succeeded", done
    assert done["estimate"] == estimate and done["eta_s"] is None
