"""Hostile input at the API edge, against a real API process on PostgreSQL: NUL and control
characters, bidirectional overrides in names, JSON nested 1,000 deep or with a key twice,
multipart parts twice, integers past the database's columns. Each is a 4xx problem+json (never
a 500), and a refused upload leaves no file in the artifact store and no row.

The last test walks every operation of the served OpenAPI document with these classes of input
(the fuzz test beside schemathesis, which generates valid-looking input instead)."""

from __future__ import annotations

import json
import secrets
from typing import Any
from urllib.parse import quote

import pytest
import requests

from saliency_audit.service.config import Config
from saliency_audit.service.db import Database
from tests.security.test_hostile_uploads import row_counts, stored_files
from tests.servers import Api, Server, assert_problem, new_key
from tests.service.test_end_to_end import DIGITS_MODEL, digits_zip

BIG = [2**31, 2**63, 2**64, 10**40]
CONTROL = ["a\x00b", "\x00", "a\x01b", "a\x1fb", "a\x7fb"]
BIDI = ["model\u202egpj.exe", "a\u2066b", "a\u200fb", "a\u061cb"]


def deep(depth: int) -> str:
    """A JSON array nested ``depth`` levels (as text: the encoder itself would recurse)."""
    return "[" * depth + "]" * depth


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body written by hand: requests would escape a control character
    in a file name, and could not send a part twice under one name in this order."""
    boundary = "edge-" + secrets.token_hex(8)
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode(
            "utf-8", "surrogatepass"
        )
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def api(pg_server: Server, pg_database: Database) -> Api:
    return Api(pg_server.url, new_key(pg_database))


@pytest.fixture(scope="module")
def owned(api: Api) -> dict[str, str]:
    """A model, a dataset and a (queued) audit of the tenant: real ids for the paths."""
    model = api.upload_model(DIGITS_MODEL)
    dataset = api.upload_dataset(digits_zip(2))
    audit = api.post(
        "/v1/audits",
        json={"model_id": model["id"], "dataset_id": dataset["id"], "methods": ["gradient"]},
    )
    assert audit.status_code == 202, audit.text
    return {"model_id": model["id"], "dataset_id": dataset["id"], "audit_id": audit.json()["id"]}


# --- path and query parameters ----------------------------------------------------------------


@pytest.mark.parametrize("resource", ["models", "datasets", "audits"])
@pytest.mark.parametrize("value", CONTROL)
def test_a_control_character_in_an_id_is_400(api: Api, resource: str, value: str) -> None:
    assert_problem(api.get(f"/v1/{resource}/{quote(value)}"), 400, "invalid_characters")
    assert_problem(api.delete(f"/v1/{resource}/{quote(value)}"), 400, "invalid_characters")


@pytest.mark.parametrize("name", ["model_id", "state"])
def test_a_control_character_in_a_filter_is_400(api: Api, name: str) -> None:
    assert_problem(api.get("/v1/audits", params={name: "a\x00b"}), 400, "invalid_characters")


@pytest.mark.parametrize("key", ["method", "test", "measure", "stage"])
def test_a_control_character_in_a_results_filter_is_400(
    api: Api, owned: dict[str, str], key: str
) -> None:
    path = f"/v1/audits/{owned['audit_id']}"
    assert_problem(api.get(path + "/results", params={key: "\x00"}), 400, "invalid_characters")
    assert_problem(api.get(path + "/heatmaps", params={key: "\x00"}), 400, "invalid_characters")


@pytest.mark.parametrize("offset", [2**63 - 1, 2**63, 2**64, 10**40, -1])
def test_an_offset_past_bigint_is_400_on_every_list(
    api: Api, owned: dict[str, str], offset: int
) -> None:
    for path in (
        "/v1/models",
        "/v1/datasets",
        "/v1/audits",
        f"/v1/models/{owned['model_id']}/audits",
    ):
        assert_problem(api.get(path, params={"offset": offset}), 400, "invalid_pagination")
    # the largest offset accepted still answers (an empty page)
    page = api.get("/v1/models", params={"offset": 2**62, "limit": 1})
    assert page.status_code == 200, page.text
    assert page.json()["items"] == []


@pytest.mark.parametrize("heatmap_id", BIG)
def test_a_heatmap_id_past_the_column_is_400(
    api: Api, owned: dict[str, str], heatmap_id: int
) -> None:
    response = api.get(f"/v1/audits/{owned['audit_id']}/heatmaps/{heatmap_id}.png")
    assert_problem(response, 400, "out_of_range")
    assert_problem(api.get(f"/v1/audits/{owned['audit_id']}/heatmaps/1.png"), 404, "not_found")


# --- JSON bodies --------------------------------------------------------------------------------


def _audit(owned: dict[str, str], **changes: Any) -> dict[str, Any]:
    return {
        "model_id": owned["model_id"],
        "dataset_id": owned["dataset_id"],
        "methods": ["gradient"],
        **changes,
    }


@pytest.mark.parametrize("field", ["model_id", "dataset_id", "webhook_url"])
def test_a_control_character_in_a_json_string_is_400(
    api: Api, owned: dict[str, str], field: str
) -> None:
    body = _audit(owned, **{field: "a\x00b"})
    assert_problem(api.post("/v1/audits", json=body), 400, "invalid_characters")
    assert_problem(
        api.post("/v1/audits", json=_audit(owned, methods=["gradient\x00"])),
        400,
        "invalid_characters",
    )
    raw = json.dumps(_audit(owned))[:-1] + ', "a\\u0000": 1}'
    headers = {"Content-Type": "application/json"}
    assert_problem(api.post("/v1/audits", data=raw, headers=headers), 400, "invalid_characters")
    lone = json.dumps(_audit(owned, methods=["\ud800"]))
    assert_problem(api.post("/v1/audits", data=lone, headers=headers), 400, "invalid_characters")


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_json_nested_too_deep_is_400(api: Api, owned: dict[str, str], depth: int) -> None:
    raw = json.dumps(_audit(owned))[:-1] + ', "policy": ' + deep(depth) + "}"
    response = api.post("/v1/audits", data=raw, headers={"Content-Type": "application/json"})
    assert_problem(response, 400, "too_deep")


def test_a_duplicate_json_key_is_400(api: Api, owned: dict[str, str]) -> None:
    raw = json.dumps(_audit(owned))[:-1] + ', "methods": ["gradcam"]}'
    response = api.post("/v1/audits", data=raw, headers={"Content-Type": "application/json"})
    assert_problem(response, 400, "duplicate_key")


# --- uploads: names, metadata, parts, and nothing left in the store ----------------------------

MODEL = DIGITS_MODEL.read_bytes()


def _upload_cases() -> list[tuple[str, list[tuple[str, str | None, bytes]], int, str]]:
    dataset = digits_zip(2)
    cases: list[tuple[str, list[tuple[str, str | None, bytes]], int, str]] = []
    for endpoint, data, filename in (
        ("/v1/models", MODEL, "m.onnx"),
        ("/v1/datasets", dataset, "d.zip"),
    ):
        for bad in CONTROL[:2] + BIDI:
            # NUL and bidi in the file name and in metadata.name
            cases.append((endpoint, [("file", bad + filename, data)], 422, "invalid_name"))
            meta = json.dumps({"name": bad}).encode()
            code = "invalid_characters" if bad in CONTROL else "invalid_name"
            status = 400 if bad in CONTROL else 422
            cases.append(
                (endpoint, [("file", filename, data), ("metadata", None, meta)], status, code)
            )
        deep_meta = ('{"name": "x", "purpose": ' + deep(1000) + "}").encode()
        dup_meta = b'{"name": "a", "name": "b"}'
        cases += [
            (endpoint, [("file", filename, data), ("metadata", None, deep_meta)], 400, "too_deep"),
            (
                endpoint,
                [("file", filename, data), ("metadata", None, dup_meta)],
                400,
                "duplicate_key",
            ),
            (endpoint, [("file", filename, data), ("file", filename, data)], 400, "duplicate_part"),
            (
                endpoint,
                [("file", filename, data), ("metadata", None, b"{}"), ("metadata", None, b"{}")],
                400,
                "duplicate_part",
            ),
        ]
    return cases


UPLOAD_CASES = _upload_cases()


@pytest.mark.parametrize(
    ("endpoint", "parts", "status", "code"),
    UPLOAD_CASES,
    ids=[f"{e[4:]}-{c}-{i}" for i, (e, _, _, c) in enumerate(UPLOAD_CASES)],
)
def test_a_refused_upload_is_a_4xx_and_leaves_no_file_and_no_row(
    api: Api,
    pg_config: Config,
    pg_database: Database,
    endpoint: str,
    parts: list[tuple[str, str | None, bytes]],
    status: int,
    code: str,
) -> None:
    store = pg_config.resolved_artifact_dir
    files_before, rows_before = stored_files(store), row_counts(pg_database)
    body, headers = multipart(parts)
    assert_problem(api.post(endpoint, data=body, headers=headers), status, code)
    assert stored_files(store) == files_before
    assert row_counts(pg_database) == rows_before


# --- every operation of the document, with every class -----------------------------------------


def _variants(path: str, method: str, operation: dict[str, Any], doc: dict[str, Any]) -> list[Any]:
    """(path, params, request kwargs) per crafted request of one operation."""

    def resolve(param: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in param:
            resolved: dict[str, Any] = doc["components"]["parameters"][param["$ref"].split("/")[-1]]
            return resolved
        return param

    params = [
        resolve(p)
        for p in [*doc["paths"][path].get("parameters", []), *operation.get("parameters", [])]
    ]
    in_path = [p for p in params if p["in"] == "path"]
    in_query = [p for p in params if p["in"] == "query"]
    out: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    def crafted(param: dict[str, Any]) -> list[Any]:
        if param.get("schema", {}).get("type") == "integer":
            # a path id is an integer column's (2^31 is past it); limit and offset are bigint
            return [*(BIG if param["in"] == "path" else BIG[1:]), -1, "9" * 30]
        return CONTROL

    for param in in_path:
        for value in crafted(param):
            out.append((path.replace("{" + param["name"] + "}", quote(str(value))), {}, {}))
    for param in [*in_query, {"name": "unknown", "in": "query"}]:
        for value in crafted(param):
            out.append((path, {param["name"]: value}, {}))
    content = operation.get("requestBody", {}).get("content", {})
    headers = {"Content-Type": "application/json"}
    if "application/json" in content:
        for raw in (
            deep(1000),
            '{"model_id": "a", "model_id": "b"}',
            '{"model_id": "a\\u0000b", "dataset_id": "\\u0000", "methods": ["\\u0001"]}',
            '{"\\u0000": 1}',
            '{"methods": ["\\ud800"]}',
            '{"policy": ' + '{"a": ' * 100 + "1" + "}" * 100 + "}",
        ):
            out.append((path, {}, {"data": raw, "headers": headers}))
    if "multipart/form-data" in content:
        for parts in (
            [("file", "a\x00.onnx", MODEL)],
            [("file", "\u202eexe.onnx", MODEL)],
            [("file", "m.onnx", MODEL), ("file", "m.onnx", MODEL)],
            [("file", "m.onnx", MODEL), ("metadata", None, b'{"name": "\\u0000"}')],
            [("file", "m.onnx", MODEL), ("metadata", None, b'{"a": 1, "a": 2}')],
            [("file", "m.onnx", MODEL), ("metadata", None, deep(5000).encode())],
        ):
            body, multipart_headers = multipart(parts)
            out.append((path, {}, {"data": body, "headers": multipart_headers}))
    return out


def test_every_operation_answers_hostile_input_with_a_4xx_problem(
    api: Api, owned: dict[str, str], pg_config: Config
) -> None:
    doc = api.get("/openapi.json").json()
    real = {**owned, "sha256": "0" * 64, "heatmap_id": "1"}
    store = pg_config.resolved_artifact_dir
    files_before = stored_files(store)
    sent = 0
    operations = [
        (path, method, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "delete", "put", "patch")
    ]
    # deletions last: a refused request deletes nothing, but keep the ids alive regardless
    operations.sort(key=lambda o: o[1] == "delete")
    for path, method, operation in operations:
        for crafted_path, params, kwargs in _variants(path, method, operation, doc):
            url = crafted_path
            for name, value in real.items():
                url = url.replace("{" + name + "}", value)
            response: requests.Response = getattr(api, method)(url, params=params, **kwargs)
            sent += 1
            where = f"{method.upper()} {url} {params} {str(kwargs)[:120]}"
            assert response.status_code < 500, (where, response.text[:300])
            if response.status_code >= 400:
                assert response.headers["Content-Type"].startswith("application/problem+json"), (
                    where
                )
                assert response.json()["code"], where
            if url.startswith("/v1/"):
                # every crafted /v1/ request is refused, whatever the view would do with it
                assert response.status_code >= 400, (where, response.text[:300])
    assert sent > 200
    assert stored_files(store) == files_before
    assert api.get("/healthz").status_code == 200
