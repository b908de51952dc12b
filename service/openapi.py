"""The OpenAPI 3.1 description of the HTTP API (``GET /openapi.json``) and its HTML page
(``GET /docs``).

The document is plain data, built once per process. The shapes that cross the engine's
boundary (audit spec and parameters, input spec, verdicts, scores, heatmaps, catalogue, policy,
problem) are the components pydantic generates from the contract (``workers/engine/contract``);
the service's own shapes are written here from the same constants the routes use (the
blueprints' ``METADATA_KEYS`` and ``BODY_KEYS``,
:data:`~saliency_audit.service.models.AUDIT_STATES`), so an
enum or a field list cannot drift from the code. ``tests/service/test_contract.py`` checks the
generated components, ``tests/service/test_openapi.py`` the rest (every route documented,
every rendered object valid against its schema). The HTML page is self-contained: no script,
font or stylesheet is fetched from anywhere.
"""

from __future__ import annotations

import copy
import html
import json
import re
from functools import cache
from importlib import metadata
from typing import Any

from saliency_audit.workers.engine.catalogue import method_names
from saliency_audit.workers.engine.contract.architectures import (
    MAX_TIMM_NAME,
    TIMM_NAME,
    TIMM_PREFIX,
)
from saliency_audit.workers.engine.contract.catalogue import Catalogue
from saliency_audit.workers.engine.contract.problem import Problem
from saliency_audit.workers.engine.contract.report import Heatmap, ReportDocument, Score
from saliency_audit.workers.engine.contract.schema import (
    components,
    name_enums,
    rendered,
    schema_of,
)
from saliency_audit.workers.engine.contract.verdicts import PassWhen, Verdict, VerdictValue
from saliency_audit.workers.engine.result import SCHEMA_VERSION
from saliency_audit.workers.engine.spec import MEASURES, TESTS, AuditSpec, InputSpec
from saliency_audit.workers.reports.schema import report_schema

from .api.audits import BODY_KEYS, MAX_IDEMPOTENCY_KEY, RETRY_AFTER_S
from .api.common import DEFAULT_PAGE
from .api.datasets import METADATA_KEYS as DATASET_METADATA_KEYS
from .api.models import METADATA_KEYS as MODEL_METADATA_KEYS
from .architectures import TORCHVISION_CLASSIFIERS
from .models import AUDIT_STATES, FINAL_STATES
from .problems import PROBLEM_JSON, TYPE_BASE
from .webhooks import MAX_URL as MAX_WEBHOOK_URL
from .webhooks import SIGNATURE_HEADER

Schema = dict[str, Any]

TITLE = "saliency-audit"
SCHEMAS = "#/components/schemas/"
SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}]
MODEL_FORMATS = ("onnx", "safetensors", "torch")
# the audit's PDF and HTML reports (null until it has succeeded) and its webhook (null until
# it has ended): the values saliency_audit.service.jobs and saliency_audit.workers.tasks write
DOCUMENTS_STATES = ("pending", "ready", "failed")
WEBHOOK_STATES = ("pending", "delivered", "failed")
# what saliency_audit.service.webhooks.sign() writes: t=<unix seconds>,v1=<hex HMAC-SHA256>
SIGNATURE_PATTERN = "^t=[0-9]+,v1=[0-9a-f]{64}$"
REPORT_SCHEMA_PATH = "/v1/schemas/report.json"
# the component of report.json (the schema served at REPORT_SCHEMA_PATH, see _report_schemas)
REPORT = "Report"

FINAL = ", ".join(f"`{s}`" for s in FINAL_STATES)
DESCRIPTION = f"""\
Audits whether a saliency method depends on what an image classifier learned (the sanity
checks of Adebayo et al. 2018: model and data randomization tests, with LRP and Relevance-CAM
among the methods).

Upload a classifier (`POST /v1/models`) and an image set (`POST /v1/datasets`), submit an
audit (`POST /v1/audits`), follow it (`GET /v1/audits/{{audit_id}}`, honouring `Retry-After`)
and, once it has succeeded, read its verdicts, scores, heatmaps and report.

**Authentication.** Every `/v1/` route needs `Authorization: Bearer KEY` (create a key with
`saliency-audit keys create --tenant NAME`); a tenant sees only its own resources, and another
tenant's id answers 404 exactly like a missing one.

**Job states.** An audit is `queued` -> `running` -> `succeeded` | `failed` | `canceled`.
{FINAL} are final. Canceling a queued audit cancels it at once; a running
audit stops at its next heartbeat. A running audit whose worker stops sending heartbeats is
queued again (its `attempts` grow) until the attempt cap, then it fails with the error code
`attempts_exhausted`.

**Errors.** Every error is an RFC 9457 problem (`{PROBLEM_JSON}`, schema `Problem`) whose
`code` is a stable slug (`type` is `{TYPE_BASE}` + `code`). Besides the statuses listed per
operation, any path answers 404 (`not_found`) when nothing is routed there and 405
(`method_not_allowed`, with an `Allow` header) for a method it does not serve; `HEAD` and
`OPTIONS` are answered automatically wherever `GET` is served. A 503 carries `Retry-After`.

**Reports.** A succeeded audit's `report.json` follows the JSON Schema (draft 2020-12) served at
`GET {REPORT_SCHEMA_PATH}` (here the schema `{REPORT}`), versioned with the report's
`schema_version` (now `{SCHEMA_VERSION}`). Its PDF (`report.pdf`) and HTML (`report`) reports
are rendered afterwards on a CPU worker (the audit's `documents_state`: `pending` -> `ready` |
`failed`); until they are ready those routes answer 409 `report_rendering` with `Retry-After`.

**Webhooks.** An audit submitted with `webhook_url` is POSTed to it (JSON, schema
`WebhookEvent`) when it ends, signed with the tenant's webhook secret in
`{SIGNATURE_HEADER}: t=<unix seconds>,v1=<hex>`, the hex HMAC-SHA256 of `"<t>.<raw body>"`.
Delivery is at least once (deduplicate on `delivery_id`); the audit's `webhook` tells how it
went.
"""


def _ref(name: str) -> Schema:
    return {"$ref": SCHEMAS + name}


def _nullable(kind: str, **extra: Any) -> Schema:
    return {"type": [kind, "null"], **extra}


def _object(properties: dict[str, Schema], **extra: Any) -> Schema:
    """An object whose every property is always present (what a route renders)."""
    return {"type": "object", "properties": properties, "required": list(properties), **extra}


DATE_TIME: Schema = {"type": "string", "format": "date-time"}
DATE_TIME_OR_NULL: Schema = _nullable("string", format="date-time")
SHA256: Schema = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
ID: Schema = {"type": "string", "description": "An opaque id (32 hex characters)."}
LINK: Schema = {"type": "string", "format": "uri-reference"}
NUMBER_OR_NULL: Schema = _nullable("number")


def _string_list(item: Schema, what: str, *, nullable: bool = True) -> Schema:
    """A list of names, also accepted as one comma-separated string; duplicates are dropped."""
    kinds: list[Schema] = [
        {"type": "array", "items": item},
        {"type": "string", "description": f"comma-separated {what}"},
    ]
    if nullable:
        kinds.append({"type": "null"})
    return {"anyOf": kinds}


INPUT_SPEC_DESCRIPTION = (
    "How raw images become the model's input tensor: resized to height x width, put in "
    "channel_order, scaled from [0, 255] to value_range (e.g. [0, 255] for a model that "
    "takes raw pixel values), then normalized with (x - mean) / std; and which output "
    "holds the class scores. A field left out is read from the ONNX file where it says it "
    "(the input's size and layout; the metadata entry saliency_audit.input_spec), else it "
    "keeps its default (assumed); report.json's model.input_spec_sources says which."
)


def _schemas() -> dict[str, Schema]:
    contract = components([AuditSpec, InputSpec])
    for name, schema in components(
        [Verdict, Score, Heatmap, Catalogue, Problem], mode="serialization"
    ).items():
        contract.setdefault(name, rendered(schema, every_property=False))
    contract = name_enums(contract, {"VerdictValue": VerdictValue, "PassWhen": PassWhen})
    input_spec = {**contract["InputSpec"], "description": INPUT_SPEC_DESCRIPTION}
    model_metadata_props: dict[str, Schema] = {
        "name": {
            "type": "string",
            "description": "Display name (default: the uploaded file's name); cut to 300 "
            "characters.",
        },
        "architecture": {
            "anyOf": [
                {"type": "string", "enum": sorted(TORCHVISION_CLASSIFIERS)},
                {
                    "type": "string",
                    "pattern": f"^{TIMM_PREFIX}{TIMM_NAME.pattern}$",
                    "maxLength": len(TIMM_PREFIX) + MAX_TIMM_NAME,
                },
                {"type": "null"},
            ],
            "description": "The architecture a weights file (safetensors or torch.save) is "
            f"for, a torchvision classifier or {TIMM_PREFIX}NAME for a timm model (timm "
            "installed in the workers: the worker's inspection after the upload checks that "
            "timm has it, and when the model does not load there POST /v1/audits answers 422 "
            "model_not_loadable with the reason): required for weights (422 "
            "architecture_required, unknown_architecture); "
            "refused for an ONNX file, which carries its own graph (422 "
            "architecture_not_used).",
        },
        "input_spec": {"anyOf": [_ref("InputSpec"), {"type": "null"}]},
        "class_names": {
            **_nullable("array", items={"type": "string"}),
            "description": "The model's class names, in logit order.",
        },
    }
    dataset_metadata_props: dict[str, Schema] = {
        "name": {
            "type": "string",
            "description": "Display name (default: the uploaded file's name); cut to 300 "
            "characters.",
        },
        "purpose": {
            "type": "string",
            "enum": ["audit", "training"],
            "default": "audit",
            "description": "'training' raises the image cap for a data randomization training set.",
        },
    }
    if set(model_metadata_props) != MODEL_METADATA_KEYS:  # pragma: no cover - a code change
        raise RuntimeError("the model metadata schema is out of date with METADATA_KEYS")
    if set(dataset_metadata_props) != DATASET_METADATA_KEYS:  # pragma: no cover
        raise RuntimeError("the dataset metadata schema is out of date with METADATA_KEYS")

    # the request's fields that the engine's AuditSpec declares keep its bounds and defaults
    spec_props = contract["AuditSpec"]["properties"]
    tests_enum = [*TESTS, "all"]
    audit_request_props: dict[str, Schema] = {
        "model_id": {**ID, "description": "A model of this tenant (422 unknown_model)."},
        "dataset_id": {**ID, "description": "A dataset of this tenant (422 unknown_dataset)."},
        "train_dataset_id": {
            **_nullable("string"),
            "description": "A labeled dataset to train on: required by the data_randomization "
            "test.",
        },
        "methods": {
            **_string_list({"type": "string", "enum": method_names()}, "method names"),
            "description": "Saliency methods (GET /v1/methods); at least one.",
        },
        "tests": {
            **_string_list({"type": "string", "enum": tests_enum}, "test names"),
            "default": ["cascading"],
            "description": "Randomization tests; ['all'] (alone) runs every test, "
            "data_randomization only when train_dataset_id is given. null or [] runs none.",
        },
        "layer": {
            **_nullable("string"),
            "description": "The module of the CAM family and Relevance-CAM in the sanity "
            "checks (default: the deepest convolution).",
        },
        "layers": {
            **_string_list({"type": "string"}, "layer names"),
            "description": "Modules the `layers` analysis explains (default: the output of "
            "every block, shallow to deep).",
        },
        "policy": {
            **_nullable("object"),
            "description": "A verdict policy document (default: default_policy of "
            "GET /v1/methods).",
        },
        "seed": spec_props["seed"],
        "granularity": {
            **spec_props["granularity"],
            "description": "Stages of the model randomization tests: one per parameterized "
            "module, or one per child of the model's root.",
        },
        "stages": spec_props["stages"],
        "measures": {
            **_string_list(spec_props["measures"]["items"], "measure names"),
            "default": list(MEASURES),
            "description": "Similarity measures to score; a non-empty subset.",
        },
        "params": {"anyOf": [{"$ref": SCHEMAS + "MethodParams"}, {"type": "null"}]},
        "training": {"anyOf": [{"$ref": SCHEMAS + "TrainRecipe"}, {"type": "null"}]},
        "batch_size": spec_props["batch_size"],
        "adaptive": {
            "anyOf": [{"$ref": SCHEMAS + "AdaptiveRounds"}, {"type": "null"}],
            "description": "Add images in rounds and stop when every verdict is decided "
            "(null: every image at once). Verdicts then rest on an anytime-valid 95% confidence "
            "sequence; report.json's adaptive block says how many images were used and why the "
            "audit stopped. Only the tests cascading, cascading_bottom_up, independent, smprt "
            "and random_logit (422 otherwise).",
        },
        "webhook_url": {
            "anyOf": [
                {
                    "type": "string",
                    "format": "uri",
                    "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://",
                    "maxLength": MAX_WEBHOOK_URL,
                },
                {"type": "null"},
            ],
            "description": "An http(s) URL (no credentials) to POST a signed `WebhookEvent` to "
            "when the audit ends (the submission's `auditFinished` callback). Unless the server "
            "allows private addresses, a host that resolves to a loopback, private, "
            "link-local or reserved address is refused (422 invalid_webhook_url), at "
            "submission and again at delivery.",
        },
    }
    if set(audit_request_props) != BODY_KEYS:  # pragma: no cover - a code change
        raise RuntimeError("the audit request schema is out of date with BODY_KEYS")

    audit_spec = {
        **rendered(contract["AuditSpec"]),
        "description": "The validated request as the engine runs it (every default filled in).",
    }
    verdict_summary: Schema = {
        **_nullable("object"),
        "additionalProperties": {
            "type": "object",
            "additionalProperties": _ref("VerdictValue"),
        },
        "description": "method -> test -> verdict, once the audit has succeeded.",
    }
    audit_error: Schema = {
        **_nullable("object"),
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        "description": "Why a failed audit failed.",
    }
    audit = _object(
        {
            "id": ID,
            "state": {"$ref": SCHEMAS + "AuditState"},
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "step": {**_nullable("string"), "description": "What the audit is doing now."},
            "attempts": {"type": "integer", "minimum": 0},
            "model_id": ID,
            "dataset_id": ID,
            "train_dataset_id": _nullable("string"),
            "spec": {"$ref": SCHEMAS + "AuditSpec"},
            "error": audit_error,
            "cancel_requested": {"type": "boolean"},
            "created_at": DATE_TIME,
            "started_at": DATE_TIME_OR_NULL,
            "heartbeat_at": DATE_TIME_OR_NULL,
            "finished_at": DATE_TIME_OR_NULL,
            "verdict_summary": verdict_summary,
            "estimate": {
                **_nullable("object"),
                "properties": {
                    "predicted_s": {"type": "number", "minimum": 0},
                    "measured": {
                        "type": "boolean",
                        "description": "true: from the model's pass times measured by a "
                        "worker's inspection (docs/service.md, Cost); false: the default price "
                        "per row-megapixel, before any worker has measured the model.",
                    },
                    "basis": {"type": "string"},
                    "parts_s": {
                        "type": "object",
                        "additionalProperties": {"type": "number"},
                        "description": "The prediction by part (pass kinds, exports, scoring).",
                    },
                },
                "description": "The audit's predicted worker wall time at submit (the number "
                "the cost limit is checked against).",
            },
            "eta_s": {
                **_nullable("number"),
                "description": "Seconds left of a running audit: the prediction blended with "
                "the rate its progress shows; null unless running.",
            },
            "documents_state": {
                "anyOf": [_ref("DocumentsState"), {"type": "null"}],
                "description": "The PDF and HTML reports: null until the audit has succeeded, "
                "then pending (rendering on a CPU worker) -> ready | failed.",
            },
            "webhook": {
                "anyOf": [_ref("AuditWebhook"), {"type": "null"}],
                "description": "null when the audit was submitted without webhook_url.",
            },
            "links": _object(
                {
                    "self": LINK,
                    "report": {**LINK, "description": "report.json"},
                    "results": LINK,
                    "heatmaps": LINK,
                    "model": LINK,
                    "pdf": {**LINK, "description": "The PDF report."},
                    "html": {**LINK, "description": "The HTML report."},
                }
            ),
        },
        description="An audit job. `verdicts` is present only in GET /v1/audits/{audit_id} "
        "of a succeeded audit.",
    )
    audit["properties"]["verdicts"] = {"type": "array", "items": {"$ref": SCHEMAS + "Verdict"}}
    audit_webhook = _object(
        {
            "url": {"type": "string", "format": "uri"},
            "state": {
                "anyOf": [_ref("WebhookState"), {"type": "null"}],
                "description": "null until the audit ends; pending while deliveries are tried; "
                "delivered (a 2xx answer) or failed (every attempt used up).",
            },
            "attempts": {"type": "integer", "minimum": 0},
            "error": {
                **_nullable("string"),
                "description": "What the last failed attempt got (an HTTP status or a network "
                "error).",
            },
        },
        description="The completion webhook of an audit submitted with webhook_url.",
    )
    webhook_event = _object(
        {
            "event": {"type": "string", "const": "audit.finished"},
            "delivery_id": {
                "type": "string",
                "description": "`<audit_id>:<state>`: the same for every retry of one "
                "delivery, so a receiver deduplicates on it.",
            },
            "audit_id": ID,
            "state": {"type": "string", "enum": list(FINAL_STATES)},
            "model_id": ID,
            "dataset_id": ID,
            "verdict_summary": verdict_summary,
            "error": audit_error,
            "finished_at": DATE_TIME_OR_NULL,
            "links": _object(
                {
                    "audit": LINK,
                    "report": {**LINK, "description": "report.json"},
                    "pdf": {**LINK, "description": "The PDF report (409 until rendered)."},
                }
            ),
        },
        description=f"The body POSTed to an audit's webhook_url when it ends, signed in "
        f"{SIGNATURE_HEADER} (see the auditFinished callback of POST /v1/audits).",
    )
    nullable_verdict: Schema = {"anyOf": [_ref("VerdictValue"), {"type": "null"}]}
    trend_point = _object(
        {
            "audit_id": ID,
            "finished_at": DATE_TIME_OR_NULL,
            "verdicts": {
                "type": "object",
                "additionalProperties": _ref("VerdictValue"),
                "description": "test -> verdict.",
            },
        },
        description="One succeeded audit's verdicts for one method.",
    )
    verdict_change = _object(
        {
            "method": {"type": "string"},
            "test": {"type": "string"},
            "previous": {**nullable_verdict, "description": "null: not decided then."},
            "latest": {**nullable_verdict, "description": "null: not decided now."},
            "changed": {"type": "boolean"},
            "previous_mean": NUMBER_OR_NULL,
            "latest_mean": NUMBER_OR_NULL,
        },
        description="One (method, test) in the last two succeeded audits.",
    )
    comparison = _object(
        {
            "previous_audit_id": ID,
            "latest_audit_id": ID,
            "changes": {"type": "array", "items": _ref("VerdictChange")},
        },
        description="The last two succeeded audits of a model, (method, test) by (method, "
        "test); null with fewer than two.",
    )
    model_history = _page(
        "Audit",
        {
            "trend": {
                "type": "object",
                "additionalProperties": {"type": "array", "items": _ref("VerdictTrendPoint")},
                "description": "method -> its verdicts in every succeeded audit of the model, "
                "oldest to newest (not paginated).",
            },
            "comparison": {"anyOf": [_ref("AuditComparison"), {"type": "null"}]},
        },
        description="A page of the model's audits, newest first, with the verdict trend and "
        "what changed between its last two succeeded audits.",
    )

    model = _object(
        {
            "id": ID,
            "name": {"type": "string"},
            "format": {"type": "string", "enum": list(MODEL_FORMATS)},
            "architecture": _nullable("string"),
            "sha256": SHA256,
            "size_bytes": {"type": "integer", "minimum": 1},
            "input_spec": {
                "type": "object",
                "description": "The input spec fields given at upload (the rest are read "
                "from the file or keep the InputSpec defaults).",
            },
            "class_names": _nullable("array", items={"type": "string"}),
            "details": {
                "type": "object",
                "description": "What the upload check found; `layers` (once a worker has "
                "loaded the model, seconds after the upload): `modules`, `conv` and `spatial`, "
                "the names an audit's `layer` and `layers` may give, checked at submit; "
                "`load_problem` (`code`, `message`) instead when the worker could not load it "
                "(an audit of it is then refused: 422 model_not_loadable; uploading the same "
                "file again inspects it again).",
            },
            "created_at": DATE_TIME,
            "links": _object({"self": LINK, "audits": LINK}),
        },
        description="An uploaded classifier.",
    )
    dataset = _object(
        {
            "id": ID,
            "name": {"type": "string"},
            "sha256": {**SHA256, "description": "Of the uploaded archive."},
            "size_bytes": {"type": "integer", "minimum": 1},
            "n_images": {"type": "integer", "minimum": 0},
            "labeled": {
                "type": "boolean",
                "description": "One folder of images per class (a training set).",
            },
            "class_names": _nullable("array", items={"type": "string"}),
            "has_masks": {"type": "boolean"},
            "has_boxes": {"type": "boolean"},
            "skipped": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Archive members left out because they are not images (hidden "
                "files, __MACOSX, text notes), each with the reason.",
            },
            "created_at": DATE_TIME,
            "links": _object({"self": LINK}),
        },
        description="An uploaded image set.",
    )
    dataset_image = _object(
        {
            "name": {"type": "string"},
            "sha256": SHA256,
            "label": _nullable("string"),
            "width": _nullable("integer"),
            "height": _nullable("integer"),
        }
    )
    dataset_detail = {
        "description": "A dataset with its images.",
        "allOf": [
            {"$ref": SCHEMAS + "Dataset"},
            {
                "type": "object",
                "properties": {"images": {"type": "array", "items": _ref("DatasetImage")}},
                "required": ["images"],
            },
        ],
    }
    score = contract.pop("Score")
    result = {
        **score,
        "properties": {k: v for k, v in score["properties"].items() if k != "values"},
        "required": [k for k in score["required"] if k != "values"],
        "description": "One score: the mean similarity over the images with its 95% bootstrap "
        "interval (report.json's Score without the per-image values).",
    }
    heatmap = contract["Heatmap"]
    heatmap = {
        **heatmap,
        "properties": {
            **heatmap["properties"],
            "url": {**LINK, "description": "GET it for the image/png."},
        },
    }
    named_enums: dict[str, Schema] = {
        "DocumentsState": {
            "type": "string",
            "enum": list(DOCUMENTS_STATES),
            "description": "The PDF and HTML reports: pending (rendering) -> ready | failed.",
        },
        "WebhookState": {
            "type": "string",
            "enum": list(WEBHOOK_STATES),
            "description": "pending while deliveries are tried; delivered or failed.",
        },
    }
    return {
        **contract,
        **named_enums,
        "AuditState": {
            "type": "string",
            "enum": list(AUDIT_STATES),
            "description": "queued -> running -> succeeded | failed | canceled.",
        },
        "Audit": audit,
        "AuditSpec": audit_spec,
        "Heatmap": heatmap,
        "AuditRequest": {
            "type": "object",
            "properties": audit_request_props,
            "required": ["model_id", "dataset_id", "methods"],
            "additionalProperties": False,
        },
        "AuditPage": _page("Audit"),
        "AuditWebhook": audit_webhook,
        "WebhookEvent": webhook_event,
        "Model": model,
        "ModelPage": _page("Model"),
        "ModelHistory": model_history,
        "VerdictTrendPoint": trend_point,
        "AuditComparison": comparison,
        "VerdictChange": verdict_change,
        "ModelMetadata": {
            "type": "object",
            "description": "The optional JSON part `metadata` of a model upload.",
            "properties": model_metadata_props,
            "additionalProperties": False,
        },
        "ModelUpload": _upload_form(
            "ModelMetadata", "The classifier: ONNX, safetensors or a torch.save zip."
        ),
        "InputSpec": input_spec,
        "Dataset": dataset,
        "DatasetDetail": dataset_detail,
        "DatasetImage": dataset_image,
        "DatasetPage": _page("Dataset"),
        "DatasetMetadata": {
            "type": "object",
            "description": "The optional JSON part `metadata` of a dataset upload.",
            "properties": dataset_metadata_props,
            "additionalProperties": False,
        },
        "DatasetUpload": _upload_form("DatasetMetadata", "A zip or tar archive of images."),
        "Result": result,
        "ResultList": _object({"items": {"type": "array", "items": _ref("Result")}}),
        "HeatmapList": _object({"items": {"type": "array", "items": _ref("Heatmap")}}),
        "Health": _object({"status": {"type": "string", "const": "ok"}}),
        "Ready": _object(
            {
                "status": {"type": "string", "const": "ready"},
                "checks": _object(
                    {
                        "database": {"type": "string", "const": "ok"},
                        "broker": {"type": "string", "const": "ok"},
                    }
                ),
            }
        ),
    }


def _report_component(key: str) -> str:
    name = "".join(part[:1].upper() + part[1:] for part in key.split("_"))
    return name if name.startswith(REPORT) else REPORT + name


def _report_schemas() -> dict[str, Schema]:
    """The report schema served at :data:`REPORT_SCHEMA_PATH` as components: ``Report`` and one
    ``Report<Name>`` per entry of its ``$defs``, their references rewritten, so report.json's
    response refers to it and a generated client reads a typed report. Derived from
    :func:`saliency_audit.workers.reports.schema.report_schema`, never written a second time. Its
    ``$id``,
    ``$schema`` and ``title`` stay with the served document: an ``$id`` here would move the base
    of every reference inside it, and generators name a class after a ``title``."""
    # the generated schema before single-use blocks are inlined: every shape keeps its name, so
    # a generated client has ReportVerdict, ReportMethodResult, ... rather than anonymous types
    source = {
        **report_schema(),
        **schema_of(ReportDocument, ref_template="#/$defs/{model}", mode="serialization"),
    }
    names = {key: _report_component(key) for key in source.get("$defs", {})}

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(value) for value in node]
        if not isinstance(node, dict):
            return node
        out = {key: rewrite(value) for key, value in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            out["$ref"] = SCHEMAS + names[ref.removeprefix("#/$defs/")]
        return out

    top = {k: v for k, v in source.items() if k not in ("$schema", "$id", "$defs", "title")}
    schemas = {REPORT: rewrite(top)}
    for key, schema in source.get("$defs", {}).items():
        schemas[names[key]] = rewrite(schema)
    return schemas


def _page(
    item: str, extra: dict[str, Schema] | None = None, description: str | None = None
) -> Schema:
    return _object(
        {
            "items": {"type": "array", "items": _ref(item)},
            "total": {"type": "integer", "minimum": 0},
            "limit": {"type": "integer", "minimum": 1},
            "offset": {"type": "integer", "minimum": 0},
            "next": {
                **_nullable("string", format="uri-reference"),
                "description": "The next page, or null on the last one.",
            },
            **(extra or {}),
        },
        description=description or f"A page of {item} objects, newest first.",
    )


def _upload_form(metadata_schema: str, what: str) -> Schema:
    """A multipart upload: the binary ``file`` part (``format: binary`` is what client generators
    read as a file to send as a file part, ``contentMediaType`` what OpenAPI 3.1 says) and the
    optional JSON ``metadata`` part."""
    return {
        "type": "object",
        "properties": {
            "file": {
                "type": "string",
                "format": "binary",
                "contentMediaType": "application/octet-stream",
                "description": what + " Sent as a file part (with a filename).",
            },
            "metadata": {
                "$ref": SCHEMAS + metadata_schema,
                "description": "JSON (a form field or a file part), at most 1 MiB.",
            },
        },
        "required": ["file"],
    }


# --- parameters, headers, responses ---------------------------------------------------------


def _path_param(name: str, what: str, schema: Schema | None = None) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": what,
        "schema": schema or {"type": "string"},
    }


def _query(name: str, what: str, schema: Schema | None = None) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": what,
        "schema": schema or {"type": "string"},
    }


PARAMETERS: dict[str, Schema] = {
    "ModelId": _path_param("model_id", "A model id."),
    "DatasetId": _path_param("dataset_id", "A dataset id."),
    "AuditId": _path_param("audit_id", "An audit id."),
    "Sha256": _path_param(
        "sha256", "The file's sha256 (hex), as listed in report.json's artifacts."
    ),
    "HeatmapId": _path_param(
        "heatmap_id", "A heatmap id (from the heatmaps list).", {"type": "integer", "minimum": 0}
    ),
    "Limit": _query(
        "limit",
        "Page size: 1 to the server's page_size_max (SALIENCY_AUDIT_PAGE_SIZE_MAX, 100 by "
        "default).",
        {"type": "integer", "minimum": 1, "default": DEFAULT_PAGE},
    ),
    "Offset": _query("offset", "Items to skip.", {"type": "integer", "minimum": 0, "default": 0}),
    "Cascade": _query(
        "cascade",
        "true: delete the finished audits that used it too (reports included); false: they "
        "stay, with it as a tombstone (metadata kept, files removed).",
        {"type": "string", "enum": ["true", "false"], "default": "false"},
    ),
    "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Makes a retried submission safe: the same key with the same body "
        "answers the same audit (with Idempotent-Replayed: true); the same key with another "
        "body is a 422 idempotency_key_reused.",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY},
    },
}

HEADERS: dict[str, Schema] = {
    "Location": {
        "description": "The resource's URL.",
        "schema": {"type": "string", "format": "uri-reference"},
    },
    "Retry-After": {
        "description": "Seconds to wait before polling (or retrying) again.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "Idempotent-Replayed": {
        "description": "Present when the Idempotency-Key matched an earlier submission.",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "ETag": {
        "description": "The file's sha256; send it back in If-None-Match for a 304.",
        "schema": {"type": "string"},
    },
    "Allow": {"description": "The methods the path serves.", "schema": {"type": "string"}},
}


def _header(name: str) -> Schema:
    return {"$ref": "#/components/headers/" + name}


def _json(schema: Schema, description: str, headers: list[str] | None = None) -> Schema:
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = {h: _header(h) for h in headers}
    return response


def _problem(
    description: str,
    status: int,
    codes: list[str],
    extra: dict[str, Schema] | None = None,
    headers: list[str] | None = None,
) -> Schema:
    """A problem response with the codes this route can answer for ``status`` (and the headers
    it can carry: a 503 always has Retry-After, an ``ApiError(retry_after_s=...)`` too).

    The schema is the ``Problem`` component narrowed by keywords beside its ``$ref`` (allowed in
    an OpenAPI 3.1 schema, where they apply together like ``allOf``): validators check the
    status and the codes, and client generators, which follow the ``$ref``, make every error of
    every operation one ``Problem`` type. (An ``allOf`` of ``Problem`` and ``status: {const}``
    is dropped by openapi-python-client: it cannot merge an integer with a literal.)"""
    schema: Schema = {
        **_ref("Problem"),
        "properties": {
            "status": {"const": status},
            "code": {"type": "string", "enum": codes},
            **(extra or {}),
        },
    }
    response: Schema = {
        "description": f"{description} (code: {', '.join(codes)})",
        "content": {PROBLEM_JSON: {"schema": schema}},
    }
    names = list(dict.fromkeys([*(["Retry-After"] if status == 503 else []), *(headers or [])]))
    if names:
        response["headers"] = {name: _header(name) for name in names}
    return response


RESPONSES: dict[str, Schema] = {
    "Unauthorized": _problem(
        "No valid 'Authorization: Bearer KEY'", 401, ["unauthenticated", "invalid_key"]
    ),
    "NotFound": _problem("No such resource for this tenant", 404, ["not_found"]),
    "MethodNotAllowed": {
        **_problem("The path does not serve this method", 405, ["method_not_allowed"]),
        "headers": {"Allow": _header("Allow")},
    },
    "InternalError": _problem("An unexpected error (logged)", 500, ["internal_error"]),
    "ServiceUnavailable": _problem(
        "The database is unreachable; retry after Retry-After", 503, ["database_unavailable"]
    ),
    "NotModified": {
        "description": "Not modified (If-None-Match matched the ETag).",
        "headers": {"ETag": _header("ETag")},
    },
}


def _common(*names: str) -> dict[str, Schema]:
    status = {
        "NotFound": "404",
        "Unauthorized": "401",
        "InternalError": "500",
        "ServiceUnavailable": "503",
        "NotModified": "304",
    }
    return {status[n]: {"$ref": "#/components/responses/" + n} for n in names}


# what the API edge refuses on every /v1/ route before its view runs
# (saliency_audit.service.api.common):
# control characters in a path or query parameter or a JSON string, an integer path parameter
# past its column, JSON nested too deep or with a key twice, a multipart part twice
EDGE_400 = ["invalid_characters", "out_of_range", "too_deep", "duplicate_key", "duplicate_part"]


def _with_edge_400(response: Schema | None) -> Schema:
    if response is None:
        return _problem("A parameter or the body is refused at the edge", 400, EDGE_400)
    codes = response["content"][PROBLEM_JSON]["schema"]["properties"]["code"]["enum"]
    return _problem(
        response["description"].split(" (code: ")[0] + ", or refused at the edge",
        400,
        _codes(codes, EDGE_400),
    )


RATE_LIMITED_EXTRA: dict[str, Schema] = {
    "limit_per_s": {"type": "number", "description": "The tenant's sustained request rate."},
    "burst": {"type": "integer", "description": "Requests a tenant may send at once."},
}


def _with_rate_limit_429(response: Schema | None) -> Schema:
    """Every /v1/ route is behind the tenant's request rate limit
    (saliency_audit.service.quotas)."""
    codes = ["rate_limited"]
    description = "Too many requests from this tenant; retry after Retry-After"
    if response is not None:
        codes = _codes(
            response["content"][PROBLEM_JSON]["schema"]["properties"]["code"]["enum"], codes
        )
        description = response["description"].split(" (code: ")[0] + ", or " + description
    return _problem(description, 429, codes, RATE_LIMITED_EXTRA, headers=["Retry-After"])


def _v1(responses: dict[str, Schema]) -> dict[str, Schema]:
    """Every /v1/ route authenticates against the database: 401, 500 and 503 apply, the edge's
    400s, and the tenant's rate limit (429)."""
    responses = {
        **responses,
        "400": _with_edge_400(responses.get("400")),
        "429": _with_rate_limit_429(responses.get("429")),
    }
    return dict(
        sorted(
            {**_common("Unauthorized", "InternalError", "ServiceUnavailable"), **responses}.items()
        )
    )


def _param(name: str) -> Schema:
    return {"$ref": "#/components/parameters/" + name}


_PAGE_400 = _problem("limit or offset out of range or not an integer", 400, ["invalid_pagination"])
_CONFLICT_FIELDS: dict[str, Schema] = {
    "audits": {"type": "array", "items": {"type": "string"}, "description": "The audit ids."}
}
_NOT_SUCCEEDED = _problem(
    "The audit has not succeeded (yet)",
    409,
    ["audit_not_succeeded"],
    {"state": {"$ref": SCHEMAS + "AuditState"}},
)
_DOCUMENT_409 = _problem(
    "The audit has not succeeded (yet), or it has and its reports are still being rendered "
    f"(report_rendering, with Retry-After: {RETRY_AFTER_S})",
    409,
    ["audit_not_succeeded", "report_rendering"],
    {
        "state": {
            "$ref": SCHEMAS + "AuditState",
            "description": "audit_not_succeeded: the audit's state.",
        },
        "documents_state": {
            **_nullable("string"),
            "description": "report_rendering: the audit's documents_state.",
        },
    },
    headers=["Retry-After"],
)
_DOCUMENT_500 = _problem(
    "Rendering the reports failed (the audit's documents_state is failed), the stored file is "
    "missing, or an unexpected error",
    500,
    ["report_render_failed", "artifact_missing", "internal_error"],
)


# What the upload checks of :mod:`saliency_audit.service.uploads` refuse (besides the route's own
# checks):
# status -> codes, for a model file and for a dataset archive.
MODEL_REJECTIONS: dict[int, list[str]] = {
    413: ["file_too_large"],
    415: ["unsupported_format"],
    422: [
        "architecture_required",
        "empty_file",
        "invalid_onnx",
        "not_a_classifier",
        "output_required",
        "unknown_output",
        "invalid_safetensors",
        "invalid_torch_file",
        "onnx_external_data",
        "unknown_architecture",
        "unsafe_pickle",
        "unsupported_pickle",
    ],
}
DATASET_REJECTIONS: dict[int, list[str]] = {
    413: ["archive_too_large", "too_many_images"],
    415: ["unsupported_format"],
    422: [
        "corrupt_archive",
        "decompression_bomb",
        "duplicate_member",
        "empty_file",
        "encrypted_member",
        "image_too_large",
        "invalid_boxes",
        "invalid_image",
        "invalid_layout",
        "invalid_mask",
        "link_member",
        "nested_archive",
        "no_images",
        "special_member",
        "too_deep",
        "unexpected_member",
        "unknown_image",
        "unsafe_path",
    ],
}
# what the routes themselves refuse before or around those checks
MODEL_ROUTE_422 = [
    "unknown_fields",
    "invalid_metadata",
    "invalid_input_spec",
    "architecture_not_used",
    "empty_file",
    "invalid_name",
]
DATASET_ROUTE_422 = ["unknown_fields", "invalid_metadata", "empty_file", "invalid_name"]
UPLOAD_EXTRA: dict[str, Schema] = {
    "limit_bytes": {"type": "integer", "description": "payload_too_large: the file limit."},
    "size": {"type": "integer", "description": "file_too_large: the file's size."},
    "limit": {"type": "integer", "description": "file_too_large: the limit."},
    "member": {"type": "string", "description": "The offending archive member."},
    "architecture": {"type": "string", "description": "unknown_architecture: the name."},
    "suggestions": {
        "type": "array",
        "items": {"type": "string"},
        "description": "unknown_architecture: close torchvision names (none for timm:NAME).",
    },
}


def _codes(*groups: list[str]) -> list[str]:
    return list(dict.fromkeys(code for group in groups for code in group))


def _upload_operation(
    kind: str,
    schema: str,
    form: str,
    route_422: list[str],
    rejections: dict[int, list[str]],
    description: str,
    tag: str,
) -> Schema:
    return {
        "tags": [tag],
        "operationId": f"upload_{kind}",
        "summary": f"Upload a {kind}",
        "description": description,
        "security": SECURITY,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": _ref(form),
                    "encoding": {"metadata": {"contentType": "application/json"}},
                }
            },
        },
        "responses": _v1(
            {
                "201": _json(_ref(schema), f"The {kind} was stored.", ["Location"]),
                "200": _json(
                    _ref(schema),
                    f"This tenant already has a {kind} with the same bytes (sha256): that "
                    f"{kind} is answered and nothing is stored.",
                    ["Location"],
                ),
                "400": _problem(
                    "No 'file' part, or a 'metadata' part that is not a JSON object",
                    400,
                    ["missing_file", "invalid_metadata", "bad_request"],
                ),
                "413": _problem(
                    "The file, the metadata part or the whole request is over its limit",
                    413,
                    _codes(["payload_too_large", "metadata_too_large"], rejections[413]),
                    UPLOAD_EXTRA,
                ),
                "415": _problem(
                    f"The {kind} file's format is not recognized",
                    415,
                    rejections[415],
                    UPLOAD_EXTRA,
                ),
                "422": _problem(
                    f"The metadata or the {kind} file is refused",
                    422,
                    _codes(route_422, rejections[422]),
                    UPLOAD_EXTRA,
                ),
                "507": _problem(
                    f"Storing the {kind} would take the tenant past its stored-bytes quota",
                    507,
                    ["storage_quota_exceeded"],
                    {
                        "used_bytes": {"type": "integer"},
                        "limit_bytes": {"type": "integer"},
                        "upload_bytes": {"type": "integer"},
                    },
                ),
            }
        ),
    }


def _webhook_callback() -> Schema:
    """The POST an audit's ``webhook_url`` receives when the audit ends
    (saliency_audit.service.webhooks)."""
    return {
        "{$request.body#/webhook_url}": {
            "post": {
                "operationId": "audit_finished",
                "summary": "The audit ended: succeeded, failed or canceled",
                "description": "Sent once the audit is final (Content-Type: application/json, "
                "User-Agent: saliency-audit-webhook; redirects are not followed). "
                f"{SIGNATURE_HEADER}: t=<unix seconds>,v1=<hex> where hex is "
                'HMAC-SHA256(secret, "<t>.<raw body>"), the secret being the tenant\'s '
                "webhook secret ('saliency-audit keys webhook-secret --tenant NAME'). A "
                "receiver recomputes the HMAC over the raw body bytes, compares in constant "
                "time and rejects an old t (saliency_audit.service.webhooks.verify allows 300 s). "
                "Delivery "
                "is at least once: a non-2xx answer or a network error is retried with "
                "exponential backoff up to the server's webhook_max_attempts; deduplicate on "
                "delivery_id. The audit's `webhook` shows the state, attempts and last error.",
                "parameters": [
                    {
                        "name": SIGNATURE_HEADER,
                        "in": "header",
                        "required": True,
                        "description": "t=<unix seconds>,v1=<hex HMAC-SHA256 of "
                        '"<t>.<raw body>" with the tenant\'s webhook secret>.',
                        "schema": {"type": "string", "pattern": SIGNATURE_PATTERN},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("WebhookEvent")}},
                },
                "responses": {
                    "2XX": {"description": "Delivered: no further attempt."},
                    "default": {
                        "description": "Any other answer (or none): retried with backoff until "
                        "the attempts run out, then the audit's webhook.state is failed."
                    },
                },
            }
        }
    }


def _document_operation(kind: str, media: str, summary: str, description: str) -> Schema:
    """``report.pdf`` and ``report``: a document rendered after the audit succeeded."""
    return {
        "parameters": [_param("AuditId")],
        "get": {
            "tags": ["results"],
            "operationId": f"audit_report_{kind}",
            "summary": summary,
            "description": description + " Rendered on a CPU worker once the audit has "
            "succeeded: until then 409 audit_not_succeeded; while rendering 409 "
            "report_rendering with Retry-After (the audit's documents_state is pending); "
            "500 report_render_failed when rendering failed.",
            "security": SECURITY,
            "responses": _v1(
                {
                    "200": {
                        "description": f"The {kind.upper()} report (cacheable by ETag).",
                        "headers": {"ETag": _header("ETag")},
                        "content": {
                            media: {"schema": {"type": "string", "contentMediaType": media}}
                        },
                    },
                    **_common("NotModified", "NotFound"),
                    "409": _DOCUMENT_409,
                    "500": _DOCUMENT_500,
                }
            ),
        },
    }


def _paths() -> dict[str, Schema]:
    list_page = [_param("Limit"), _param("Offset")]
    audit_responses_headers = ["Location", "Retry-After", "Idempotent-Replayed"]
    return {
        "/healthz": {
            "get": {
                "tags": ["health"],
                "operationId": "healthz",
                "summary": "Liveness: the process is up",
                "description": "No dependency is checked; no authentication.",
                "responses": {
                    "200": _json(_ref("Health"), "Up."),
                    **_common("InternalError"),
                },
            }
        },
        "/readyz": {
            "get": {
                "tags": ["health"],
                "operationId": "readyz",
                "summary": "Readiness: the database and the broker are reachable",
                "description": "No authentication.",
                "responses": {
                    "200": _json(_ref("Ready"), "Ready."),
                    **_common("InternalError"),
                    "503": _problem(
                        "A dependency is unreachable",
                        503,
                        ["not_ready"],
                        {
                            "checks": {
                                "type": "object",
                                "properties": {
                                    "database": {"type": "string"},
                                    "broker": {"type": "string"},
                                },
                                "description": "'ok' or 'unreachable: <error type>' each.",
                            }
                        },
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "tags": ["health"],
                "operationId": "metrics",
                "summary": "Prometheus metrics (text exposition format 0.0.4)",
                "description": "Computed from the database and the broker at scrape time, so "
                "every API process answers the same numbers; aggregates across tenants only "
                "(no ids, no names): audits by state, the duration histogram of succeeded "
                "audits, attempts, queue depths, heartbeat age, busy workers and stale running "
                "audits. No authentication.",
                "responses": {
                    "200": {
                        "description": "The metrics (Content-Type: text/plain; version=0.0.4).",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_common("InternalError", "ServiceUnavailable"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "tags": ["discovery"],
                "operationId": "openapi",
                "summary": "This OpenAPI 3.1 document",
                "responses": {
                    "200": _json({"type": "object"}, "The document."),
                    **_common("InternalError"),
                },
            }
        },
        "/docs": {
            "get": {
                "tags": ["discovery"],
                "operationId": "docs",
                "summary": "This document as a self-contained HTML page",
                "responses": {
                    "200": {
                        "description": "The page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    **_common("InternalError"),
                },
            }
        },
        "/v1/methods": {
            "get": {
                "tags": ["discovery"],
                "operationId": "methods",
                "summary": "Saliency methods, tests, similarity measures, default policy",
                "security": SECURITY,
                "responses": _v1({"200": _json(_ref("Catalogue"), "The catalogue.")}),
            }
        },
        REPORT_SCHEMA_PATH: {
            "get": {
                "tags": ["discovery"],
                "operationId": "report_schema",
                "summary": "The JSON Schema of report.json",
                "description": "A JSON Schema (draft 2020-12) of GET "
                "/v1/audits/{audit_id}/report.json, versioned with the report's "
                f"schema_version (now {SCHEMA_VERSION}; the schema's $id names it): a client "
                "checks a report's schema_version and validates it against the schema of that "
                "version. Cacheable (public, an hour).",
                "security": SECURITY,
                "responses": _v1(
                    {
                        "200": {
                            "description": "The schema.",
                            "content": {
                                "application/schema+json": {
                                    "schema": {
                                        "type": "object",
                                        "description": "A JSON Schema (draft 2020-12).",
                                        "properties": {
                                            "$schema": {
                                                "const": "https://json-schema.org/draft/"
                                                "2020-12/schema"
                                            },
                                            "$id": {"type": "string", "format": "uri"},
                                            "title": {"type": "string"},
                                        },
                                        "required": ["$schema", "$id"],
                                    }
                                }
                            },
                        }
                    }
                ),
            }
        },
        "/v1/models": {
            "post": _upload_operation(
                "model",
                "Model",
                "ModelUpload",
                MODEL_ROUTE_422,
                MODEL_REJECTIONS,
                "multipart/form-data with the binary part `file` (ONNX, safetensors or a "
                "torch.save zip) and the optional JSON part `metadata` (keys: "
                f"{', '.join(sorted(MODEL_METADATA_KEYS))}). The file is checked without "
                "executing anything and stored once per tenant by sha256.",
                "models",
            ),
            "get": {
                "tags": ["models"],
                "operationId": "list_models",
                "summary": "List models, newest first",
                "security": SECURITY,
                "parameters": list_page,
                "responses": _v1(
                    {"200": _json(_ref("ModelPage"), "A page of models."), "400": _PAGE_400}
                ),
            },
        },
        "/v1/models/{model_id}": {
            "parameters": [_param("ModelId")],
            "get": {
                "tags": ["models"],
                "operationId": "get_model",
                "summary": "Fetch a model",
                "security": SECURITY,
                "responses": _v1(
                    {"200": _json(_ref("Model"), "The model."), **_common("NotFound")}
                ),
            },
            "delete": {
                "tags": ["models"],
                "operationId": "delete_model",
                "summary": "Delete a model and its file",
                "description": "The file is removed unless another live model holds the same "
                "bytes. Refused while an audit of it is queued or running; finished audits keep "
                "their reports (the model stays as a tombstone) unless cascade=true.",
                "security": SECURITY,
                "parameters": [_param("Cascade")],
                "responses": _v1(
                    {
                        "204": {"description": "Deleted."},
                        "400": _problem("cascade is not true or false", 400, ["invalid_parameter"]),
                        **_common("NotFound"),
                        "409": _problem(
                            "Audits of this model are queued or running",
                            409,
                            ["model_in_use"],
                            _CONFLICT_FIELDS,
                        ),
                    }
                ),
            },
        },
        "/v1/models/{model_id}/audits": {
            "parameters": [_param("ModelId")],
            "get": {
                "tags": ["models"],
                "operationId": "model_audits",
                "summary": "A model's audit history: its audits, verdict trend and latest change",
                "description": "The model's audits, newest first (paginated); `trend`: per "
                "method, the verdicts of every succeeded audit, oldest to newest; "
                "`comparison`: each (method, test) verdict and mean of the last two succeeded "
                "audits (null with fewer than two).",
                "security": SECURITY,
                "parameters": list_page,
                "responses": _v1(
                    {
                        "200": _json(_ref("ModelHistory"), "The history."),
                        "400": _PAGE_400,
                        **_common("NotFound"),
                    }
                ),
            },
        },
        "/v1/datasets": {
            "post": _upload_operation(
                "dataset",
                "Dataset",
                "DatasetUpload",
                DATASET_ROUTE_422,
                DATASET_REJECTIONS,
                "multipart/form-data with the binary part `file` (a zip or tar archive) and "
                "the optional JSON part `metadata` (keys: "
                f"{', '.join(sorted(DATASET_METADATA_KEYS))}). Images at the archive's root "
                "make an audit set; one folder of images per class a labeled set; `masks/` "
                "and `boxes.json` add localization ground truth. Every member is checked "
                "before anything is stored.",
                "datasets",
            ),
            "get": {
                "tags": ["datasets"],
                "operationId": "list_datasets",
                "summary": "List datasets, newest first",
                "security": SECURITY,
                "parameters": list_page,
                "responses": _v1(
                    {"200": _json(_ref("DatasetPage"), "A page of datasets."), "400": _PAGE_400}
                ),
            },
        },
        "/v1/datasets/{dataset_id}": {
            "parameters": [_param("DatasetId")],
            "get": {
                "tags": ["datasets"],
                "operationId": "get_dataset",
                "summary": "Fetch a dataset with its image list",
                "security": SECURITY,
                "responses": _v1(
                    {"200": _json(_ref("DatasetDetail"), "The dataset."), **_common("NotFound")}
                ),
            },
            "delete": {
                "tags": ["datasets"],
                "operationId": "delete_dataset",
                "summary": "Delete a dataset and its images",
                "description": "Images and masks are removed unless another live dataset uses "
                "them. Refused while an audit using it is queued or running; finished audits "
                "keep their reports (the dataset stays as a tombstone) unless cascade=true.",
                "security": SECURITY,
                "parameters": [_param("Cascade")],
                "responses": _v1(
                    {
                        "204": {"description": "Deleted."},
                        "400": _problem("cascade is not true or false", 400, ["invalid_parameter"]),
                        **_common("NotFound"),
                        "409": _problem(
                            "Audits using this dataset are queued or running",
                            409,
                            ["dataset_in_use"],
                            _CONFLICT_FIELDS,
                        ),
                    }
                ),
            },
        },
        "/v1/audits": {
            "post": {
                "tags": ["audits"],
                "operationId": "submit_audit",
                "summary": "Submit an audit",
                "description": "Validated against the engine's own rules, stored, then "
                f"enqueued. Poll the Location every Retry-After ({RETRY_AFTER_S}) seconds, or "
                "give `webhook_url` to be called when the audit ends (the `auditFinished` "
                f"callback: a `WebhookEvent`, signed in {SIGNATURE_HEADER}).",
                "security": SECURITY,
                "parameters": [_param("IdempotencyKey")],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("AuditRequest")}},
                },
                "callbacks": {"auditFinished": _webhook_callback()},
                "responses": _v1(
                    {
                        "202": _json(
                            _ref("Audit"),
                            "Accepted: the audit is queued (or, replayed, not final yet).",
                            audit_responses_headers,
                        ),
                        "200": _json(
                            _ref("Audit"),
                            "A replayed Idempotency-Key whose audit is already final.",
                            audit_responses_headers,
                        ),
                        "400": _problem(
                            "The body is not a JSON object, or a bad Idempotency-Key",
                            400,
                            ["invalid_json", "invalid_idempotency_key", "bad_request"],
                        ),
                        "413": _problem(
                            "The body is over the JSON body limit (MAX_JSON_BYTES) or the "
                            "server's limit",
                            413,
                            ["body_too_large", "payload_too_large"],
                            {
                                "limit_bytes": {
                                    "type": "integer",
                                    "description": "body_too_large: the JSON body limit.",
                                }
                            },
                        ),
                        "415": _problem(
                            "Not Content-Type: application/json", 415, ["unsupported_media_type"]
                        ),
                        "429": _problem(
                            "The tenant has its limit of queued audits waiting",
                            429,
                            ["too_many_audits"],
                            {"queued": {"type": "integer"}, "limit": {"type": "integer"}},
                            headers=["Retry-After"],
                        ),
                        "422": _problem(
                            "The request is refused",
                            422,
                            [
                                "unknown_fields",
                                "invalid_field",
                                "invalid_policy",
                                "invalid_spec",
                                "unknown_model",
                                "unknown_dataset",
                                "unlabeled_training_set",
                                "training_set_required",
                                "invalid_webhook_url",
                                "idempotency_key_reused",
                                "audit_too_costly",
                                "model_not_loadable",
                            ],
                            {
                                "cause": {
                                    "type": "string",
                                    "description": "model_not_loadable: the worker's error "
                                    "code (unknown_architecture, architecture_unavailable, "
                                    "weights_mismatch, ...).",
                                },
                                "estimated_cost_s": {
                                    "type": "number",
                                    "description": "audit_too_costly: the audit's estimated "
                                    "worker time (docs/service.md, Limits).",
                                },
                                "estimate": {
                                    "type": "object",
                                    "description": "audit_too_costly: the prediction it "
                                    "comes from (as an audit's `estimate`).",
                                },
                                "limit_s": {
                                    "type": "number",
                                    "description": "audit_too_costly: the limit "
                                    "(MAX_AUDIT_COST_S).",
                                },
                                "audit_id": {
                                    "type": "string",
                                    "description": "idempotency_key_reused: the key's audit.",
                                },
                                "unknown": {
                                    "type": "array",
                                    "items": {"type": "string"},
                                    "description": "invalid_spec: the unknown method names.",
                                },
                            },
                        ),
                    }
                ),
            },
            "get": {
                "tags": ["audits"],
                "operationId": "list_audits",
                "summary": "List audits, newest first",
                "security": SECURITY,
                "parameters": [
                    *list_page,
                    _query("model_id", "Only the audits of this model."),
                    _query("state", "Only the audits in this state.", _ref("AuditState")),
                ],
                "responses": _v1(
                    {
                        "200": _json(_ref("AuditPage"), "A page of audits."),
                        "400": _problem(
                            "Bad pagination or state filter",
                            400,
                            ["invalid_pagination", "invalid_filter"],
                        ),
                    }
                ),
            },
        },
        "/v1/audits/{audit_id}": {
            "parameters": [_param("AuditId")],
            "get": {
                "tags": ["audits"],
                "operationId": "get_audit",
                "summary": "Fetch an audit (with its verdicts once it has succeeded)",
                "security": SECURITY,
                "responses": _v1(
                    {
                        "200": _json(
                            _ref("Audit"),
                            "The audit; Retry-After is set while it is not final.",
                            ["Retry-After"],
                        ),
                        **_common("NotFound"),
                    }
                ),
            },
            "delete": {
                "tags": ["audits"],
                "operationId": "cancel_audit",
                "summary": "Cancel an active audit, delete a final one",
                "description": "A queued audit is canceled at once; a running one stops at "
                "its next heartbeat. A succeeded, failed or canceled audit is deleted: its rows, "
                "reports and pictures (files another audit shares stay).",
                "security": SECURITY,
                "responses": _v1(
                    {
                        "200": _json(_ref("Audit"), "Canceled (it was queued)."),
                        "202": _json(
                            _ref("Audit"),
                            "Cancel requested (it is running): cancel_requested is true.",
                        ),
                        "204": {"description": "Deleted (it was final)."},
                        **_common("NotFound"),
                    }
                ),
            },
        },
        "/v1/audits/{audit_id}/report.json": {
            "parameters": [_param("AuditId")],
            "get": {
                "tags": ["results"],
                "operationId": "audit_report",
                "summary": "The full report of a succeeded audit",
                "security": SECURITY,
                "responses": _v1(
                    {
                        "200": {
                            **_json(
                                {
                                    "type": "object",
                                    "anyOf": [
                                        _ref(REPORT),
                                        {
                                            "type": "object",
                                            "description": "A report stored under an older "
                                            "schema_version: validate it against the schema "
                                            "of that version.",
                                            "properties": {
                                                "schema_version": {"not": {"const": SCHEMA_VERSION}}
                                            },
                                        },
                                    ],
                                    "description": "The engine's report, with what the "
                                    "service adds (audit_id, dataset, links, artifacts). Its "
                                    "JSON Schema (draft 2020-12) is served at "
                                    f"GET {REPORT_SCHEMA_PATH}, versioned with the "
                                    f"report's schema_version (now {SCHEMA_VERSION}: the "
                                    f"{REPORT} schema).",
                                },
                                "The report; validate it against GET "
                                f"{REPORT_SCHEMA_PATH} (the schema of its schema_version).",
                                ["ETag"],
                            ),
                            "links": {
                                "schema": {
                                    "operationId": "report_schema",
                                    "description": "The JSON Schema this report follows.",
                                }
                            },
                        },
                        **_common("NotModified", "NotFound"),
                        "409": _NOT_SUCCEEDED,
                        "500": _problem(
                            "The stored report is missing, or an unexpected error",
                            500,
                            ["report_missing", "internal_error"],
                        ),
                    }
                ),
            },
        },
        "/v1/audits/{audit_id}/report.pdf": _document_operation(
            "pdf",
            "application/pdf",
            "The PDF report of a succeeded audit",
            "Verdicts, scores and heatmaps, laid out for reading and printing.",
        ),
        "/v1/audits/{audit_id}/report": _document_operation(
            "html",
            "text/html",
            "The HTML report of a succeeded audit",
            "The same report as the PDF, as one self-contained HTML page.",
        ),
        "/v1/audits/{audit_id}/results": {
            "parameters": [_param("AuditId")],
            "get": {
                "tags": ["results"],
                "operationId": "audit_results",
                "summary": "Every score row of a succeeded audit",
                "security": SECURITY,
                "parameters": [
                    _query(k, f"Only rows with this {k}.")
                    for k in ("method", "test", "measure", "stage")
                ],
                "responses": _v1(
                    {
                        "200": _json(_ref("ResultList"), "The scores."),
                        **_common("NotFound"),
                        "409": _NOT_SUCCEEDED,
                    }
                ),
            },
        },
        "/v1/audits/{audit_id}/heatmaps": {
            "parameters": [_param("AuditId")],
            "get": {
                "tags": ["results"],
                "operationId": "audit_heatmaps",
                "summary": "The heatmap PNGs of a succeeded audit",
                "description": "The trained model's maps (test `model`, stage `trained`), "
                "the maps each test kept per stage, and the `layers` analysis' maps laid over "
                "their images (kind `overlay_png`).",
                "security": SECURITY,
                "parameters": [
                    _query(k, f"Only heatmaps with this {k}.")
                    for k in ("kind", "method", "test", "stage", "image")
                ],
                "responses": _v1(
                    {
                        "200": _json(_ref("HeatmapList"), "The heatmaps."),
                        **_common("NotFound"),
                        "409": _NOT_SUCCEEDED,
                    }
                ),
            },
        },
        "/v1/audits/{audit_id}/artifacts/{sha256}": {
            "parameters": [_param("AuditId"), _param("Sha256")],
            "get": {
                "tags": ["results"],
                "operationId": "audit_artifact",
                "summary": "A file the audit produced, by the sha256 report.json lists",
                "security": SECURITY,
                "responses": _v1(
                    {
                        "200": {
                            "description": "The file, with its media type (cacheable).",
                            "headers": {"ETag": _header("ETag")},
                            "content": {
                                "image/png": {"schema": {"type": "string"}},
                                "application/json": {"schema": {"type": "object"}},
                                "application/octet-stream": {"schema": {"type": "string"}},
                            },
                        },
                        **_common("NotModified", "NotFound"),
                        "500": _problem(
                            "The stored file is missing, or an unexpected error",
                            500,
                            ["artifact_missing", "internal_error"],
                        ),
                    }
                ),
            },
        },
        "/v1/audits/{audit_id}/heatmaps/{heatmap_id}.png": {
            "parameters": [_param("AuditId"), _param("HeatmapId")],
            "get": {
                "tags": ["results"],
                "operationId": "audit_heatmap_png",
                "summary": "One heatmap image",
                "security": SECURITY,
                "responses": _v1(
                    {
                        "200": {
                            "description": "The PNG (cacheable: immutable).",
                            "headers": {"ETag": _header("ETag")},
                            "content": {
                                "image/png": {
                                    "schema": {
                                        "type": "string",
                                        "contentMediaType": "image/png",
                                    }
                                }
                            },
                        },
                        **_common("NotModified", "NotFound"),
                        "500": _problem(
                            "The stored PNG is missing, or an unexpected error",
                            500,
                            ["artifact_missing", "internal_error"],
                        ),
                    }
                ),
            },
        },
    }


def _version() -> str:
    try:
        return metadata.version("saliency-audit")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


@cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": TITLE,
            "version": _version(),
            "description": DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "models", "description": "Classifiers to audit."},
            {"name": "datasets", "description": "Image sets to audit on (or train on)."},
            {"name": "audits", "description": "Audit jobs."},
            {"name": "results", "description": "What a succeeded audit produced."},
            {"name": "discovery", "description": "What the service offers."},
            {"name": "health", "description": "Probes."},
        ],
        "paths": _paths(),
        "components": {
            "schemas": {**_schemas(), **_report_schemas()},
            "parameters": PARAMETERS,
            "headers": HEADERS,
            "responses": RESPONSES,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: 'Authorization: Bearer sak_<prefix>_<secret>'.",
                }
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1.0 document (built once per process; a copy, safe to modify)."""
    return copy.deepcopy(_document())


# --- HTML -------------------------------------------------------------------------------------

METHOD_ORDER = ("get", "post", "put", "patch", "delete", "head", "options")
_REF_LINK = re.compile(r"&quot;#/components/schemas/([A-Za-z0-9_]+)&quot;")

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1100px;
padding:1rem 2rem;color:#1d232a;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #d0d7de;padding-bottom:.2rem;margin-top:2rem}
.op{border:1px solid #d0d7de;border-radius:6px;margin:1rem 0;padding:.6rem 1rem}
.method{display:inline-block;min-width:4.5rem;font-weight:700;text-transform:uppercase}
.get{color:#0969da}.post{color:#1a7f37}.delete{color:#cf222e}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.85rem}
pre{background:#f6f8fa;padding:.6rem;border-radius:4px;overflow-x:auto;white-space:pre-wrap}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #d0d7de;padding:.3rem .5rem;
text-align:left;vertical-align:top}.desc{white-space:pre-wrap}nav a{margin-right:.8rem}
"""


def operation_anchor(method: str, path: str) -> str:
    """The HTML id of an operation's section: ``op-get-v1-models-model_id``."""
    return "op-" + method + "-" + re.sub(r"[^A-Za-z0-9_]+", "-", path).strip("-")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _resolve(doc: dict[str, Any], node: Any) -> Any:
    """Follow a local ``$ref`` to a parameter, header or response (schemas stay as refs)."""
    while isinstance(node, dict) and isinstance(node.get("$ref"), str):
        ref: str = node["$ref"]
        if not ref.startswith("#/components/") or ref.startswith(SCHEMAS):
            return node
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part]
        node = target
    return node


def _json_block(value: Any) -> str:
    """Pretty JSON, escaped, with schema references turned into links to their sections."""
    text = _e(json.dumps(value, indent=2, ensure_ascii=False))
    return (
        "<pre>"
        + _REF_LINK.sub(
            lambda m: (
                f'<a href="#schema-{m.group(1)}">&quot;#/components/schemas/{m.group(1)}&quot;</a>'
            ),
            text,
        )
        + "</pre>"
    )


def _operation_html(
    doc: dict[str, Any], path: str, method: str, op: dict[str, Any], shared: list[Any]
) -> str:
    anchor = _e(operation_anchor(method, path))
    parts = [
        f'<div class="op" id="{anchor}">',
        f'<h3><span class="method {_e(method)}">{_e(method)}</span> <code>{_e(path)}</code></h3>',
        f"<p><strong>{_e(op.get('summary', ''))}</strong></p>",
    ]
    if op.get("description"):
        parts.append(f'<p class="desc">{_e(op["description"])}</p>')
    if op.get("security"):
        schemes = ", ".join(name for req in op["security"] for name in req)
        parts.append(
            f"<p>Authentication: <code>{_e(schemes)}</code> "
            "(<code>Authorization: Bearer KEY</code>)</p>"
        )
    params = [_resolve(doc, p) for p in [*shared, *op.get("parameters", [])]]
    if params:
        parts.append(
            "<h4>Parameters</h4><table><tr><th>name</th><th>in</th><th>required</th>"
            "<th>schema</th><th>description</th></tr>"
        )
        for p in params:
            parts.append(
                f"<tr><td><code>{_e(p['name'])}</code></td><td>{_e(p['in'])}</td>"
                f"<td>{'yes' if p.get('required') else 'no'}</td>"
                f"<td>{_json_block(p.get('schema', {}))}</td>"
                f"<td>{_e(p.get('description', ''))}</td></tr>"
            )
        parts.append("</table>")
    body = op.get("requestBody")
    if body:
        parts.append(f"<h4>Request body{' (required)' if body.get('required') else ''}</h4>")
        for media, content in body.get("content", {}).items():
            parts.append(f"<p><code>{_e(media)}</code></p>{_json_block(content)}")
    for name, callback in op.get("callbacks", {}).items():
        parts.append(f"<h4>Callback <code>{_e(name)}</code></h4>")
        for expression, item in callback.items():
            for cb_method in METHOD_ORDER:
                if cb_method in item:
                    cb = item[cb_method]
                    parts.append(
                        f'<p><span class="method {_e(cb_method)}">{_e(cb_method)}</span> '
                        f"<code>{_e(expression)}</code> {_e(cb.get('summary', ''))}</p>"
                    )
                    if cb.get("description"):
                        parts.append(f'<p class="desc">{_e(cb["description"])}</p>')
                    parts.append(
                        _json_block(
                            {
                                k: cb[k]
                                for k in ("parameters", "requestBody", "responses")
                                if k in cb
                            }
                        )
                    )
    parts.append("<h4>Responses</h4>")
    for status, response in op.get("responses", {}).items():
        response = _resolve(doc, response)
        parts.append(f"<p><strong>{_e(status)}</strong> {_e(response.get('description', ''))}</p>")
        headers = {name: _resolve(doc, h) for name, h in response.get("headers", {}).items()}
        if headers:
            parts.append(
                "<p>Headers: "
                + ", ".join(
                    f"<code>{_e(name)}</code> ({_e(h.get('description', ''))})"
                    for name, h in headers.items()
                )
                + "</p>"
            )
        for media, content in response.get("content", {}).items():
            parts.append(f"<p><code>{_e(media)}</code></p>{_json_block(content.get('schema'))}")
    parts.append("</div>")
    return "\n".join(parts)


@cache
def _docs_html() -> str:
    doc = _document()
    info = doc["info"]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(info['title'])} API {_e(info['version'])}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{_e(info['title'])} <small>{_e(info['version'])}</small></h1>",
        f'<p>OpenAPI {_e(doc["openapi"])}: <a href="/openapi.json">/openapi.json</a></p>',
        f'<div class="desc">{_e(info["description"])}</div>',
        "<nav><h2>Operations</h2><ul>",
    ]
    operations: list[tuple[str, str, dict[str, Any], list[Any]]] = []
    for path, item in doc["paths"].items():
        for method in METHOD_ORDER:
            if method in item:
                operations.append((path, method, item[method], item.get("parameters", [])))
    for path, method, op, _ in operations:
        out.append(
            f'<li><a href="#{_e(operation_anchor(method, path))}">{_e(method.upper())} '
            f"{_e(path)}</a> {_e(op.get('summary', ''))}</li>"
        )
    out.append("</ul></nav><h2>Endpoints</h2>")
    out.extend(_operation_html(doc, *entry) for entry in operations)
    out.append("<h2>Schemas</h2>")
    for name, schema in doc["components"]["schemas"].items():
        out.append(f'<h3 id="schema-{_e(name)}">{_e(name)}</h3>{_json_block(schema)}')
    out.append("<h2>Security</h2>")
    out.append(_json_block(doc["components"]["securitySchemes"]))
    out.append("</body></html>")
    return "\n".join(out)


def docs_html() -> str:
    """A self-contained HTML page rendered from :func:`openapi_document`."""
    return _docs_html()
