"""report.json follows its published JSON Schema, and the schema rejects what it must."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest

from saliency_audit.workers.engine.runner import run_audit
from saliency_audit.workers.engine.spec import AuditSpec
from saliency_audit.workers.reports.schema import report_schema
from tests.engine.test_layers import shapes_inputs, shapes_resnet


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    x, masks, _ = shapes_inputs(4)
    spec = AuditSpec(
        methods=("gradient", "gradcam"),
        tests=("cascading", "random_logit", "layers"),
        layers=("layer3.0.relu2",),
        batch_size=4,
    )
    document: dict[str, Any] = json.loads(
        json.dumps(run_audit(shapes_resnet(), x, spec, masks=masks).to_dict())
    )
    return document


def test_the_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(report_schema())


def test_an_engine_report_validates(report: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(report_schema()).validate(report)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda r: r.pop("verdicts"),
        lambda r: r["verdicts"][0].update(verdict="MAYBE"),
        lambda r: r["tests"]["cascading"]["scores"][0].pop("ci_low"),
        lambda r: r.update(schema_version="1"),
        lambda r: r["model"].update(sha256="not-a-sha"),
        lambda r: r.update(surprise=True),
        lambda r: r["methods"]["gradient"].update(status="fine"),
    ],
)
def test_the_schema_rejects_a_broken_report(report: dict[str, Any], break_it: Any) -> None:
    broken = copy.deepcopy(report)
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(report_schema()).validate(broken)
