"""The torch-free ONNX rules (``saliency_audit.workers.engine.onnx_rules``) are the converter's and
ONNX
Runtime's own limits: the operator list is the converter's table, and the IR version and opset
ceilings are what the installed ONNX Runtime loads."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from saliency_audit.workers.engine import onnx_rules
from saliency_audit.workers.engine.errors import ModelLoadError
from saliency_audit.workers.engine.models.onnx_ops import CONVERTERS


def test_the_supported_operators_are_the_converters_table() -> None:
    assert set(CONVERTERS) == onnx_rules.SUPPORTED_OPERATORS


def _relu(ir_version: int, opset: int) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model.SerializeToString()


def _ort_loads(data: bytes) -> bool:
    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception:  # ORT's own exception types
        return False
    return True


@pytest.mark.parametrize(
    ("ir_version", "opset", "loads"),
    [
        (onnx_rules.MAX_IR_VERSION, 17, True),
        (onnx_rules.MAX_IR_VERSION + 1, 17, False),
        (10, onnx_rules.MAX_OPSET, True),
        (10, onnx_rules.MAX_OPSET + 1, False),
    ],
)
def test_the_version_ceilings_are_what_onnx_runtime_loads(
    ir_version: int, opset: int, loads: bool
) -> None:
    data = _relu(ir_version, opset)
    assert _ort_loads(data) is loads
    model = onnx.load_from_string(data)
    if loads:
        onnx_rules.check_versions(model)
    else:
        with pytest.raises(ModelLoadError):
            onnx_rules.check_versions(model)
