"""The JSON Schema (draft 2020-12) of ``report.json``, published at ``/v1/schemas/report.json``.

Generated from the contract's :class:`~saliency_audit.workers.engine.contract.report.ReportDocument`
(and the
result shapes it holds), so the schema and the document the engine writes have one
declaration. Versioned with the document's ``schema_version``
(:data:`saliency_audit.workers.engine.result.SCHEMA_VERSION`): a client checks that number and
validates
against the schema of that version. Objects are closed (``additionalProperties: false``) where
the engine owns their keys, so a renamed field fails validation instead of passing silently;
``details`` and ``spec`` stay open because tests and methods add their own entries. The
service adds ``audit_id``, ``created_at`` (when the audit was submitted), ``dataset``,
``links`` and ``artifacts`` to what ``saliency-audit run`` writes; they are optional here.
Torch-free: the API process serves it.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from saliency_audit.workers.engine.contract.report import SCHEMA_VERSION, ReportDocument
from saliency_audit.workers.engine.contract.schema import schema_of

Schema = dict[str, Any]
DEFS = "#/$defs/"


def _refs(node: Any, counts: dict[str, int]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(DEFS):
            counts[ref[len(DEFS) :]] = counts.get(ref[len(DEFS) :], 0) + 1
        for value in node.values():
            _refs(value, counts)
    elif isinstance(node, list):
        for value in node:
            _refs(value, counts)


def _replace(node: Any, name: str, definition: Schema) -> Any:
    if isinstance(node, dict):
        if node.get("$ref") == DEFS + name:
            return {**definition, **{k: v for k, v in node.items() if k != "$ref"}}
        return {k: _replace(v, name, definition) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace(v, name, definition) for v in node]
    return node


def inline_single_use(schema: Schema) -> Schema:
    """``schema`` with every ``$defs`` entry referenced once written in place (a reader sees a
    block where it is used); shapes used in several places stay shared definitions."""
    defs: dict[str, Schema] = dict(schema.get("$defs", {}))
    body = {k: v for k, v in schema.items() if k != "$defs"}
    while True:
        counts: dict[str, int] = {}
        _refs([body, defs], counts)
        once = [name for name in defs if counts.get(name) == 1]
        if not once:
            break
        name = once[0]
        definition = defs.pop(name)
        body = _replace(body, name, definition)
        defs = {k: _replace(v, name, definition) for k, v in defs.items()}
    return {**body, "$defs": defs} if defs else body


@cache
def _schema() -> str:
    generated = schema_of(ReportDocument, ref_template=DEFS + "{model}", mode="serialization")
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://saliency-audit.dev/schemas/report/{SCHEMA_VERSION}.json",
        "title": f"saliency-audit report.json, schema_version {SCHEMA_VERSION}",
        **inline_single_use(generated),
    }
    return json.dumps(schema)


def report_schema() -> Schema:
    """The schema, a fresh copy each call (callers may change theirs)."""
    value: Schema = json.loads(_schema())
    return value
