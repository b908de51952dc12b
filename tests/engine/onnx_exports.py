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
