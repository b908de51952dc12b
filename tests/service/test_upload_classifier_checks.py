"""Uploads refuse what the worker's loader would refuse about a model's outputs, with the
engine's own message: a model that is not a classifier, a graph with several float outputs
and none named, a named output that does not exist. The check reads the ONNX file's declared
(or inferred) output shapes with ``onnx`` only; the API answers problem+json 422.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from saliency_audit.service import uploads
from saliency_audit.service.db import Database
from saliency_audit.service.uploads import (
    DEFAULT_MAX_MODEL_BYTES,
    UploadRejected,
    inspect_model,
    onnx_model,
)
from saliency_audit.workers.engine.errors import EngineError
from saliency_audit.workers.engine.models.loader import load_model
from tests.engine import onnx_exports
from tests.servers import Api, Server, assert_problem, new_key
from tests.service.hostile import safetensors_file

FEATURES = "/Flatten_output_0"


@pytest.fixture(scope="module")
def small_cnn_onnx(artifact_cache: Path) -> bytes:
    return onnx_exports.export_small_cnn(cache_dir=artifact_cache)


@pytest.fixture(scope="module")
def two_outputs(small_cnn_onnx: bytes) -> bytes:
    """Pooled features [N, 16] listed first, logits [N, 5] second."""
    return onnx_exports.add_outputs(small_cnn_onnx, [(FEATURES, onnx.TensorProto.FLOAT)])


def regression_onnx() -> bytes:
    return onnx_exports.graph_model(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "w"], ["y"]),
        ],
        initializers={"w": np.ones((3, 1), np.float32)},
    )


def map_onnx() -> bytes:
    return onnx_exports.graph_model(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        initializers={"w": np.ones((4, 3, 1, 1), np.float32)},
    )


def _inspect(tmp_path: Path, data: bytes, **kw: Any) -> uploads.ModelInfo:
    path = tmp_path / kw.pop("filename", "model.onnx")
    path.write_bytes(data)
    kw.setdefault("architecture", None)
    return inspect_model(path, path.name, max_bytes=DEFAULT_MAX_MODEL_BYTES, **kw)


def _engine_message(data: bytes, **overrides: Any) -> str:
    with pytest.raises(EngineError) as caught:
        load_model(data, input_spec_overrides=overrides or None)
    return caught.value.message


@pytest.mark.parametrize("build", [regression_onnx, map_onnx], ids=["regression", "map"])
def test_a_model_without_class_scores_is_refused_with_the_engines_message(
    build: Any, tmp_path: Path
) -> None:
    data = build()
    with pytest.raises(UploadRejected) as caught:
        _inspect(tmp_path, data)
    assert (caught.value.status, caught.value.code) == (422, "not_a_classifier")
    assert caught.value.detail == _engine_message(data)


def test_an_output_declared_with_symbolic_dims_is_checked_by_shape_inference(
    tmp_path: Path,
) -> None:
    model = onnx.load_from_string(regression_onnx())
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "k"  # declared [N, k]
    with pytest.raises(UploadRejected) as caught:
        _inspect(tmp_path, model.SerializeToString())
    assert caught.value.code == "not_a_classifier" and "[N, 1]" in caught.value.detail


def test_several_float_outputs_need_one_named(two_outputs: bytes, tmp_path: Path) -> None:
    with pytest.raises(UploadRejected) as caught:
        _inspect(tmp_path, two_outputs)
    assert (caught.value.status, caught.value.code) == (422, "output_required")
    assert caught.value.detail == _engine_message(two_outputs)
    assert f"'{FEATURES}' [N, 16]" in caught.value.detail
    for choice in ("logits", 1):
        info = _inspect(tmp_path, two_outputs, output=choice)
        assert (info.output, info.output_shape, info.num_classes) == ("logits", ["batch", 5], 5)
    with pytest.raises(UploadRejected) as unknown:
        _inspect(tmp_path, two_outputs, output="nope")
    assert unknown.value.code == "unknown_output"
    assert unknown.value.detail == _engine_message(two_outputs, output="nope")


def test_the_files_own_metadata_can_name_the_output(small_cnn_onnx: bytes, tmp_path: Path) -> None:
    data = onnx_exports.add_outputs(
        small_cnn_onnx,
        [(FEATURES, onnx.TensorProto.FLOAT)],
        metadata={"saliency_audit.input_spec": json.dumps({"output": "logits"})},
    )
    assert _inspect(tmp_path, data).output == "logits"


def test_the_child_process_check_gets_the_output_choice(
    two_outputs: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_model, "ONNX_IN_PROCESS_MAX_BYTES", 0)
    assert _inspect(tmp_path, two_outputs, output="logits").output == "logits"
    with pytest.raises(UploadRejected) as caught:
        _inspect(tmp_path, two_outputs)
    assert caught.value.code == "output_required"


def test_weights_with_a_one_class_head_are_refused(tmp_path: Path) -> None:
    header = {
        "fc.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
        "fc.bias": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
    }
    data = safetensors_file(header, bytes(12))
    with pytest.raises(UploadRejected) as caught:
        _inspect(tmp_path, data, filename="w.safetensors", architecture="resnet18")
    assert caught.value.code == "not_a_classifier"
    assert "the output 'fc' has shape [N, 1]" in caught.value.detail


def test_a_classifier_passes_and_says_which_output(small_cnn_onnx: bytes, tmp_path: Path) -> None:
    info = _inspect(tmp_path, small_cnn_onnx)
    assert (info.output, info.num_classes) == ("logits", 5)
    headed = onnx_exports.append_head(small_cnn_onnx, [("Softmax", {"axis": 1})])
    assert _inspect(tmp_path, headed).output == "probs"


# ---- over HTTP ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(pg_server: Server, pg_database: Database) -> Api:
    return Api(pg_server.url, new_key(pg_database))


def _post(api: Api, data: bytes, metadata: dict[str, Any] | None = None, name: str = "m.onnx"):  # type: ignore[no-untyped-def]
    files: dict[str, Any] = {"file": (name, data)}
    if metadata is not None:
        files["metadata"] = (None, json.dumps(metadata), "application/json")
    return api.post("/v1/models", files=files)


def test_the_api_answers_422_with_the_engines_message(api: Api, two_outputs: bytes) -> None:
    data = regression_onnx()
    refused = _post(api, data)
    assert_problem(refused, 422, "not_a_classifier")
    assert refused.json()["detail"] == _engine_message(data)

    ambiguous = _post(api, two_outputs)
    assert_problem(ambiguous, 422, "output_required")
    assert ambiguous.json()["detail"] == _engine_message(two_outputs)
    assert_problem(_post(api, two_outputs, {"input_spec": {"output": "x"}}), 422, "unknown_output")

    created = _post(api, two_outputs, {"input_spec": {"output": "logits"}})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["input_spec"] == {"output": "logits"} and body["details"]["output"] == "logits"
    assert_problem(_post(api, two_outputs, {"input_spec": {"output": True}}), 422)


def test_the_api_refuses_an_output_for_a_weights_file(api: Api) -> None:
    header = {
        "fc.weight": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 24]},
        "fc.bias": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]},
    }
    refused = _post(
        api,
        safetensors_file(header, bytes(36)),
        {"architecture": "resnet18", "input_spec": {"output": 0}},
        name="w.safetensors",
    )
    assert_problem(refused, 422, "invalid_input_spec")
    assert "ONNX graph output" in refused.json()["detail"]
