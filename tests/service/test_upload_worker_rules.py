"""Uploads refuse what the worker would refuse about an ONNX graph, with the worker's message:
two image inputs, an operator in a custom domain or one the converter lacks, an input whose
layout and size only an input spec can tell, an IR version ONNX Runtime cannot read, a head that
is not a classifier's. Both sides call :mod:`saliency_audit.workers.engine.onnx_rules`; each test
runs the
worker's loader on the same bytes and compares the messages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from saliency_audit.service.db import Database
from saliency_audit.service.uploads import DEFAULT_MAX_MODEL_BYTES, UploadRejected, inspect_model
from saliency_audit.workers.engine.errors import EngineError
from saliency_audit.workers.engine.models.loader import load_model
from tests.engine import onnx_exports
from tests.servers import Api, Server, assert_problem, new_key

SYMBOLIC_SPEC = {"layout": "NCHW", "channels": 3, "height": 8, "width": 8}


def classifier(
    middle: list[onnx.NodeProto] | None = None,
    *,
    input_shape: tuple[int | str, ...] = ("N", 3, 8, 8),
    domains: dict[str, int] | None = None,
) -> bytes:
    """Pool, flatten, a 4-class Gemm; ``middle`` nodes (reading ``p``, writing ``q``) between
    the pool and the flatten."""
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"], name="pool")]
    nodes += middle or [helper.make_node("Identity", ["p"], ["q"], name="same")]
    nodes += [
        helper.make_node("Flatten", ["q"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w"], ["y"], name="fc"),
    ]
    return onnx_exports.graph_model(
        nodes,
        initializers={"w": np.ones((3, 4), np.float32)},
        input_shape=input_shape,
        output_shape=("N", 4),
        domains=domains,
    )


def two_inputs() -> bytes:
    model = onnx.load_from_string(classifier())
    model.graph.input.append(helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, [1]))
    return model.SerializeToString()


def custom_domain_op() -> bytes:
    op = helper.make_node("Denoise", ["p"], ["q"], name="denoise", domain="com.acme")
    return classifier([op], domains={"com.acme": 1})


def unsupported_op() -> bytes:
    return classifier([helper.make_node("Hardmax", ["p"], ["q"], name="hardmax")])


def all_symbolic_input() -> bytes:
    return classifier(input_shape=("N", "C", "H", "W"))


def ir_version_14() -> bytes:
    model = onnx.load_from_string(classifier())
    model.ir_version = 14
    return model.SerializeToString()


def regression_head() -> bytes:
    return onnx_exports.graph_model(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "w"], ["y"]),
        ],
        initializers={"w": np.ones((3, 1), np.float32)},
    )


# (file, problem code)
REFUSED: dict[str, tuple[Callable[[], bytes], str]] = {
    "two image inputs": (two_inputs, "unsupported_inputs"),
    "custom-domain op": (custom_domain_op, "unsupported_operator"),
    "op without a converter": (unsupported_op, "unsupported_operator"),
    "all-symbolic input, no input spec": (all_symbolic_input, "input_spec_required"),
    "IR version 14": (ir_version_14, "unsupported_onnx_version"),
    "regression head": (regression_head, "not_a_classifier"),
}


def _worker_message(data: bytes, **overrides: Any) -> str:
    with pytest.raises(EngineError) as caught:
        load_model(data, input_spec_overrides=overrides or None)
    return caught.value.message


def _inspect(tmp_path: Path, data: bytes, **kw: Any) -> Any:
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    return inspect_model(
        path, path.name, architecture=None, max_bytes=DEFAULT_MAX_MODEL_BYTES, **kw
    )


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_upload_check_refuses_with_the_workers_message(case: str, tmp_path: Path) -> None:
    build, code = REFUSED[case]
    data = build()
    with pytest.raises(UploadRejected) as caught:
        _inspect(tmp_path, data)
    assert (caught.value.status, caught.value.code) == (422, code)
    assert caught.value.detail == _worker_message(data)


def test_the_worker_refuses_the_ir_version_before_onnx_runtime_does() -> None:
    assert _worker_message(ir_version_14()).startswith("ONNX IR version 14 is newer than")


def test_an_input_spec_states_what_a_symbolic_input_leaves_open(tmp_path: Path) -> None:
    data = all_symbolic_input()
    info = _inspect(tmp_path, data, input_spec=SYMBOLIC_SPEC)
    assert info.input_shape == ["N", "C", "H", "W"]
    assert load_model(data, input_spec_overrides=SYMBOLIC_SPEC).input_spec.height == 8


def test_an_unsupported_op_on_constants_only_is_left_to_the_worker(tmp_path: Path) -> None:
    """The worker folds nodes that compute constants without converting them; the upload
    only refuses ops on the image's path."""
    nodes = [
        helper.make_node("Hardmax", ["c"], ["c2"], name="on_constants"),
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["g"]),
        helper.make_node("Add", ["g", "c2"], ["y"]),
    ]
    data = onnx_exports.graph_model(
        nodes,
        initializers={"w": np.ones((3, 4), np.float32), "c": np.zeros((1, 4), np.float32)},
    )
    assert _inspect(tmp_path, data).num_classes == 4


def test_the_large_file_child_check_gets_the_input_spec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from saliency_audit.service.uploads import onnx_model

    monkeypatch.setattr(onnx_model, "ONNX_IN_PROCESS_MAX_BYTES", 0)
    data = all_symbolic_input()
    with pytest.raises(UploadRejected) as caught:
        _inspect(tmp_path, data)
    assert caught.value.detail == _worker_message(data)
    assert _inspect(tmp_path, data, input_spec=SYMBOLIC_SPEC).format == "onnx"


# ---- over HTTP ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(pg_server: Server, pg_database: Database) -> Api:
    return Api(pg_server.url, new_key(pg_database))


def _post(api: Api, data: bytes, metadata: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
    files: dict[str, Any] = {"file": ("m.onnx", data)}
    if metadata is not None:
        files["metadata"] = (None, json.dumps(metadata), "application/json")
    return api.post("/v1/models", files=files)


def test_the_api_answers_422_with_the_workers_message(api: Api) -> None:
    for case in sorted(REFUSED):
        build, code = REFUSED[case]
        data = build()
        refused = _post(api, data)
        assert_problem(refused, 422, code)
        assert refused.json()["detail"] == _worker_message(data), case


def test_the_api_accepts_a_symbolic_input_with_an_input_spec(api: Api) -> None:
    created = _post(api, all_symbolic_input(), {"input_spec": SYMBOLIC_SPEC})
    assert created.status_code == 201, created.text
