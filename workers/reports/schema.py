"""The JSON Schema (draft 2020-12) of ``report.json``, published at ``/v1/schemas/report.json``.

Versioned with the document's ``schema_version`` (:data:`workers.engine.result.SCHEMA_VERSION`):
a client checks that number and validates against the schema of that version. Objects are
closed (``additionalProperties: false``) where the engine owns their keys, so a renamed field
fails validation instead of passing silently; ``details`` and ``spec`` stay open because tests
and methods add their own entries. The service adds ``audit_id``, ``created_at`` (when the
audit was submitted), ``dataset``, ``links`` and ``artifacts`` to what ``saliency-audit run``
writes; they are optional here. Torch-free: the API process serves it.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

from workers.engine.result import SCHEMA_VERSION
from workers.engine.spec import SPEC_SOURCES, InputSpec

Schema = dict[str, Any]
NUMBER_OR_NULL: Schema = {"type": ["number", "null"]}
STRING_OR_NULL: Schema = {"type": ["string", "null"]}
SHA256: Schema = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
VERDICT: Schema = {"enum": ["PASS", "FAIL", "INCONCLUSIVE"]}


def _closed(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


def _summary() -> Schema:
    return _closed(
        {
            "mean": NUMBER_OR_NULL,
            "std": NUMBER_OR_NULL,
            "n": {"type": "integer", "minimum": 0},
            "n_undefined": {"type": "integer", "minimum": 0},
        }
    )


@cache
def _schema() -> Schema:
    spec_fields = [f.name for f in dataclasses.fields(InputSpec)]
    score = _closed(
        {
            "method": {"type": "string"},
            "test": {"type": "string"},
            "stage": {"type": "string"},
            "stage_index": {"type": "integer", "minimum": 0},
            "measure": {"type": "string"},
            "mean": NUMBER_OR_NULL,
            "ci_low": NUMBER_OR_NULL,
            "ci_high": NUMBER_OR_NULL,
            "n": {"type": "integer", "minimum": 0},
            "n_undefined": {"type": "integer", "minimum": 0},
            "values": {"type": "array", "items": NUMBER_OR_NULL},
        }
    )
    verdict = _closed(
        {
            "method": {"type": "string"},
            "test": {"type": "string"},
            "verdict": VERDICT,
            "reason": {"type": "string"},
            "measure": STRING_OR_NULL,
            "stage": STRING_OR_NULL,
            "threshold": NUMBER_OR_NULL,
            "fail_threshold": NUMBER_OR_NULL,
            "pass_when": STRING_OR_NULL,
            "mean": NUMBER_OR_NULL,
            "ci_low": NUMBER_OR_NULL,
            "ci_high": NUMBER_OR_NULL,
            "n": {"type": "integer", "minimum": 0},
            "is_control": {"type": "boolean"},
            "policy_version": STRING_OR_NULL,
        }
    )
    statistics = {
        "anyOf": [
            _closed(
                {
                    "n_images": {"type": "integer"},
                    "height": {"type": "integer"},
                    "width": {"type": "integer"},
                    "native_channels": {"type": "integer"},
                    "mean": NUMBER_OR_NULL,
                    "std": NUMBER_OR_NULL,
                    "min": NUMBER_OR_NULL,
                    "max": NUMBER_OR_NULL,
                    "mean_abs": NUMBER_OR_NULL,
                    "fraction_positive": {"type": "number"},
                    "fraction_zero": {"type": "number"},
                    "top10_mass": NUMBER_OR_NULL,
                }
            ),
            {"type": "null"},
        ]
    }
    problem = _closed(
        {
            "method": {"type": "string"},
            "stage": {"type": "string"},
            "kind": {"enum": ["error", "non_finite", "all_zero", "constant", "not_conserved"]},
            "n_images": {"type": "integer", "minimum": 0},
            "n_total": {"type": "integer", "minimum": 0},
            "detail": {"type": "string"},
        }
    )
    conservation = {
        "anyOf": [
            _closed(
                {
                    "definition": {"type": "string"},
                    "mean": NUMBER_OR_NULL,
                    "min": NUMBER_OR_NULL,
                    "max": NUMBER_OR_NULL,
                    "n": {"type": "integer", "minimum": 0},
                    "tolerance": {"type": "number", "minimum": 0},
                    "within_tolerance": {"type": "boolean"},
                }
            ),
            {"type": "null"},
        ]
    }
    method = _closed(
        {
            "name": {"type": "string"},
            "family": {"type": "string"},
            "status": {"enum": ["ok", "not_applicable", "error", "degenerate", "not_conserved"]},
            "reference": {"type": "string"},
            "is_control": {"type": "boolean"},
            "layer": STRING_OR_NULL,
            "reason": STRING_OR_NULL,
            "family_time_s": NUMBER_OR_NULL,
            "shared_with": {"type": "array", "items": {"type": "string"}},
            "statistics": statistics,
            "similarity_to_sobel": {"type": "object", "additionalProperties": _summary()},
            "conservation": conservation,
            "problems": {"type": "array", "items": {"$ref": "#/$defs/problem"}},
        }
    )
    test = _closed(
        {
            "test": {"type": "string"},
            "description": {"type": "string"},
            "reference": {"type": "string"},
            "status": {"enum": ["ok", "not_run"]},
            "reason": STRING_OR_NULL,
            "granularity": STRING_OR_NULL,
            "stages": {
                "type": "array",
                "items": _closed(
                    {
                        "index": {"type": "integer"},
                        "name": {"type": "string"},
                        "randomized": {"type": "array", "items": {"type": "string"}},
                    }
                ),
            },
            "scores": {"type": "array", "items": {"$ref": "#/$defs/score"}},
            "details": {"type": "object"},
            "map_problems": {"type": "array", "items": {"$ref": "#/$defs/problem"}},
        }
    )
    image = _closed(
        {
            "name": {"type": "string"},
            "target": {"type": "integer", "minimum": 0},
            "target_name": STRING_OR_NULL,
            "predicted": {"type": "integer", "minimum": 0},
            "probability": {"type": "number", "minimum": 0, "maximum": 1},
        }
    )
    artifact = _closed(
        {
            "kind": {"enum": ["heatmap_png", "overlay_png"]},
            "method": {"type": "string"},
            "test": {"type": "string"},
            "stage": {"type": "string"},
            "image": {"type": "string"},
            "sha256": SHA256,
            "media_type": {"type": "string"},
            "url": {"type": "string"},
        }
    )
    engine_keys = {
        "schema_version": {"const": SCHEMA_VERSION},
        "verdicts": {"type": "array", "items": {"$ref": "#/$defs/verdict"}},
        "spec": {
            "type": "object",
            "required": ["methods", "seed", "tests", "measures", "resolved_layer"],
            "properties": {
                "methods": {"type": "array", "items": {"type": "string"}},
                "seed": {"type": "integer"},
                "tests": {"type": "array", "items": {"type": "string"}},
                "measures": {"type": "array", "items": {"type": "string"}},
                "resolved_layer": STRING_OR_NULL,
            },
        },
        "model": {
            "type": "object",
            "required": ["source", "sha256", "input_spec", "num_classes"],
            "properties": {
                "sha256": SHA256,
                "num_classes": {"type": "integer"},
                "input_spec": {
                    "type": "object",
                    "description": "The input spec used.",
                    "properties": {key: {} for key in spec_fields},
                    "additionalProperties": False,
                },
                "input_spec_sources": {
                    **_closed({key: {"enum": list(SPEC_SOURCES)} for key in spec_fields}),
                    "description": "Where each field of input_spec came from: graph (the "
                    "model file's graph or architecture), metadata (the ONNX metadata entry "
                    "saliency_audit.input_spec), given (the user's input spec) or assumed (a "
                    "default nobody stated).",
                },
                "output": {
                    "anyOf": [
                        {
                            **_closed(
                                {
                                    "name": {"type": "string"},
                                    "index": {"type": "integer", "minimum": 0},
                                    "shape": {
                                        "type": ["array", "null"],
                                        "items": {"type": ["integer", "null"]},
                                    },
                                    "num_classes": {"type": ["integer", "null"]},
                                    "head_removed": {"enum": ["Softmax", "LogSoftmax", None]},
                                    "scores": STRING_OR_NULL,
                                    "explained": {"enum": ["pre_softmax_scores", "output"]},
                                    "probabilities": {
                                        "enum": [
                                            "graph_output",
                                            "exp_graph_output",
                                            "softmax_of_output",
                                        ]
                                    },
                                }
                            ),
                            "description": "The model output explained: the graph output "
                            "(name, index, shape); head_removed, a Softmax or LogSoftmax the "
                            "graph ends in, left out so that saliency explains the pre-softmax "
                            "scores (the tensor named by scores, which the fidelity check "
                            "compares with ONNX Runtime); probabilities, how the reported "
                            "probabilities relate to the graph's output.",
                        },
                        {"type": "null"},
                    ]
                },
            },
        },
        "fidelity": {
            "anyOf": [
                {
                    "type": "object",
                    # optional: version 3 reports written before the relative tolerance lack
                    # rtol and max_rel_diff
                    "required": ["max_abs_diff", "atol", "argmax_agreement", "n_images"],
                    "properties": {
                        "max_abs_diff": {"type": "number"},
                        "max_rel_diff": {"type": "number"},
                        "atol": {"type": "number", "minimum": 0},
                        "rtol": {"type": "number", "minimum": 0},
                        "argmax_agreement": {"type": "number", "minimum": 0, "maximum": 1},
                        "n_images": {"type": "integer", "minimum": 1},
                        "provider": {"type": "string"},
                        "passed": {"type": "boolean"},
                    },
                },
                {"type": "null"},
            ]
        },
        "images": {"type": "array", "items": {"$ref": "#/$defs/image"}, "minItems": 1},
        "methods": {"type": "object", "additionalProperties": {"$ref": "#/$defs/method"}},
        "environment": {"type": "object", "additionalProperties": {"type": "string"}},
        "timings_s": {"type": "object", "additionalProperties": {"type": "number"}},
        "policy": {"type": ["object", "null"]},
        "tests": {"type": "object", "additionalProperties": {"$ref": "#/$defs/test"}},
    }
    service_keys = {
        "audit_id": {"type": "string"},
        "created_at": {"type": ["string", "null"], "format": "date-time"},
        "dataset": {
            "type": "object",
            "required": ["id", "sha256", "n_images"],
            "properties": {"sha256": SHA256, "n_images": {"type": "integer"}},
        },
        "links": {"type": "object", "additionalProperties": {"type": "string"}},
        "artifacts": {"type": "array", "items": {"$ref": "#/$defs/artifact"}},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://saliency-audit.dev/schemas/report/{SCHEMA_VERSION}.json",
        "title": f"saliency-audit report.json, schema_version {SCHEMA_VERSION}",
        "description": (
            "What one audit measured and decided: verdicts per (method, test) with the policy, "
            "every score per (method, test, stage, measure) with its per-image values, mean, "
            "95% bootstrap interval and n, the model and data fingerprints, the fidelity check "
            "of a converted ONNX graph, the environment, and (from the service) links to every "
            "artifact."
        ),
        "type": "object",
        "properties": {**engine_keys, **service_keys},
        "required": list(engine_keys),
        "additionalProperties": False,
        "$defs": {
            "score": score,
            "verdict": verdict,
            "method": method,
            "test": test,
            "image": image,
            "artifact": artifact,
            "problem": problem,
        },
    }


def report_schema() -> Schema:
    return _schema()
