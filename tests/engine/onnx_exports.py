"""ONNX exports of test networks, cached on disk (tests import these; don't re-export by hand).

Exporting is the slow part of ONNX tests (seconds per torchvision model, tens of seconds with
the dynamo exporter), so every export is written to the suite's ``artifact_cache`` folder
(``tests/.cache``) under a name that encodes everything it depends on: architecture, weight
seed, exporter, opset, input size, batch axis and the torch version. A rerun reads the file.
Writes are atomic (temporary file, then rename) because several test processes may export
the same model at once.

Exporters:

* ``"legacy"``: ``torch.onnx.export(..., dynamo=False)``, the TorchScript exporter (opsets
  7-17 here). Folds BatchNorm into the preceding conv and deduplicates equal initializers
  through ``Identity`` nodes.
* ``"dynamo"``: ``torch.onnx.export(..., dynamo=True)`` (opset 18+), writes ``ReduceMean`` with
  axes as an input, ``Reshape(allowzero=1)`` and per-node ``name_scopes`` metadata.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

from .nets import small_cnn, torchvision_model

Exporter = Literal["legacy", "dynamo"]
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_module(
    model: nn.Module,
    example: torch.Tensor,
    *,
    exporter: Exporter,
    opset: int,
    dynamic_batch: bool = True,
    fold_batchnorm: bool = True,
) -> bytes:
    """Export ``model`` (in eval mode) on ``example`` and return the ONNX file's bytes.

    ``fold_batchnorm=False`` keeps BatchNormalization nodes (legacy: no constant folding;
    dynamo: no graph optimization), which is how files from other tools often look.
    """
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        if exporter == "legacy":
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                torch.onnx.export(
                    model,
                    (example,),
                    path,
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
                    if dynamic_batch
                    else None,
                    do_constant_folding=fold_batchnorm,
                )
                return path.read_bytes()
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic_batch else None,
            optimize=fold_batchnorm,
            verbose=False,
        )
        assert program is not None
        return program.model_proto.SerializeToString()


def cached(cache_dir: Path, key: str, build: Callable[[], bytes]) -> bytes:
    """The bytes stored under ``key`` in ``cache_dir``, built (and stored) on a miss."""
    path = cache_dir / f"{key}.onnx"
    if path.exists():
        return path.read_bytes()
    data = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like any build output
    os.replace(tmp, path)
    return data


def cache_key(*parts: object) -> str:
    """A cache file name from its parts, with the torch version (exports change with it)."""
    torch_version = torch.__version__.split("+")[0]
    return "-".join(str(p) for p in (*parts, f"torch{torch_version}"))


def export_torchvision(
    arch: str,
    *,
    cache_dir: Path,
    seed: int = 0,
    exporter: Exporter = "legacy",
    opset: int = 17,
    size: int = 64,
    dynamic_batch: bool = True,
    fold_batchnorm: bool = True,
) -> bytes:
    """ONNX bytes of ``tests.engine.nets.torchvision_model(arch, seed)`` at ``size`` x ``size``."""
    batch = "dyn" if dynamic_batch else "b1"
    parts: list[object] = [arch, f"seed{seed}", f"{exporter}{opset}", f"{size}px", batch]
    if not fold_batchnorm:
        parts.append("bnkeep")
    key = cache_key(*parts)

    def build() -> bytes:
        model = torchvision_model(arch, seed)
        example = torch.zeros(2 if dynamic_batch else 1, 3, size, size)
        return export_module(
            model,
            example,
            exporter=exporter,
            opset=opset,
            dynamic_batch=dynamic_batch,
            fold_batchnorm=fold_batchnorm,
        )

    return cached(cache_dir, key, build)


def export_small_cnn(
    *,
    cache_dir: Path,
    seed: int = 0,
    exporter: Exporter = "legacy",
    opset: int = 17,
    size: int = 16,
    dynamic_batch: bool = True,
    fold_batchnorm: bool = True,
) -> bytes:
    """ONNX bytes of ``tests.engine.nets.small_cnn(seed)`` (3 input channels, 5 classes)."""
    batch = "dyn" if dynamic_batch else "b1"
    folded = "bnfold" if fold_batchnorm else "bnkeep"
    key = cache_key("small_cnn", f"seed{seed}", f"{exporter}{opset}", f"{size}px", batch, folded)

    def build() -> bytes:
        example = torch.zeros(2 if dynamic_batch else 1, 3, size, size)
        return export_module(
            small_cnn(seed),
            example,
            exporter=exporter,
            opset=opset,
            dynamic_batch=dynamic_batch,
            fold_batchnorm=fold_batchnorm,
        )

    return cached(cache_dir, key, build)


class NHWCSmallCNN(nn.Module):
    """SmallCNN behind an NHWC input, as models exported from TensorFlow/Keras take images."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = small_cnn(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))


def export_nhwc_small_cnn(
    *,
    cache_dir: Path,
    seed: int = 0,
    exporter: Exporter = "legacy",
    opset: int = 17,
    size: int = 16,
) -> bytes:
    """ONNX bytes of :class:`NHWCSmallCNN`: input shape (batch, size, size, 3)."""
    key = cache_key("nhwc_small_cnn", f"seed{seed}", f"{exporter}{opset}", f"{size}px", "dyn")

    def build() -> bytes:
        example = torch.zeros(2, size, size, 3)
        return export_module(NHWCSmallCNN(seed), example, exporter=exporter, opset=opset)

    return cached(cache_dir, key, build)


def graph_model(
    nodes: list[onnx.NodeProto],
    *,
    initializers: dict[str, np.ndarray] | None = None,
    input_shape: tuple[int | str, ...] = ("N", 3, 8, 8),
    output_name: str = "y",
    output_shape: tuple[int | str, ...] | None = None,
    opset: int = 17,
    producer: str = "saliency-audit-tests",
    domains: dict[str, int] | None = None,
) -> bytes:
    """A hand-built ONNX model: one float input ``x`` of ``input_shape`` (str dims are
    symbolic), the given nodes and initializers, one float output (shape from inference unless
    ``output_shape`` is given). ``domains`` adds opset imports for custom operator domains."""
    graph = onnx.helper.make_graph(
        nodes,
        "test_graph",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(input_shape))],
        [onnx.helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, output_shape)],
        initializer=[
            onnx.numpy_helper.from_array(np.asarray(value), name)
            for name, value in (initializers or {}).items()
        ],
    )
    opsets = [onnx.helper.make_opsetid("", opset)]
    opsets += [onnx.helper.make_opsetid(d, v) for d, v in (domains or {}).items()]
    model = onnx.helper.make_model(graph, opset_imports=opsets, producer_name=producer)
    model.ir_version = min(model.ir_version, 10)  # what onnxruntime 1.2x reads
    if output_shape is None:
        model = onnx.shape_inference.infer_shapes(model)  # the checker wants the output's shape
    if not domains:
        onnx.checker.check_model(model)
    return model.SerializeToString()


class ClassTokenNet(nn.Module):
    """Patch tokens plus a learned class token, as vision transformers start.

    Exported with a fixed batch size, ``cls.expand(batch, ...)`` becomes a constant of that
    batch size that the tokens are concatenated with: the graph genuinely runs only that batch.
    """

    def __init__(self, seed: int = 0, dim: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patchify = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patchify(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(tokens[:, 0] + tokens.mean(dim=1))


def export_class_token_net(
    *,
    cache_dir: Path,
    seed: int = 0,
    exporter: Exporter = "legacy",
    opset: int = 17,
    size: int = 16,
    dynamic_batch: bool = False,
) -> bytes:
    """ONNX bytes of :class:`ClassTokenNet` (by default with batch size 1 baked in)."""
    batch = "dyn" if dynamic_batch else "b1"
    key = cache_key("class_token_net", f"seed{seed}", f"{exporter}{opset}", f"{size}px", batch)

    def build() -> bytes:
        example = torch.zeros(2 if dynamic_batch else 1, 3, size, size)
        return export_module(
            ClassTokenNet(seed).eval(),
            example,
            exporter=exporter,
            opset=opset,
            dynamic_batch=dynamic_batch,
        )

    return cached(cache_dir, key, build)


# ---- classifier heads and outputs (tests/engine/test_model_outputs.py) ------------------------


def append_head(
    data: bytes,
    ops: list[tuple[str, dict[str, object]]],
    *,
    output_name: str = "probs",
    output_type: int = onnx.TensorProto.FLOAT,
) -> bytes:
    """The model with ``ops`` applied one after the other to its (single) output, the last one
    becoming the graph's output ``output_name`` (of element type ``output_type``):
    ``[("Softmax", {"axis": 1})]`` gives a classifier that outputs probabilities. A
    ``Reshape`` takes its target as ``shape``."""
    model = onnx.load_from_string(data)
    (previous,) = [o.name for o in model.graph.output]
    for i, (op, attrs) in enumerate(ops):
        out = output_name if i == len(ops) - 1 else f"head_{i}_{op.lower()}"
        inputs = [previous]
        attrs = dict(attrs)
        if op == "Reshape":
            target = np.asarray(attrs.pop("shape"), dtype=np.int64)
            model.graph.initializer.append(onnx.numpy_helper.from_array(target, f"head_{i}_shape"))
            inputs.append(f"head_{i}_shape")
        model.graph.node.append(onnx.helper.make_node(op, inputs, [out], name=f"head_{i}", **attrs))
        previous = out
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(output_name, output_type, None))
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def add_outputs(
    data: bytes,
    tensors: list[tuple[str, int]],
    *,
    first: bool = True,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """The model with intermediate ``tensors`` (name, ONNX element type) listed as extra graph
    outputs, before its own output when ``first``; ``metadata`` adds metadata entries."""
    model = onnx.load_from_string(data)
    extra = [onnx.helper.make_tensor_value_info(name, dtype, None) for name, dtype in tensors]
    outputs = [*extra, *model.graph.output] if first else [*model.graph.output, *extra]
    outputs = [copy_value_info(v) for v in outputs]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    for key, value in (metadata or {}).items():
        onnx.helper.set_model_props(
            model, {**{p.key: p.value for p in model.metadata_props}, key: value}
        )
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model.SerializeToString()


class _GraphBuilder:
    """Nodes and initializers of a hand-written ONNX graph, with unique tensor names."""

    def __init__(self, prefix: str, seed: int) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}__{self._count}"

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        name = self.name(hint)
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str = "", **attrs: object) -> str:
        out = self.name(hint or op_type)
        self.nodes.append(onnx.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def weight(self, *shape: int, scale: float = 1.0) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        value = self.rng.normal(0.0, scale / np.sqrt(fan_in), size=shape).astype(np.float32)
        return self.const(value, "weight")

    def channel_affine(self, x: str, channels: int) -> str:
        """BatchNorm as tf2onnx leaves it after TensorFlow folded it: Mul and Add by (C, 1, 1)."""
        scale = self.rng.uniform(0.5, 1.5, size=(channels, 1, 1)).astype(np.float32)
        shift = self.rng.normal(0.0, 0.1, size=(channels, 1, 1)).astype(np.float32)
        y = self.op("Mul", [x, self.const(scale, "batchnorm/mul")], "batchnorm/mul_1")
        return self.op("Add", [y, self.const(shift, "batchnorm/sub")], "batchnorm/add_1")

    def batchnorm(self, x: str, channels: int) -> str:
        rng = self.rng
        params = [
            rng.uniform(0.5, 1.5, channels),  # gamma
            rng.normal(0.0, 0.1, channels),  # beta
            rng.normal(0.0, 0.1, channels),  # moving mean
            rng.uniform(0.5, 1.5, channels),  # moving variance
        ]
        names = [self.const(p.astype(np.float32), "batchnorm") for p in params]
        return self.op("BatchNormalization", [x, *names], "FusedBatchNormV3", epsilon=1e-3)

    def relu6(self, x: str) -> str:
        low = self.const(np.array(0.0, np.float32), "Relu6/min")
        high = self.const(np.array(6.0, np.float32), "Relu6/max")
        return self.op("Clip", [x, low, high], "Relu6")

    def same_pads(self, x: str, kernel: int, stride: int, spatial_axes: tuple[int, int]) -> str:
        """TF "same" padding computed from ``tf.shape(x)`` the way tf2onnx writes ``tf.pad``
        with non-constant paddings (its Pad handler, opset 11+): the (rank, 2) int32 paddings
        are cast to int64, transposed and flattened into ONNX's begins-then-ends order."""
        i32 = onnx.TensorProto.INT32
        shape = self.op("Cast", [self.op("Shape", [x])], "Shape__cast", to=i32)
        hw = self.op(
            "Slice",
            [
                shape,
                self.const(np.array([spatial_axes[0]], np.int64)),
                self.const(np.array([spatial_axes[1] + 1], np.int64)),
                self.const(np.array([0], np.int64)),
            ],
            "strided_slice",
        )
        hw_float = self.op("Cast", [hw], "Cast", to=onnx.TensorProto.FLOAT)
        steps = self.op("Div", [hw_float, self.const(np.array(float(stride), np.float32))])
        out = self.op("Cast", [self.op("Ceil", [steps])], "Cast_1", to=i32)
        span = self.op(
            "Mul",
            [
                self.op("Sub", [out, self.const(np.array(1, np.int32))]),
                self.const(np.array(stride, np.int32)),
            ],
        )
        total = self.op(
            "Max",
            [
                self.op(
                    "Sub", [self.op("Add", [span, self.const(np.array(kernel, np.int32))]), hw]
                ),
                self.const(np.array(0, np.int32)),
            ],
            "Maximum",
        )
        begin = self.op("Div", [total, self.const(np.array(2, np.int32))], "floordiv")
        end = self.op("Sub", [total, begin], "sub_1")
        axes = self.const(np.array([1], np.int64))
        pair = self.op(
            "Concat",
            [self.op("Unsqueeze", [begin, axes]), self.op("Unsqueeze", [end, axes])],
            "stack",
            axis=1,
        )
        zero_pair = self.const(np.zeros((1, 2), np.int32), "zeros")
        rows = (
            [zero_pair, zero_pair, pair] if spatial_axes[0] == 2 else [zero_pair, pair, zero_pair]
        )
        paddings = self.op("Concat", rows, "concat", axis=0)
        pads = self.op("Cast", [paddings], "Pad__cast", to=onnx.TensorProto.INT64)
        pads = self.op("Transpose", [pads], "Pad__transpose", perm=[1, 0])
        pads = self.op("Reshape", [pads, self.const(np.array([-1], np.int64))], "Pad__reshape")
        return self.op("Pad", [x, pads], "Pad", mode="constant")


TF2ONNX_INPUT = "input_1"
TF2ONNX_OUTPUT = "dense"


def tf2onnx_style_classifier(
    *,
    size: int = 32,
    channels: int = 8,
    num_classes: int = 5,
    seed: int = 0,
    batch: int | str = "unk__612",
) -> bytes:
    """A small classifier written the way tf2onnx exports a Keras MobileNet-style model.

    Built by hand (TensorFlow is not a dependency) from what tf2onnx emits (its
    ``onnx_opset/nn.py`` and ``tensor.py`` handlers, opset 13): an NHWC image input with a
    symbolic batch (``unk__612``) and a ``Transpose`` to NCHW; TF "same" padding computed from
    ``tf.shape`` and applied with ``Pad`` (twice, the second reading the shape of a tensor
    after the first, so its pads fold only once the first's are known); convolutions with
    ``auto_pad=SAME_UPPER`` and with explicit pads; a depthwise conv as ``Conv`` with
    ``group=C``; BatchNorm both as ``BatchNormalization`` and folded into ``Mul``/``Add`` by
    (C, 1, 1) constants; ``Relu6`` as ``Clip(0, 6)``; global pooling as ``ReduceMean`` over the
    NHWC spatial axes plus ``Squeeze``; a Keras ``Flatten`` whose ``Reshape`` target is
    ``[tf.shape(x)[0], -1]``; the dense layer as ``MatMul`` + ``Add``. No ``Softmax`` head.
    ``batch`` may be an int to fix the batch size.
    """
    g = _GraphBuilder("StatefulPartitionedCall/model", seed)
    c = channels
    x = TF2ONNX_INPUT
    # stem: tf.pad with computed "same" pads on the NHWC input, then a VALID stride-2 conv
    x = g.same_pads(x, kernel=3, stride=2, spatial_axes=(1, 2))
    x = g.op("Transpose", [x], "conv2d__6", perm=[0, 3, 1, 2])
    x = g.op("Conv", [x, g.weight(c, 3, 3, 3)], "conv2d/Conv2D", strides=[2, 2], pads=[0, 0, 0, 0])
    x = g.relu6(g.channel_affine(x, c))
    # depthwise 3x3, "same" resolved by the runtime (tf2onnx falls back to auto_pad)
    x = g.op(
        "Conv", [x, g.weight(c, 1, 3, 3)], "depthwise/depthwise", group=c, auto_pad="SAME_UPPER"
    )
    x = g.relu6(g.batchnorm(x, c))
    # stride-2 depthwise with computed pads on the NCHW tensor
    x = g.same_pads(x, kernel=3, stride=2, spatial_axes=(2, 3))
    x = g.op("Conv", [x, g.weight(c, 1, 3, 3)], "depthwise_1/depthwise", group=c, strides=[2, 2])
    x = g.relu6(g.channel_affine(x, c))
    # pointwise expansion with a bias
    bias = g.const(g.rng.normal(0.0, 0.1, 2 * c).astype(np.float32), "bias")
    x = g.op("Conv", [x, g.weight(2 * c, c, 1, 1), bias], "conv2d_1/Conv2D", pads=[0, 0, 0, 0])
    x = g.op("Relu", [x], "re_lu")
    # GlobalAveragePooling2D on NHWC: ReduceMean over axes 1, 2, then Squeeze
    x = g.op("Transpose", [x], "global_average_pooling2d__20", perm=[0, 2, 3, 1])
    x = g.op("ReduceMean", [x], "global_average_pooling2d/Mean", axes=[1, 2], keepdims=1)
    x = g.op("Squeeze", [x, g.const(np.array([1, 2], np.int64))], "Squeeze")
    # Flatten: tf.reshape(x, [tf.shape(x)[0], -1])
    shape = g.op("Cast", [g.op("Shape", [x])], "flatten/Shape__cast", to=onnx.TensorProto.INT32)
    first = g.op(
        "Slice",
        [shape, g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64))],
        "flatten/strided_slice",
    )
    target = g.op(
        "Concat", [first, g.const(np.array([-1], np.int32))], "flatten/Reshape/shape", axis=0
    )
    target = g.op("Cast", [target], "flatten/Reshape__cast", to=onnx.TensorProto.INT64)
    x = g.op("Reshape", [x, target], "flatten/Reshape")
    # Dense: MatMul + Add
    x = g.op("MatMul", [x, g.weight(2 * c, num_classes)], "dense/MatMul")
    logits = g.const(g.rng.normal(0.0, 0.1, num_classes).astype(np.float32), "dense/BiasAdd/bias")
    g.nodes.append(
        onnx.helper.make_node("Add", [x, logits], [TF2ONNX_OUTPUT], name="dense/BiasAdd")
    )
    graph = onnx.helper.make_graph(
        g.nodes,
        "tf2onnx",
        [
            onnx.helper.make_tensor_value_info(
                TF2ONNX_INPUT, onnx.TensorProto.FLOAT, [batch, size, size, 3]
            )
        ],
        [
            onnx.helper.make_tensor_value_info(
                TF2ONNX_OUTPUT, onnx.TensorProto.FLOAT, [batch, num_classes]
            )
        ],
        initializer=g.initializers,
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", 13)],
        producer_name="tf2onnx",
        producer_version="1.16.1 15c810",
    )
    model.ir_version = 8  # what tf2onnx writes at opset 13
    onnx.checker.check_model(model)
    return model.SerializeToString()


def copy_value_info(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    return copy


class RawBGRSmallCNN(nn.Module):
    """SmallCNN behind raw BGR pixels in [0, 255]: it converts them to the RGB, [0, 1],
    ImageNet-normalized input SmallCNN takes, as a model trained with OpenCV reads images."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = small_cnn(seed)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = torch.cat([x[:, 2:3], x[:, 1:2], x[:, 0:1]], dim=1) / 255.0
        return self.net((rgb - self.mean) / self.std)


def export_raw_bgr_small_cnn(*, cache_dir: Path, seed: int = 0, size: int = 16) -> bytes:
    """ONNX bytes of :class:`RawBGRSmallCNN` (legacy exporter, opset 17, dynamic batch)."""
    key = cache_key("raw_bgr_small_cnn", f"seed{seed}", "legacy17", f"{size}px", "dyn")

    def build() -> bytes:
        example = torch.zeros(2, 3, size, size)
        return export_module(RawBGRSmallCNN(seed), example, exporter="legacy", opset=17)

    return cached(cache_dir, key, build)


FOLDED_INPUT = "x"
FOLDED_OUTPUT = "logits"


def folded_batchnorm_classifier(
    *, size: int = 16, channels: int = 8, num_classes: int = 5, seed: int = 0
) -> bytes:
    """A classifier whose BatchNorms an exporter wrote as per-channel constant ``Mul``/``Add``,
    among multiplications and additions that are something else.

    Scale-and-shift layers: a conv (no bias) then ``Mul`` and ``Add`` by (C, 1, 1) constants; a
    conv with a bias then a lone ``Mul``; a pre-activation ``Mul`` and ``Add`` after a residual
    sum (no conv before it). Not scale-and-shift layers: the input normalization (per-channel
    constants on the image itself), SiLU's ``x * sigmoid(x)``, the residual ``Add``, a
    squeeze-and-excitation gate ``x * sigmoid(...)``, a scalar ``Mul`` by 0.5 and a per-channel
    "layer scale" ``Mul`` that no ``Add`` follows and no conv precedes. Opset 13, NCHW input
    ``x`` with a symbolic batch, output ``logits``.
    """
    g = _GraphBuilder("model", seed)
    c = channels
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
    x = g.op("Mul", [FOLDED_INPUT, g.const(1.0 / std, "normalize/scale")], "normalize/mul")
    x = g.op("Add", [x, g.const(-mean / std, "normalize/shift")], "normalize/add")
    x = g.op("Conv", [x, g.weight(c, 3, 3, 3)], "conv1", pads=[1, 1, 1, 1])
    x = g.channel_affine(x, c)
    x = g.op("Mul", [x, g.op("Sigmoid", [x], "silu/sigmoid")], "silu/mul")
    skip = x
    bias = g.const(g.rng.normal(0.0, 0.1, c).astype(np.float32), "conv2/bias")
    x = g.op("Conv", [x, g.weight(c, c, 3, 3), bias], "conv2", pads=[1, 1, 1, 1])
    scale = g.rng.uniform(0.5, 1.5, size=(c, 1, 1)).astype(np.float32)
    x = g.op("Mul", [x, g.const(scale, "bn2/scale")], "bn2/mul")
    x = g.op("Add", [x, skip], "residual")
    x = g.op("Relu", [g.channel_affine(x, c)], "relu")
    gate = g.op("GlobalAveragePool", [x], "se/pool")
    se_bias = g.const(np.zeros(c, np.float32), "se/bias")
    gate = g.op("Sigmoid", [g.op("Conv", [gate, g.weight(c, c, 1, 1), se_bias], "se/conv")])
    x = g.op("Mul", [x, gate], "se/mul")
    x = g.op("Mul", [x, g.const(np.array(0.5, np.float32), "half")], "half/mul")
    x = g.op("GlobalAveragePool", [x], "pool")
    layer_scale = g.rng.uniform(0.5, 1.5, size=(c, 1, 1)).astype(np.float32)
    x = g.op("Mul", [x, g.const(layer_scale, "layer_scale")], "layer_scale/mul")
    x = g.op("Flatten", [x], "flatten")
    head_bias = g.const(g.rng.normal(0.0, 0.1, num_classes).astype(np.float32), "head/bias")
    g.nodes.append(
        onnx.helper.make_node(
            "Gemm",
            [x, g.weight(num_classes, c), head_bias],
            [FOLDED_OUTPUT],
            name="head",
            transB=1,
        )
    )
    graph = onnx.helper.make_graph(
        g.nodes,
        "folded_batchnorm",
        [
            onnx.helper.make_tensor_value_info(
                FOLDED_INPUT, onnx.TensorProto.FLOAT, ["N", 3, size, size]
            )
        ],
        [
            onnx.helper.make_tensor_value_info(
                FOLDED_OUTPUT, onnx.TensorProto.FLOAT, ["N", num_classes]
            )
        ],
        initializer=g.initializers,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class PaddedCNN(nn.Module):
    """TF-style static "same" padding with ``nn.ZeroPad2d`` and ``x.view(x.size(0), -1)``, as
    lukemelas-style EfficientNet-Lite is written. Exported without a dynamic batch axis, the
    legacy exporter writes each ``ZeroPad2d``'s pads as a ``ConstantOfShape -> Concat ->
    Reshape -> Slice -> Transpose -> Reshape -> Cast`` subgraph and bakes batch 1 into the
    flatten's ``Reshape``."""

    def __init__(self, seed: int = 0, num_classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.act = nn.ReLU6()
        self.block = nn.Sequential(
            nn.ZeroPad2d(1),
            nn.Conv2d(8, 8, 3, groups=8),
            nn.ReLU6(),
            nn.Conv2d(8, 16, 1),
            nn.ReLU6(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0)
        x = self.block(self.act(self.stem(self.pad(x))))
        return self.fc(self.pool(x).view(batch, -1))


def export_padded_cnn(*, cache_dir: Path, seed: int = 0, size: int = 16) -> bytes:
    """ONNX bytes of :class:`PaddedCNN`, legacy exporter, opset 13, batch 1 baked in."""
    key = cache_key("padded_cnn", f"seed{seed}", "legacy13", f"{size}px", "b1")

    def build() -> bytes:
        example = torch.zeros(1, 3, size, size)
        return export_module(
            PaddedCNN(seed).eval(), example, exporter="legacy", opset=13, dynamic_batch=False
        )

    return cached(cache_dir, key, build)
