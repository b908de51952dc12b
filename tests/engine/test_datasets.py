"""The reference benchmark: procedural shapes, digits, splits, and the models in examples/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage
from sklearn.datasets import load_digits
from torch import nn

from saliency_audit.workers.engine import datasets
from saliency_audit.workers.engine.datasets import (
    MIN_OBJECT_CONTRAST,
    PIXEL_NOISE_MAX,
    SHAPE_CLASSES,
    ShapesDataset,
    load_digits_images,
    make_shapes,
    stratified_split,
)
from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.engine.reference_models import (
    BasicBlock,
    SmallResNet,
    build_reference_model,
)

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "examples" / "reference"
REFERENCE_MODELS = [
    f"{dataset}_{arch}.onnx"
    for dataset in ("shapes", "digits")
    for arch in ("small_cnn", "small_resnet")
]
HELD_OUT_SHAPES_SEED = 20_250_101  # never used for training (training uses --seed, default 0)
REQUIRED_ACCURACY = 0.95


@pytest.fixture(scope="module")
def shapes() -> ShapesDataset:
    return make_shapes(600, seed=3)


# --- shapes: determinism, arrays, balance ---------------------------------------------------------


def test_same_seed_gives_identical_arrays() -> None:
    a, b = make_shapes(200, seed=7), make_shapes(200, seed=7)
    for field in ("images", "labels", "masks", "boxes", "object_colours"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_different_seeds_give_different_images() -> None:
    a, b = make_shapes(200, seed=7), make_shapes(200, seed=8)
    assert not np.array_equal(a.labels, b.labels)
    # Not a shifted copy either: almost every image differs.
    assert np.mean(np.any(a.images != b.images, axis=(1, 2, 3))) > 0.99


def test_render_chunk_size_does_not_change_the_images(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = make_shapes(50, seed=11)
    monkeypatch.setattr(datasets, "_CHUNK_PIXELS", 7 * 32 * 32)  # 7 images at a time
    chunked = make_shapes(50, seed=11)
    np.testing.assert_array_equal(chunked.images, reference.images)
    np.testing.assert_array_equal(chunked.masks, reference.masks)


def test_arrays_have_documented_shapes_and_dtypes(shapes: ShapesDataset) -> None:
    n = 600
    assert len(shapes) == n
    assert shapes.images.shape == (n, 32, 32, 3) and shapes.images.dtype == np.uint8
    assert shapes.labels.shape == (n,) and shapes.labels.dtype == np.int64
    assert shapes.masks.shape == (n, 32, 32) and shapes.masks.dtype == np.bool_
    assert shapes.boxes.shape == (n, 4) and np.issubdtype(shapes.boxes.dtype, np.integer)
    assert shapes.object_colours.shape == (n, 3) and shapes.object_colours.dtype == np.uint8
    assert shapes.class_names == SHAPE_CLASSES


def test_classes_are_balanced_and_shuffled(shapes: ShapesDataset) -> None:
    counts = np.bincount(shapes.labels, minlength=len(SHAPE_CLASSES))
    assert counts.max() - counts.min() <= 1
    # Shuffled, not in blocks or cycles of one class.
    assert not np.array_equal(shapes.labels, np.sort(shapes.labels))
    assert not np.array_equal(shapes.labels[: len(SHAPE_CLASSES)], np.arange(len(SHAPE_CLASSES)))


def test_other_sizes_scale_the_object() -> None:
    small, big = make_shapes(60, seed=1, size=32), make_shapes(60, seed=1, size=96)
    assert big.images.shape == (60, 96, 96, 3)
    area_fraction_small = small.masks.mean(axis=(1, 2))
    area_fraction_big = big.masks.mean(axis=(1, 2))
    np.testing.assert_allclose(area_fraction_big, area_fraction_small, atol=0.03)


def test_class_subset_relabels_and_unknown_class_is_refused() -> None:
    subset = make_shapes(40, seed=0, classes=("square", "circle"))
    assert subset.class_names == ("square", "circle")
    assert set(np.unique(subset.labels)) == {0, 1}
    with pytest.raises(ValueError, match="classes"):
        make_shapes(10, seed=0, classes=("square", "hexagon"))
    with pytest.raises(ValueError, match="classes"):
        make_shapes(10, seed=0, classes=("square", "square"))


# --- shapes: the mask and the box are the drawn object --------------------------------------------


def _distance_to_object_colour(shapes: ShapesDataset) -> NDArray[np.float64]:
    diff = shapes.images.astype(np.float64) - shapes.object_colours[:, None, None, :]
    return np.asarray(np.linalg.norm(diff, axis=-1))


def test_mask_pixels_have_the_object_colour(shapes: ShapesDataset) -> None:
    # Noise is truncated at PIXEL_NOISE_MAX per channel; rounding adds at most 1 in total.
    diff = np.abs(shapes.images.astype(np.int64) - shapes.object_colours[:, None, None, :])
    assert diff[shapes.masks].max() <= PIXEL_NOISE_MAX + 1


def test_background_pixels_are_far_from_the_object_colour(shapes: ShapesDataset) -> None:
    distance = _distance_to_object_colour(shapes)
    noise_bound = np.sqrt(3) * (PIXEL_NOISE_MAX + 1)
    assert distance[~shapes.masks].min() >= MIN_OBJECT_CONTRAST - noise_bound
    # So the mask is recoverable from the pixels alone: no background pixel looks like object.
    np.testing.assert_array_equal(distance < MIN_OBJECT_CONTRAST / 2, shapes.masks)


def test_boxes_are_tight_around_the_mask_and_inside_the_image(shapes: ShapesDataset) -> None:
    for mask, (x0, y0, x1, y1) in zip(shapes.masks, shapes.boxes, strict=True):
        assert 0 < x0 < x1 < 32 and 0 < y0 < y1 < 32  # whole object visible, not touching a border
        assert mask[y0:y1, x0:x1].sum() == mask.sum()  # the mask lies inside the box
        # Tight: each edge row and column of the box has object pixels.
        assert mask[y0, x0:x1].any() and mask[y1 - 1, x0:x1].any()
        assert mask[y0:y1, x0].any() and mask[y0:y1, x1 - 1].any()


def test_objects_are_neither_specks_nor_the_whole_image(shapes: ShapesDataset) -> None:
    area = shapes.masks.mean(axis=(1, 2))
    assert area.min() > 0.03 and area.max() < 0.5


def test_only_rings_have_a_hole(shapes: ShapesDataset) -> None:
    has_hole = np.array([(ndimage.binary_fill_holes(m) != m).any() for m in shapes.masks])
    is_ring = shapes.labels == SHAPE_CLASSES.index("ring")
    np.testing.assert_array_equal(has_hole, is_ring)


def test_object_colour_does_not_predict_the_class(shapes: ShapesDataset) -> None:
    # Mean object colour per class stays near the middle of the cube: no class owns a colour.
    for k in range(len(SHAPE_CLASSES)):
        mean = shapes.object_colours[shapes.labels == k].mean(axis=0)
        assert np.all(np.abs(mean - 127.5) < 40), (SHAPE_CLASSES[k], mean)


# --- digits and splits ----------------------------------------------------------------------------


def test_digits_loader_upsamples_sklearn_digits() -> None:
    images, labels = load_digits_images(32)
    assert images.shape == (1797, 32, 32) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and set(np.unique(labels)) == set(range(10))
    # At the native size the resampling is the identity: the pixels are sklearn's, scaled.
    native, _ = load_digits_images(8)
    expected = (load_digits().images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(native, expected)
    # Upsampled, a digit covers the same part of the frame.
    small_ink = native.astype(float).mean(axis=(1, 2))
    big_ink = images.astype(float).mean(axis=(1, 2))
    assert np.corrcoef(small_ink, big_ink)[0, 1] > 0.99


def test_stratified_split_is_deterministic_disjoint_and_proportional() -> None:
    labels = np.repeat(np.arange(4, dtype=np.int64), [100, 50, 30, 20])
    train, test = stratified_split(labels, 0.2, seed=5)
    again_train, again_test = stratified_split(labels, 0.2, seed=5)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(test, again_test)
    assert not np.array_equal(test, stratified_split(labels, 0.2, seed=6)[1])
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(labels.size))
    np.testing.assert_array_equal(np.bincount(labels[test]), [20, 10, 6, 4])
    with pytest.raises(ValueError):
        stratified_split(labels, 1.0, seed=0)


# --- reference architectures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "stages"),
    [
        ("small_cnn", ["block1", "block2", "block3", "pool", "fc"]),
        ("small_resnet", ["stem", "layer1", "layer2", "layer3", "pool", "fc"]),
    ],
)
def test_reference_architectures_expose_stages_and_relu_modules(
    arch: str, stages: list[str]
) -> None:
    torch.manual_seed(0)
    model = build_reference_model(arch, in_channels=1, num_classes=7).eval()
    assert [name for name, _ in model.named_children()] == stages
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 7)
    # The last block's map is 8x8 for a 32x32 input (CAM resolution is the same for both).
    last_block = getattr(model, stages[-3])
    feats: list[torch.Tensor] = []
    handle = last_block.register_forward_hook(lambda _m, _i, out: feats.append(out))
    model(x)
    handle.remove()
    assert feats[0].shape[-2:] == (8, 8)


def test_small_resnet_adds_the_skip_connection() -> None:
    torch.manual_seed(0)
    model = SmallResNet(in_channels=3, num_classes=4).eval()
    block = model.layer3[0]
    assert isinstance(block, BasicBlock)
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        residual = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x)))))
        expected = torch.relu(residual + block.shortcut(x))
        torch.testing.assert_close(block(x), expected)
        # Removing the skip changes the output: the addition is really there.
        assert not torch.allclose(block(x), torch.relu(residual))


def test_unknown_reference_architecture_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="small_vgg"):
        build_reference_model("small_vgg", 3, 4)


# --- the shipped models ---------------------------------------------------------------------------


def _metadata(path: Path) -> dict[str, dict]:
    proto = onnx.load(str(path))
    return {p.key: json.loads(p.value) for p in proto.metadata_props}


def _to_input(images: NDArray[np.uint8], spec: dict) -> NDArray[np.float32]:
    """uint8 (N, H, W[, C]) -> the model input, using only what the metadata says."""
    if images.ndim == 3:
        images = images[..., None]
    lo, hi = spec["value_range"]
    x = images.astype(np.float32) / 255.0 * (hi - lo) + lo
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _predict(path: Path, x: NDArray[np.float32]) -> NDArray[np.int64]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": x})
    return np.asarray(logits).argmax(axis=1)


def _sample_images(dataset: str, channels: int) -> tuple[list[Path], NDArray[np.uint8]]:
    paths = sorted((REFERENCE_DIR / f"{dataset}_images").glob("*.png"))
    mode = "L" if channels == 1 else "RGB"
    return paths, np.stack([np.asarray(Image.open(p).convert(mode)) for p in paths])


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_shipped_model_carries_its_input_spec_and_training_record(name: str) -> None:
    path = REFERENCE_DIR / name
    assert path.stat().st_size < 1_000_000
    meta = _metadata(path)
    spec, training = meta["saliency_audit.input_spec"], meta["saliency_audit.training"]
    dataset = name.split("_", 1)[0]
    assert (spec["height"], spec["width"], spec["layout"]) == (32, 32, "NCHW")
    assert spec["channels"] == (3 if dataset == "shapes" else 1)
    expected_classes = list(SHAPE_CLASSES) if dataset == "shapes" else [str(d) for d in range(10)]
    assert spec["class_names"] == expected_classes
    assert spec["value_range"] == [0.0, 1.0]
    assert training["dataset"] == dataset
    assert training["test_accuracy"] >= REQUIRED_ACCURACY
    assert training["seconds"] <= 180
    graph_input = onnx.load(str(path)).graph.input[0]
    assert graph_input.name == "image"
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # any batch size


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_shipped_model_classifies_its_sample_images(name: str) -> None:
    path = REFERENCE_DIR / name
    spec = _metadata(path)["saliency_audit.input_spec"]
    dataset = name.split("_", 1)[0]
    paths, images = _sample_images(dataset, spec["channels"])
    assert len(paths) == 64
    labels = np.array([spec["class_names"].index(p.stem.rsplit("_", 1)[0]) for p in paths])
    assert len(set(labels.tolist())) == len(spec["class_names"])  # every class appears
    accuracy = np.mean(_predict(path, _to_input(images, spec)) == labels)
    assert accuracy >= REQUIRED_ACCURACY


def test_shipped_shape_masks_match_the_sample_images() -> None:
    image_paths, images = _sample_images("shapes", 3)
    mask_dir = REFERENCE_DIR / "shapes_masks"
    assert sorted(p.name for p in mask_dir.glob("*.png")) == [p.name for p in image_paths]
    for path, image in zip(image_paths, images, strict=True):
        mask = np.asarray(Image.open(mask_dir / path.name).convert("L"))
        assert set(np.unique(mask).tolist()) == {0, 255}
        on = mask == 255
        # The object is one flat colour (up to noise) and differs from every background pixel.
        colour = np.median(image[on], axis=0)
        inside = np.abs(image[on].astype(int) - colour).max()
        outside = np.linalg.norm(image[~on].astype(float) - colour, axis=-1).min()
        assert inside <= 2 * (PIXEL_NOISE_MAX + 1), path.name
        assert outside > inside, path.name


@pytest.mark.parametrize("arch", ["small_cnn", "small_resnet"])
def test_shipped_shapes_model_generalizes_to_a_fresh_seed(arch: str) -> None:
    path = REFERENCE_DIR / f"shapes_{arch}.onnx"
    spec = _metadata(path)["saliency_audit.input_spec"]
    held_out = make_shapes(500, seed=HELD_OUT_SHAPES_SEED)
    accuracy = np.mean(_predict(path, _to_input(held_out.images, spec)) == held_out.labels)
    assert accuracy >= REQUIRED_ACCURACY


@pytest.mark.parametrize("arch", ["small_cnn", "small_resnet"])
def test_shipped_digits_model_reaches_its_recorded_test_accuracy(arch: str) -> None:
    path = REFERENCE_DIR / f"digits_{arch}.onnx"
    meta = _metadata(path)
    spec, training = meta["saliency_audit.input_spec"], meta["saliency_audit.training"]
    images, labels = load_digits_images(spec["height"])
    _, test = stratified_split(labels, 0.2, seed=training["seed"])
    assert test.size == training["n_test"]
    predicted = _predict(path, _to_input(images[test], spec))
    accuracy = float(np.mean(predicted == labels[test]))
    assert accuracy >= REQUIRED_ACCURACY
    # ONNX Runtime agrees with the training run (up to one image near a decision tie).
    assert accuracy == pytest.approx(training["test_accuracy"], abs=1.01 / test.size)
