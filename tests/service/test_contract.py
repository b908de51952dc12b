"""One declaration per shape: the served OpenAPI components and report schema are the
contract's, and the engine, the schema and the API agree on every bound.

The contract (workers/engine/contract) declares the shapes; /openapi.json and
/v1/schemas/report.json must be what pydantic derives from them, not a second hand-written copy
that can drift (lrp_composite without its enum, faithfulness_steps without its minimum,
localization_threshold without its range, pass_when dropped from verdict rows: all were).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, g
from flask.testing import FlaskClient
from jsonschema import ValidationError

import saliency_audit.service.auth
from saliency_audit.service.api import audits as audits_api
from saliency_audit.service.app import State, create_app
from saliency_audit.service.config import Config
from saliency_audit.service.models import VerdictRow
from saliency_audit.workers.engine import result, spec
from saliency_audit.workers.engine.contract import verdicts
from saliency_audit.workers.engine.contract.catalogue import Catalogue
from saliency_audit.workers.engine.contract.problem import Problem
from saliency_audit.workers.engine.contract.report import Heatmap, ReportDocument
from saliency_audit.workers.engine.contract.schema import (
    components,
    name_enums,
    rendered,
    schema_of,
)
from saliency_audit.workers.engine.contract.spec import (
    LRP_COMPOSITES,
    AuditSpec,
    InputSpec,
    MethodParams,
)
from saliency_audit.workers.engine.contract.verdicts import (
    CONTROLS,
    VERDICTS,
    PassWhen,
    Verdict,
    VerdictValue,
)
from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.reports.schema import inline_single_use
from tests.service.test_openapi import TENANT, FakeSession, add_audit, check, validate

# the components the OpenAPI document takes from the contract as they are generated
GENERATED = (
    "MethodParams",
    "TrainRecipe",
    "Verdict",
    "VerdictValue",
    "PassWhen",
    "Heatmap",
    "MethodInfo",
    "TestInfo",
    "Catalogue",
    "Policy",
    "PolicyRule",
    "PolicyMapChecks",
    "Problem",
)


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    return create_app(Config(data_dir=tmp_path, reconcile_in_api=False))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def fake(app: Flask, monkeypatch: pytest.MonkeyPatch) -> FakeSession:
    session = FakeSession()
    st: State = app.extensions["saliency_audit"]

    @contextmanager
    def open_session() -> Iterator[FakeSession]:
        yield session

    def require_tenant(_session: Any) -> str:
        g.tenant_id = TENANT
        return TENANT

    monkeypatch.setattr(st.db, "session", open_session)
    monkeypatch.setattr(saliency_audit.service.auth, "require_tenant", require_tenant)
    return session


@pytest.fixture
def doc(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    served: dict[str, Any] = response.get_json()
    return served


def expected_components() -> dict[str, Any]:
    """What the contract's models generate, independently of service/openapi.py."""
    requests = components([AuditSpec, InputSpec])
    responses = {
        name: rendered(schema, every_property=False)
        for name, schema in components(
            [Verdict, Heatmap, Catalogue, Problem], mode="serialization"
        ).items()
    }
    return name_enums(
        {**responses, **requests}, {"VerdictValue": VerdictValue, "PassWhen": PassWhen}
    )


def test_openapi_components_are_the_contracts_generated_schemas(doc: dict[str, Any]) -> None:
    served = doc["components"]["schemas"]
    expected = expected_components()
    for name in GENERATED:
        if name == "Heatmap":  # the url property keeps its prose
            assert served[name]["properties"].keys() == expected[name]["properties"].keys()
            assert served[name]["required"] == expected[name]["required"]
            continue
        assert served[name] == expected[name], name
    # the spec components keep the API's description, not the engine docstring
    assert served["InputSpec"]["properties"] == expected["InputSpec"]["properties"]
    assert served["AuditSpec"]["properties"] == rendered(expected["AuditSpec"])["properties"]
    assert served["AuditSpec"]["required"] == [f.name for f in dataclasses.fields(AuditSpec)]
    # a request's fields that AuditSpec declares carry its bounds and defaults
    request = served["AuditRequest"]["properties"]
    for key in ("seed", "batch_size"):
        assert request[key] == expected["AuditSpec"]["properties"][key]
    assert request["params"]["anyOf"][0] == {"$ref": "#/components/schemas/MethodParams"}


def test_report_schema_is_the_contracts_report_document(
    client: FlaskClient, fake: FakeSession
) -> None:
    served = client.get("/v1/schemas/report.json").get_json()
    generated = schema_of(ReportDocument, ref_template="#/$defs/{model}", mode="serialization")
    body = {k: v for k, v in served.items() if k not in ("$schema", "$id", "title")}
    assert body == inline_single_use(generated)
    verdict = served["properties"]["verdicts"]["items"]
    assert list(verdict["properties"]) == [f.name for f in dataclasses.fields(Verdict)]
    assert verdict["required"] == list(verdict["properties"])
    score = served["properties"]["tests"]["additionalProperties"]["properties"]["scores"]
    assert list(score["items"]["properties"]) == [f.name for f in dataclasses.fields(result.Score)]


def test_the_verdict_shape_is_declared_once() -> None:
    assert result.Verdict is Verdict and result.VerdictValue is VerdictValue
    assert VERDICTS == ("PASS", "FAIL", "INCONCLUSIVE")
    assert CONTROLS == ("control_sobel", "control_random")
    assert verdicts.VERDICTS is VERDICTS
    columns = set(VerdictRow.__table__.columns.keys())
    assert {f.name for f in dataclasses.fields(Verdict)} <= columns
    assert tuple(f.name for f in dataclasses.fields(Verdict)) == audits_api.VERDICT_FIELDS
    assert spec.AuditSpec is AuditSpec and spec.MethodParams is MethodParams


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"lrp_composite": "epsilon_gamma"}, "known composites: epsilon_alpha2_beta1"),
        ({"faithfulness_steps": 0}, "faithfulness_steps must be in [1, 1024]"),
        ({"localization_threshold": 1.0}, "localization_threshold must be in (0, 1)"),
        ({"localization_threshold": 0}, "localization_threshold must be in (0, 1)"),
        ({"emprt_bins": 1}, "emprt_bins must be in [2, 10000]"),
        ({"ig_steps": "3"}, "ig_steps"),
        ({"warp": 9}, "unknown params fields: ['warp']"),
    ],
)
def test_engine_schema_and_api_refuse_the_same_parameters(
    doc: dict[str, Any], params: dict[str, Any], words: str
) -> None:
    with pytest.raises(SpecError) as refused:
        AuditSpec.from_dict({"methods": ["gradient"], "params": params})
    assert words in refused.value.message
    with pytest.raises(SpecError):
        audits_api.engine_spec({"methods": ["gradient"], "params": params})
    with pytest.raises(ValidationError):
        validate(doc, params, doc["components"]["schemas"]["MethodParams"])


def test_the_drifted_bounds_are_in_the_document(doc: dict[str, Any]) -> None:
    params = doc["components"]["schemas"]["MethodParams"]["properties"]
    assert params["lrp_composite"]["enum"] == list(LRP_COMPOSITES)
    assert params["faithfulness_steps"]["minimum"] == 1
    assert params["localization_threshold"]["exclusiveMinimum"] == 0
    assert params["localization_threshold"]["exclusiveMaximum"] == 1
    assert params["emprt_bins"]["minimum"] == 2
    for name in LRP_COMPOSITES:
        validate(doc, {"lrp_composite": name}, doc["components"]["schemas"]["MethodParams"])
        MethodParams(lrp_composite=name)


def test_verdict_rows_carry_pass_when_in_the_api_and_the_document(
    client: FlaskClient, fake: FakeSession, doc: dict[str, Any]
) -> None:
    schemas = doc["components"]["schemas"]
    assert schemas["Verdict"]["properties"]["pass_when"] == {
        "anyOf": [{"$ref": "#/components/schemas/PassWhen"}, {"type": "null"}]
    }
    assert schemas["PassWhen"]["enum"] == ["below", "above"]
    audit = add_audit(fake, "succeeded")
    fake.add(
        VerdictRow(
            tenant_id=TENANT,
            audit_id=audit.id,
            method="gradient",
            test="cascading",
            verdict="PASS",
            reason="the maps change",
            measure="ssim",
            stage="first",
            threshold=0.46,
            fail_threshold=0.47,
            pass_when="below",
            mean=0.2,
            ci_low=0.1,
            ci_high=0.3,
            n=4,
            is_control=False,
            policy_version="1.0.0",
        )
    )
    body = check(doc, client.get(f"/v1/audits/{audit.id}"), "/v1/audits/{audit_id}", "get")
    (row,) = body["verdicts"]
    assert row["pass_when"] == "below" and row["fail_threshold"] == 0.47
    assert list(row) == [f.name for f in dataclasses.fields(Verdict)]
    with pytest.raises(ValidationError):
        validate(doc, {**row, "pass_when": "sideways"}, schemas["Verdict"])


def test_nullable_enums_are_one_named_type(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    change = schemas["VerdictChange"]["properties"]
    assert change["latest"]["anyOf"] == [
        {"$ref": "#/components/schemas/VerdictValue"},
        {"type": "null"},
    ]
    audit = schemas["Audit"]["properties"]
    assert audit["documents_state"]["anyOf"][0] == {"$ref": "#/components/schemas/DocumentsState"}
    assert schemas["VerdictValue"]["enum"] == list(VERDICTS)


def test_the_api_takes_adaptive_rounds_as_the_engine_declares_them(doc: dict[str, Any]) -> None:
    request = doc["components"]["schemas"]["AuditRequest"]
    rounds = doc["components"]["schemas"]["AdaptiveRounds"]["properties"]
    assert {"$ref": "#/components/schemas/AdaptiveRounds"} in request["properties"]["adaptive"][
        "anyOf"
    ]
    assert rounds["round_images"]["minimum"] == 1 and rounds["round_images"]["default"] == 32
    stored = audits_api.engine_spec({"methods": ["gradient"], "adaptive": {"round_images": 16}})
    assert stored["adaptive"] == {"round_images": 16, "max_images": None}
    assert audits_api.engine_spec({"methods": ["gradient"]})["adaptive"] is None
    validate(doc, {"round_images": 16}, doc["components"]["schemas"]["AdaptiveRounds"])
    # what the engine refuses, the API refuses (422 through the engine error handler)
    with pytest.raises(SpecError, match="an adaptive audit runs only"):
        audits_api.engine_spec({"methods": ["gradient"], "tests": ["emprt"], "adaptive": {}})
    with pytest.raises(SpecError, match="round_images must be in"):
        audits_api.engine_spec({"methods": ["gradient"], "adaptive": {"round_images": 0}})
    with pytest.raises(ValidationError):
        validate(doc, {"round_images": 0}, doc["components"]["schemas"]["AdaptiveRounds"])
