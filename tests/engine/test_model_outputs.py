"""The model's outputs are understood, not guessed (issue 14).

A softmax head is left out (maps explain scores, probabilities are the graph's own), a model
whose output is not [N, C >= 2] class scores is refused, a graph with several outputs needs
one named, and the input spec records where each of its fields came from.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from safetensors.torch import save as save_safetensors

from examples.sample_photos import write_sample_photos
from saliency_audit.service.cli import main
from saliency_audit.workers.engine.errors import (
    FidelityError,
    NotAClassifierError,
    OutputRequiredError,
    UnknownOutputError,
)
from saliency_audit.workers.engine.images import decode_image, preprocess
from saliency_audit.workers.engine.models.base import LoadedModel
from saliency_audit.workers.engine.models.fidelity import (
    check_fidelity,
    ensure_fidelity,
    ort_session,
)
from saliency_audit.workers.engine.models.loader import load_model
from saliency_audit.workers.engine.runner import run_audit
from saliency_audit.workers.engine.spec import IMAGENET_MEAN, IMAGENET_STD, AuditSpec, InputSpec
from tests.engine import onnx_exports
from tests.engine.nets import images, torchvision_model

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "reference"
FEATURES = "/Flatten_output_0"  # small_cnn's pooled features, [N, 16], input of the Gemm head


@pytest.fixture(scope="module")
def small_cnn_onnx(artifact_cache: Path) -> bytes:
    """SmallCNN (5 classes, 16 px) exported as is: its output is the logits."""
    return onnx_exports.export_small_cnn(cache_dir=artifact_cache)


def _ort(data: bytes, x: torch.Tensor, output: str | None = None) -> np.ndarray:
    session = ort_session(data)
    names = [output] if output else None
    return np.asarray(session.run(names, {session.get_inputs()[0].name: x.numpy()})[0])


def _audit(model: LoadedModel, x: torch.Tensor) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    spec = AuditSpec(methods=("gradient", "gradcam"), batch_size=4)
    result = run_audit(model, x, spec)
    return json.loads(json.dumps(result.to_dict())), result.maps


# ---- 1. Softmax / LogSoftmax heads ---------------------------------------------------------

HEADS = {
    "softmax": ([("Softmax", {"axis": 1})], "Softmax", "graph_output"),
    "log_softmax_then_identity": (
        [("LogSoftmax", {"axis": -1}), ("Identity", {})],
        "LogSoftmax",
        "exp_graph_output",
    ),
    # a 1x1-conv style head: scores [N, C, 1, 1], softmax over the channels, then flattened
    "reshape_softmax_flatten": (
        [("Reshape", {"shape": [0, 5, 1, 1]}), ("Softmax", {"axis": 1}), ("Flatten", {})],
        "Softmax",
        "graph_output",
    ),
}


@pytest.mark.parametrize("case", list(HEADS), ids=list(HEADS))
def test_a_softmax_head_is_left_out_and_probabilities_are_the_graphs_own(
    case: str, small_cnn_onnx: bytes
) -> None:
    ops, head, probabilities = HEADS[case]
    headed_file = onnx_exports.append_head(small_cnn_onnx, ops)
    plain, headed = load_model(small_cnn_onnx), load_model(headed_file)
    out = headed.output
    assert out is not None
    assert (out.name, out.head_removed, out.num_classes) == ("probs", head, 5)
    assert out.explained == "pre_softmax_scores" and out.to_dict()["probabilities"] == probabilities
    assert any("pre-softmax scores" in note for note in headed.notes)

    x = images(6, 16, seed=2)
    with torch.no_grad():  # the module returns the scores, not probabilities
        torch.testing.assert_close(headed.module(x), plain.module(x), rtol=0, atol=0)
    report, maps = _audit(headed, x)
    plain_report, plain_maps = _audit(plain, x)

    graph_output = _ort(headed_file, x)  # what the file computes: probabilities or log-probs
    own = graph_output if head == "Softmax" else np.exp(graph_output)
    for i, record in enumerate(report["images"]):
        assert record["predicted"] == int(own[i].argmax())
        assert record["probability"] == pytest.approx(float(own[i, record["target"]]), abs=1e-5)
    assert [r["target"] for r in report["images"]] == [r["target"] for r in plain_report["images"]]
    for name in ("gradient", "gradcam"):
        np.testing.assert_array_equal(maps[name], plain_maps[name])
    assert report["model"]["output"]["head_removed"] == head
    assert report["model"]["output"]["explained"] == "pre_softmax_scores"
    assert report["fidelity"]["passed"]


def test_a_model_that_outputs_probabilities_is_no_longer_softmaxed_twice(
    small_cnn_onnx: bytes,
) -> None:
    """Before: softmax of probabilities, at most e / (e + C - 1) = 0.405 for 5 classes."""
    confident = onnx.load_from_string(small_cnn_onnx)
    for tensor in confident.graph.initializer:
        if tensor.name == "classifier.weight":  # sharpen the logits
            array = onnx.numpy_helper.to_array(tensor) * 50
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    headed_file = onnx_exports.append_head(
        confident.SerializeToString(), [("Softmax", {"axis": -1})]
    )
    x = images(4, 16, seed=5)
    report, _ = _audit(load_model(headed_file), x)
    top = _ort(headed_file, x).max(axis=1)
    assert top.max() > 0.9
    np.testing.assert_allclose([r["probability"] for r in report["images"]], top, atol=1e-5)


def test_fidelity_compares_scores_with_the_pre_softmax_tensor_of_onnx_runtime(
    small_cnn_onnx: bytes,
) -> None:
    headed = load_model(onnx_exports.append_head(small_cnn_onnx, [("Softmax", {"axis": 1})]))
    plain = load_model(small_cnn_onnx)
    x = images(5, 16, seed=3)
    assert headed.output is not None and headed.output.scores == "logits"
    # like with like: the same score differences as the logits model, not probabilities
    headed_report = check_fidelity(headed, x, atol=1e-4)
    assert headed_report.max_abs_diff == check_fidelity(plain, x, atol=1e-4).max_abs_diff
    # a session without the scores among its outputs is replaced by one that lists them
    assert check_fidelity(headed, x, atol=1e-4, session=ort_session(headed.onnx_bytes)).passed
    # a score error that a saturated softmax would hide still fails
    with torch.no_grad():
        headed.module.get_submodule("classifier").bias[0] += 0.05
    with pytest.raises(FidelityError, match="differs from ONNX Runtime"):
        ensure_fidelity(headed, x, atol=1e-3)


def test_a_softmax_that_is_not_over_the_classes_is_kept(small_cnn_onnx: bytes) -> None:
    """Softmax over the batch axis (opset 17 normalizes along axis 0): not a class head."""
    data = onnx_exports.append_head(small_cnn_onnx, [("Softmax", {"axis": 0})])
    loaded = load_model(data)
    assert loaded.output is not None and loaded.output.head_removed is None
    x = images(3, 16, seed=4)
    with torch.no_grad():
        np.testing.assert_allclose(loaded.module(x).numpy(), _ort(data, x), atol=1e-5)


# ---- 2. non-classifiers are refused --------------------------------------------------------


def _regression_onnx() -> bytes:
    """Global average pool and a linear layer to one value per image: [N, 1]."""
    return onnx_exports.graph_model(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "w", "b"], ["y"]),
        ],
        initializers={"w": np.ones((3, 1), np.float32), "b": np.zeros(1, np.float32)},
    )


def _map_onnx() -> bytes:
    """A 1x1 conv to 4 channels at full resolution: a [N, C, H, W] map, not class scores."""
    return onnx_exports.graph_model(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        initializers={"w": np.ones((4, 3, 1, 1), np.float32)},
    )


@pytest.mark.parametrize(
    ("build", "shape"),
    [(_regression_onnx, "[N, 1]"), (_map_onnx, "[N, 4, 8, 8]")],
    ids=["regression", "map"],
)
def test_a_model_without_class_scores_is_refused_at_load(build: Any, shape: str) -> None:
    with pytest.raises(NotAClassifierError) as caught:
        load_model(build())
    assert caught.value.code == "not_a_classifier"
    assert f"the output 'y' has shape {shape}" in caught.value.message
    assert "[N, C] with C >= 2" in caught.value.message


def test_a_torchvision_head_of_one_class_is_refused() -> None:
    state = torchvision_model("mobilenet_v3_small", num_classes=1).state_dict()
    data = save_safetensors({k: v.contiguous() for k, v in state.items()})
    with pytest.raises(NotAClassifierError, match=r"'classifier\.3' has shape \[N, 1\]"):
        load_model(data, architecture="mobilenet_v3_small")


def test_cli_run_prints_the_refusal_and_exits_with_the_error_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "regression.onnx"
    model.write_bytes(_regression_onnx())
    photos = tmp_path / "photos"
    write_sample_photos(photos)
    code = main(["run", "--model", str(model), "--images", str(photos), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: not an image classifier: the output 'y' has shape [N, 1]")
    assert "(not_a_classifier)" in err and "Traceback" not in err


# ---- 3. several outputs need one named -------------------------------------------------------


@pytest.fixture(scope="module")
def two_outputs(small_cnn_onnx: bytes) -> bytes:
    """SmallCNN with its pooled features [N, 16] listed as the first output, logits second."""
    return onnx_exports.add_outputs(small_cnn_onnx, [(FEATURES, onnx.TensorProto.FLOAT)])


def test_several_float_outputs_without_a_choice_are_refused_with_the_list(
    two_outputs: bytes,
) -> None:
    with pytest.raises(OutputRequiredError) as caught:
        load_model(two_outputs)
    message = caught.value.message
    assert caught.value.code == "output_required"
    assert f"0: '{FEATURES}' [N, 16]" in message and "1: 'logits' [N, 5]" in message
    assert '"output"' in message


@pytest.mark.parametrize("choice", ["logits", 1], ids=["by_name", "by_index"])
def test_the_chosen_output_is_used_for_conversion_fidelity_and_predictions(
    choice: str | int, two_outputs: bytes, small_cnn_onnx: bytes
) -> None:
    chosen = load_model(two_outputs, input_spec_overrides={"output": choice})
    assert chosen.output is not None and (chosen.output.name, chosen.output.index) == ("logits", 1)
    assert chosen.input_spec_sources["output"] == "given"
    x = images(4, 16, seed=6)
    report, maps = _audit(chosen, x)
    plain_report, plain_maps = _audit(load_model(small_cnn_onnx), x)
    assert report["fidelity"]["passed"]  # compared with ONNX Runtime's 'logits', not output 0
    assert report["images"] == plain_report["images"]
    np.testing.assert_array_equal(maps["gradient"], plain_maps["gradient"])
    assert any("auditing 'logits' (index 1, named in the input spec)" in n for n in chosen.notes)


def test_the_output_can_be_named_in_the_files_metadata(small_cnn_onnx: bytes) -> None:
    data = onnx_exports.add_outputs(
        small_cnn_onnx,
        [(FEATURES, onnx.TensorProto.FLOAT)],
        metadata={"saliency_audit.input_spec": json.dumps({"output": "logits"})},
    )
    loaded = load_model(data)
    assert loaded.output is not None and loaded.output.name == "logits"
    assert loaded.input_spec_sources["output"] == "metadata"


def test_an_output_that_does_not_exist_or_is_not_float_is_refused(
    two_outputs: bytes, small_cnn_onnx: bytes
) -> None:
    with pytest.raises(UnknownOutputError, match="'nope' is not an output of the graph"):
        load_model(two_outputs, input_spec_overrides={"output": "nope"})
    with pytest.raises(UnknownOutputError, match="is not an index from 0 to 1"):
        load_model(two_outputs, input_spec_overrides={"output": 2})
    labeled = onnx_exports.add_outputs(
        onnx_exports.append_head(
            small_cnn_onnx,
            [("ArgMax", {"axis": 1, "keepdims": 0})],
            output_name="label",
            output_type=onnx.TensorProto.INT64,
        ),
        [("logits", onnx.TensorProto.FLOAT)],
        first=False,
    )
    with pytest.raises(UnknownOutputError, match="is INT64, not float32 class scores"):
        load_model(labeled, input_spec_overrides={"output": 0})
    # an integer label output beside one float output is no candidate: no choice needed
    loaded = load_model(labeled)
    assert loaded.output is not None and loaded.output.name == "logits"


def test_cli_input_spec_names_the_output(
    two_outputs: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "two.onnx"
    model.write_bytes(two_outputs)
    photos = tmp_path / "photos"
    write_sample_photos(photos)
    run = ["run", "--model", str(model), "--images", str(photos), "--methods", "gradient"]
    run += ["--tests", "none", "--quiet"]
    assert main([*run, "--out", str(tmp_path / "a")]) == 2
    assert "(output_required)" in capsys.readouterr().err
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"output": "logits"}))
    assert main([*run, "--input-spec", str(spec), "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["model"]["output"]["name"] == "logits"
    assert report["model"]["input_spec"]["output"] == "logits"
    assert report["model"]["input_spec_sources"]["output"] == "given"


# ---- 4. the input spec, stated and where each field came from --------------------------------


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_bgr_reverses_the_channels_before_scaling_and_mean_std_are_in_bgr_order() -> None:
    pixels = np.zeros((2, 2, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 51)  # R, G, B
    spec = InputSpec(
        height=2,
        width=2,
        channel_order="BGR",
        value_range=(0.0, 255.0),
        mean=(50.0, 0.0, 100.0),  # B, G, R
        std=(1.0, 2.0, 5.0),
    )
    x = preprocess([decode_image(_png(pixels), "p.png")], spec)
    expected = torch.tensor([(51 - 50) / 1.0, (0 - 0) / 2.0, (255 - 100) / 5.0])
    torch.testing.assert_close(x[0, :, 0, 0], expected)


def test_channel_order_is_validated() -> None:
    from saliency_audit.workers.engine.errors import SpecError

    with pytest.raises(SpecError, match="channel_order must be RGB or BGR"):
        InputSpec(channel_order="GBR")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="BGR needs 3 channels"):
        InputSpec(channels=1, mean=(0.5,), std=(0.5,), channel_order="BGR")
    with pytest.raises(SpecError, match="output must be"):
        InputSpec(output=-1)
    spec = InputSpec(channel_order="BGR", output="logits")
    assert InputSpec.from_dict(spec.to_dict()) == spec


def test_raw_bgr_0_255_model_audits_like_the_normalized_rgb_one(
    artifact_cache: Path, small_cnn_onnx: bytes, tmp_path: Path
) -> None:
    """The same network behind raw BGR pixels in [0, 255]: stated as such, it predicts what
    the ImageNet-normalized RGB version predicts on the same photos, end to end."""
    photos = tmp_path / "photos"
    write_sample_photos(photos)
    decoded = [decode_image(p.read_bytes(), p.name) for p in sorted(photos.iterdir())]
    raw = load_model(
        onnx_exports.export_raw_bgr_small_cnn(cache_dir=artifact_cache),
        input_spec_overrides={
            "value_range": [0, 255],
            "channel_order": "BGR",
            "mean": [0, 0, 0],
            "std": [1, 1, 1],
        },
    )
    plain = load_model(small_cnn_onnx)  # RGB, [0, 1], ImageNet mean/std (assumed)
    x_raw, x_plain = preprocess(decoded, raw.input_spec), preprocess(decoded, plain.input_spec)
    assert float(x_raw.max()) > 200  # raw pixel values reach the model
    spec = AuditSpec(methods=("gradient",), batch_size=4)
    report = run_audit(raw, x_raw, spec).to_dict()
    reference = run_audit(plain, x_plain, spec).to_dict()
    assert report["fidelity"]["passed"]
    assert [r["predicted"] for r in report["images"]] == [
        r["predicted"] for r in reference["images"]
    ]
    np.testing.assert_allclose(
        [r["probability"] for r in report["images"]],
        [r["probability"] for r in reference["images"]],
        atol=1e-4,
    )
    sources = report["model"]["input_spec_sources"]
    assert {sources[k] for k in ("value_range", "channel_order", "mean", "std")} == {"given"}
    assert sources["height"] == sources["layout"] == "graph"
    assert not any("normalization assumed" in note for note in raw.notes)
    # read as RGB, the same file sees other inputs and predicts other probabilities
    wrong = load_model(
        onnx_exports.export_raw_bgr_small_cnn(cache_dir=artifact_cache),
        input_spec_overrides={"value_range": [0, 255], "mean": [0, 0, 0], "std": [1, 1, 1]},
    )
    with torch.no_grad():
        assert not torch.allclose(
            wrong.module(preprocess(decoded, wrong.input_spec)), raw.module(x_raw), atol=1e-3
        )


def test_sources_say_graph_metadata_given_or_assumed() -> None:
    digits = (REFERENCE / "digits_small_cnn.onnx").read_bytes()  # carries its input spec
    from_file = load_model(digits)
    assert from_file.input_spec_sources["mean"] == "metadata"
    assert from_file.input_spec_sources["channel_order"] == "assumed"
    assert from_file.input_spec_sources["output"] == "graph"
    assert not any("normalization assumed" in note for note in from_file.notes)
    given = load_model(digits, input_spec_overrides={"mean": [0.4], "std": [0.3]})
    assert given.input_spec.mean == (0.4,) and given.input_spec_sources["std"] == "given"
    assert given.input_spec_sources["height"] == "metadata"


def test_a_graph_without_a_spec_says_what_it_assumed(small_cnn_onnx: bytes) -> None:
    loaded = load_model(small_cnn_onnx)
    sources = loaded.input_spec_sources
    assert {sources[k] for k in ("height", "width", "channels", "layout")} == {"graph"}
    assert {sources[k] for k in ("mean", "std", "value_range", "channel_order")} == {"assumed"}
    assert loaded.input_spec.mean == IMAGENET_MEAN and loaded.input_spec.std == IMAGENET_STD
    assert any("normalization assumed" in note for note in loaded.notes)
    stated = load_model(small_cnn_onnx, input_spec_overrides={"mean": [0.5] * 3, "std": [0.25] * 3})
    assert not any("normalization assumed" in note for note in stated.notes)


def test_a_dynamic_size_graph_takes_the_given_size() -> None:
    data = onnx_exports.graph_model(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Flatten", ["p"], ["y"]),
        ],
        input_shape=("N", 3, "H", "W"),
    )
    loaded = load_model(data, input_spec_overrides={"height": 40, "width": 30})
    assert (loaded.input_spec.height, loaded.input_spec.width) == (40, 30)
    assert loaded.input_spec_sources["height"] == "given"
    assert loaded.input_spec_sources["channels"] == "graph"


def test_torchvision_sources_the_architecture_and_assumes_the_size() -> None:
    state = torchvision_model("mobilenet_v3_small", num_classes=3).state_dict()
    data = save_safetensors({k: v.contiguous() for k, v in state.items()})
    loaded = load_model(
        data, architecture="mobilenet_v3_small", input_spec_overrides={"height": 96}
    )
    sources = loaded.input_spec_sources
    assert [sources[k] for k in ("channels", "height", "width")] == ["graph", "given", "assumed"]
    assert sources["mean"] == "assumed" and any("normalization assumed" in n for n in loaded.notes)
    assert loaded.output is not None
    assert (loaded.output.name, loaded.output.num_classes) == ("classifier.3", 3)


def test_cli_run_prints_the_spec_used_with_sources_before_the_tables(
    small_cnn_onnx: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(onnx_exports.append_head(small_cnn_onnx, [("Softmax", {"axis": 1})]))
    photos = tmp_path / "photos"
    write_sample_photos(photos)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"value_range": [0, 255], "mean": [120, 115, 100], "std": [60] * 3}))
    args = ["run", "--model", str(model), "--images", str(photos), "--input-spec", str(spec)]
    code = main([*args, "--methods", "gradient", "--tests", "none", "--out", str(tmp_path / "o")])
    assert code == 0
    printed = capsys.readouterr().out
    lines = [line.strip() for line in printed.splitlines()]
    assert "size           16x16 (graph)" in lines
    assert "layout         NCHW, 3 channels (graph)" in lines
    assert "channel order  RGB (assumed)" in lines
    assert "value range    [0, 255] (given)" in lines
    assert "mean           [120, 115, 100] (given)" in lines
    assert "std            [60, 60, 60] (given)" in lines
    assert any(
        line.startswith("output         'probs' [N, 5]; its Softmax is left out") for line in lines
    )
    assert printed.index("input spec used") < printed.index("fidelity vs ONNX Runtime")


def test_a_head_that_is_not_the_softmax_of_the_scores_fails_the_fidelity_check(
    small_cnn_onnx: bytes,
) -> None:
    """If a head were misread, the probabilities reported would not be the graph's: refused."""
    loaded = load_model(onnx_exports.append_head(small_cnn_onnx, [("Softmax", {"axis": 1})]))
    assert loaded.output is not None
    # pretend the head were a LogSoftmax: the graph's output is not the log-softmax of 'logits'
    misread = dataclasses.replace(
        loaded, output=dataclasses.replace(loaded.output, head_removed="LogSoftmax")
    )
    with pytest.raises(FidelityError, match="is not the LogSoftmax over the classes of 'logits'"):
        check_fidelity(misread, images(3, 16, seed=7), atol=1e-3)
