"""Upload validation: hostile files are refused with the right answer, valid ones described.

No HTTP and no database: :mod:`saliency_audit.service.uploads` is called on files in ``tmp_path``.
torch is
imported here only to produce real ``torch.save`` / safetensors files and to compare with
torch's own weights-only loader; the module under test never imports it (checked below).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
import torchvision
from onnx import numpy_helper
from PIL import Image

from saliency_audit.service import uploads
from saliency_audit.service.architectures import TORCHVISION_CLASSIFIERS, TORCHVISION_VERSION
from saliency_audit.service.uploads import (
    DEFAULT_MAX_MODEL_BYTES,
    ArchiveLimits,
    DatasetManifest,
    UploadRejected,
    classifier_head,
    inspect_model,
    pickle_scan,
    read_dataset_archive,
    scan_state_dict_pickle,
)
from saliency_audit.workers.engine.errors import ImageDecodeError
from saliency_audit.workers.engine.image_files import MAX_IMAGES, class_indices
from tests.service.hostile import (
    REFERENCE,
    SHAPES_IMAGES,
    SHAPES_MASKS,
    HostileCase,
    hostile_datasets,
    hostile_models,
    make_tar,
    make_zip,
    mask_box,
    onnx_bytes,
    shapes_image_names,
    valid_dataset_tar,
    valid_dataset_zip,
    valid_labeled_zip,
    valid_safetensors,
    valid_torch_zip,
)

REPO = Path(__file__).resolve().parents[2]
MODEL_CASES = hostile_models()
DATASET_CASES = hostile_datasets()


class RecordingSink:
    """A sink that stores nothing but remembers every call; returns the data's sha256."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def __call__(self, name: str, data: bytes) -> str:
        self.calls.append((name, data))
        return hashlib.sha256(data).hexdigest()


def _write(tmp_path: Path, data: bytes, name: str = "upload.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _inspect(path: Path, architecture: str | None = None, **kw: Any) -> uploads.ModelInfo:
    kw.setdefault("max_bytes", DEFAULT_MAX_MODEL_BYTES)
    return inspect_model(path, path.name, architecture=architecture, **kw)


def _read(path: Path, **kw: Any) -> tuple[DatasetManifest, RecordingSink]:
    sink = RecordingSink()
    return read_dataset_archive(path, path.name, sink=sink, **kw), sink


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _torch_file(tmp_path: Path, obj: Any, name: str = "weights.pt", **kw: Any) -> Path:
    path = tmp_path / name
    torch.save(obj, path, **kw)
    return path


# ---- the hostile corpus --------------------------------------------------------------------


def test_the_hostile_corpus_has_at_least_twenty_cases_of_each_kind() -> None:
    assert len(MODEL_CASES) >= 20 and len(DATASET_CASES) >= 20
    names = [c.name for c in MODEL_CASES + DATASET_CASES]
    assert len(names) == len(set(names))
    for case in MODEL_CASES + DATASET_CASES:
        assert case.expected_status in (413, 415, 422)


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: c.name)
def test_hostile_model_is_refused_with_its_status_and_code(
    case: HostileCase, tmp_path: Path
) -> None:
    path = _write(tmp_path, case.data, case.filename)
    with pytest.raises(UploadRejected) as caught:
        inspect_model(
            path,
            case.filename,
            architecture=case.metadata.get("architecture"),
            max_bytes=DEFAULT_MAX_MODEL_BYTES,
        )
    assert (caught.value.status, caught.value.code) == (case.expected_status, case.expected_code)
    assert caught.value.detail
    json.dumps(caught.value.to_dict())  # the HTTP layer can send it as is


@pytest.mark.parametrize("case", DATASET_CASES, ids=lambda c: c.name)
def test_hostile_dataset_is_refused_and_nothing_is_stored(
    case: HostileCase, tmp_path: Path
) -> None:
    path = _write(tmp_path, case.data, case.filename)
    sink = RecordingSink()
    with pytest.raises(UploadRejected) as caught:
        read_dataset_archive(path, case.filename, sink=sink)
    assert (caught.value.status, caught.value.code) == (case.expected_status, case.expected_code)
    assert sink.calls == []
    json.dumps(caught.value.to_dict())


def test_unsafe_pickle_names_the_global_it_refuses(tmp_path: Path) -> None:
    case = next(c for c in MODEL_CASES if "os.system" in c.name)
    with pytest.raises(UploadRejected, match=r"os\.system") as caught:
        _inspect(_write(tmp_path, case.data, "m.pt"), "resnet18")
    assert caught.value.extra["globals"] == ["os.system"]


def test_archive_member_errors_name_the_member(tmp_path: Path) -> None:
    case = next(c for c in DATASET_CASES if c.name == "a zip archive named notes.txt")
    with pytest.raises(UploadRejected, match=r"notes\.txt") as caught:
        _read(_write(tmp_path, case.data, "set.zip"))
    assert caught.value.extra["member"] == "notes.txt"


# ---- valid twins of the hand-built hostile files ---------------------------------------------


def test_hand_built_state_dict_zip_is_what_torch_load_weights_only_reads(tmp_path: Path) -> None:
    path = _write(tmp_path, valid_torch_zip(), "m.pt")
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == ["fc.weight", "fc.bias"]
    assert loaded["fc.weight"].shape == (3, 2) and loaded["fc.bias"].shape == (3,)
    info = _inspect(path, "resnet18")
    assert (info.format, info.tensors, info.parameters, info.num_classes) == ("torch", 2, 9, 3)


def test_hand_built_safetensors_is_what_safetensors_reads(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    path = _write(tmp_path, valid_safetensors(), "m.safetensors")
    assert {k: v.shape for k, v in load_file(str(path)).items()} == {
        "fc.weight": (3, 2),
        "fc.bias": (3,),
    }
    info = _inspect(path, "resnet18")
    assert (info.format, info.tensors, info.parameters, info.num_classes) == (
        "safetensors",
        2,
        9,
        3,
    )


def test_hand_built_onnx_with_a_2d_input_is_refused_as_the_worker_refuses_it(
    tmp_path: Path,
) -> None:
    # It passes the ONNX checker, but the worker audits images: a [batch, 4] input is refused
    # at upload with the worker's message (it was accepted before, and failed in the worker).
    with pytest.raises(UploadRejected) as caught:
        _inspect(_write(tmp_path, onnx_bytes(), "m.onnx"))
    assert caught.value.code == "input_spec_required"
    assert caught.value.detail == (
        "expected a 4-D image input, the graph's input has shape (None, 4)"
    )


# ---- models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(REFERENCE.glob("*.onnx")), ids=lambda p: p.name)
def test_reference_onnx_models_are_accepted_with_their_graph_shapes(path: Path) -> None:
    info = _inspect(path)
    model = onnx.load(str(path))
    channels = 3 if path.name.startswith("shapes") else 1
    classes = 6 if path.name.startswith("shapes") else 10
    assert info.format == "onnx" and info.opset == 17
    assert info.input_shape == ["batch", channels, 32, 32]
    assert info.output_shape == ["batch", classes]
    assert info.num_classes == classes
    assert info.tensors == len(model.graph.initializer)
    assert info.parameters == sum(numpy_helper.to_array(t).size for t in model.graph.initializer)
    assert any("input_spec" in note for note in info.notes)


def test_onnx_ignores_a_known_architecture_but_refuses_an_unknown_one() -> None:
    path = REFERENCE / "shapes_small_cnn.onnx"
    info = _inspect(path, "resnet18")
    assert any("architecture 'resnet18' ignored" in note for note in info.notes)
    with pytest.raises(UploadRejected) as caught:
        _inspect(path, "resnet_18")
    assert (caught.value.status, caught.value.code) == (422, "unknown_architecture")
    assert "resnet18" in caught.value.extra["suggestions"]


def test_file_over_max_bytes_is_413_and_within_is_accepted() -> None:
    path = REFERENCE / "shapes_small_cnn.onnx"
    size = path.stat().st_size
    with pytest.raises(UploadRejected) as caught:
        _inspect(path, max_bytes=size - 1)
    assert (caught.value.status, caught.value.code) == (413, "file_too_large")
    assert caught.value.extra == {"size": size, "limit": size - 1}
    assert _inspect(path, max_bytes=size).format == "onnx"


def test_safetensors_of_resnet18_is_accepted_with_its_sizes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = torchvision.models.resnet18(weights=None, num_classes=7).state_dict()
    path = tmp_path / "resnet18.safetensors"
    save_file(state, str(path))
    info = _inspect(path, "resnet18")
    assert info.format == "safetensors"
    assert info.tensors == len(state)
    assert info.parameters == sum(t.numel() for t in state.values())
    assert info.num_classes == 7
    assert (info.opset, info.input_shape, info.output_shape) == (None, None, None)


def test_torch_save_zip_of_resnet18_state_dict_is_accepted_with_its_sizes(
    tmp_path: Path,
) -> None:
    state = torchvision.models.resnet18(weights=None, num_classes=7).state_dict()
    info = _inspect(_torch_file(tmp_path, state), "resnet18")
    assert info.format == "torch"
    assert info.tensors == len(state)
    assert info.parameters == sum(t.numel() for t in state.values())
    assert info.num_classes == 7


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        return zf.read(name)


def test_scan_accepts_what_torch_save_writes_for_resnet18(tmp_path: Path) -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    scan = scan_state_dict_pickle(_data_pkl(_torch_file(tmp_path, state)))
    assert scan.globals == {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch.FloatStorage",
        "torch.LongStorage",  # bn*.num_batches_tracked
    }
    assert scan.tensors == {k: tuple(v.shape) for k, v in state.items()}
    assert scan.protocol == 2 and not scan.unsupported_opcodes


def test_scan_accepts_a_batchnorm_model_whose_counter_is_int64(tmp_path: Path) -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 5),
    )
    state = model.state_dict()
    assert state["1.num_batches_tracked"].dtype == torch.int64
    path = _torch_file(tmp_path, state)
    scan = scan_state_dict_pickle(_data_pkl(path))
    assert "torch.LongStorage" in scan.globals
    assert scan.tensors["1.num_batches_tracked"] == ()
    assert set(scan.tensors) == set(state)
    info = _inspect(path, "resnet18")  # the worker, not this check, compares keys with it
    assert info.tensors == len(state)
    assert info.num_classes is None  # "4.weight" is no torchvision head name: no guess


def test_parameters_and_mixed_dtypes_pass_like_torch_load_weights_only(tmp_path: Path) -> None:
    params = dict(torch.nn.Linear(3, 2).named_parameters())  # rebuilt via _rebuild_parameter
    tensors = {
        "half": torch.zeros(2, dtype=torch.float16),
        "bf16": torch.zeros(2, dtype=torch.bfloat16),
        "mask": torch.zeros(2, dtype=torch.bool),
        "int8": torch.zeros(2, dtype=torch.int8),
        "u16": torch.zeros(2, dtype=torch.uint16),  # _rebuild_tensor_v3 + UntypedStorage
        "view": torch.arange(10.0)[2:5],
    }
    path = _torch_file(tmp_path, {**params, **tensors})
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {*params, *tensors}
    info = _inspect(path, "resnet18")
    assert info.tensors == len(params) + len(tensors)
    assert info.parameters == 6 + 2 + 2 * 5 + 3


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_pickle_protocol_4_is_refused_because_torch_load_weights_only_cannot_read_it(
    tmp_path: Path,
) -> None:
    path = _torch_file(tmp_path, torch.nn.Linear(3, 2).state_dict(), pickle_protocol=4)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    with pytest.raises(UploadRejected) as caught:
        _inspect(path, "resnet18")
    assert (caught.value.status, caught.value.code) == (422, "unsupported_pickle")
    assert "STACK_GLOBAL" in caught.value.extra["opcodes"]


def test_a_whole_pickled_model_is_refused_naming_its_class(tmp_path: Path) -> None:
    path = _torch_file(tmp_path, torchvision.models.resnet18(weights=None))
    with pytest.raises(UploadRejected) as caught:
        _inspect(path, "resnet18")
    assert (caught.value.status, caught.value.code) == (422, "unsafe_pickle")
    assert caught.value.extra["globals"] == ["torchvision.models.resnet.ResNet"]


def test_a_checkpoint_wrapping_the_state_dict_or_a_bare_tensor_is_refused(
    tmp_path: Path,
) -> None:
    state = torch.nn.Linear(3, 2).state_dict()
    for name, obj in (("ckpt.pt", {"state_dict": state, "epoch": 3}), ("t.pt", torch.ones(2))):
        with pytest.raises(UploadRejected) as caught:
            _inspect(_torch_file(tmp_path, obj, name), "resnet18")
        assert (caught.value.status, caught.value.code) == (422, "invalid_torch_file")


def test_allowlisted_globals_are_a_subset_of_torch_load_weights_only_allowlist() -> None:
    from torch import _weights_only_unpickler as wou

    torch_allowed = set(wou._get_allowed_globals())
    assert torch_allowed >= uploads.ALLOWED_PICKLE_GLOBALS
    missing = [g for g in uploads.ALLOWED_PICKLE_GLOBALS if g not in torch_allowed]
    assert missing == []


def test_scanner_protocol_2_opcodes_are_those_torch_weights_only_unpickler_implements() -> None:
    import pickle
    import pickletools

    from torch import _weights_only_unpickler as wou

    source = Path(wou.__file__).read_text()
    handled = set(re.findall(r"\b([A-Z][A-Z0-9_]+)\[0\]", source))
    opcode_names = {op.name for op in pickletools.opcodes}
    # pickle's constant names equal pickletools' opcode names for every opcode torch handles
    assert all(getattr(pickle, n, None) is not None for n in handled)
    assert handled & opcode_names == pickle_scan.TORCH_OPCODES


def test_torchvision_classifier_list_is_torchvisions_own() -> None:
    assert torchvision.__version__.split("+")[0] == TORCHVISION_VERSION
    assert set(torchvision.models.list_models(module=torchvision.models)) == set(
        TORCHVISION_CLASSIFIERS
    )


def test_unknown_architecture_lists_close_matches() -> None:
    with pytest.raises(UploadRejected) as caught:
        uploads.check_architecture("ResNet18")
    assert caught.value.extra["suggestions"][0] == "resnet18"
    with pytest.raises(UploadRejected) as caught:
        uploads.check_architecture("vgg")
    assert {"vgg11", "vgg13", "vgg16", "vgg19"} & set(caught.value.extra["suggestions"])
    with pytest.raises(UploadRejected) as caught:
        uploads.check_architecture("qqqqqqq")
    assert caught.value.extra["suggestions"] == []


def test_num_classes_is_read_from_every_torchvision_classifier_head() -> None:
    failing_on_meta = []
    for name in sorted(TORCHVISION_CLASSIFIERS):
        no_aux = name in ("googlenet", "inception_v3")
        kwargs = {"aux_logits": False, "init_weights": False} if no_aux else {}
        try:
            # meta tensors: shapes without memory, so even vit_h_14 costs nothing
            with torch.device("meta"):
                model = torchvision.models.get_model(name, weights=None, num_classes=7, **kwargs)
        except NotImplementedError:  # RegNet's init copies data, which meta tensors lack
            failing_on_meta.append(name)
            continue
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert classifier_head.num_classes_from_shapes(shapes) == 7, name
    assert all(name.startswith("regnet_") for name in failing_on_meta)
    small = torchvision.models.regnet_x_400mf(weights=None, num_classes=7)
    shapes = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    assert classifier_head.num_classes_from_shapes(shapes) == 7


def test_service_uploads_never_imports_torch() -> None:
    code = (
        "import sys, saliency_audit.service.uploads, saliency_audit.service.architectures\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_upload_rejected_carries_status_code_detail_and_extra() -> None:
    exc = UploadRejected("too big", status=413, code="file_too_large", size=5)
    assert (exc.status, exc.code, exc.detail) == (413, "file_too_large", "too big")
    assert exc.extra == {"size": 5}
    assert exc.to_dict() == {
        "status": 413,
        "code": "file_too_large",
        "detail": "too big",
        **exc.extra,
    }
    assert UploadRejected("x").status == 422 and UploadRejected("x").code == "invalid_upload"
    with pytest.raises(ValueError, match="status"):
        UploadRejected("x", status=500)


# ---- datasets --------------------------------------------------------------------------------


def test_unlabeled_zip_gives_a_manifest_of_its_images(tmp_path: Path) -> None:
    manifest, sink = _read(_write(tmp_path, valid_dataset_zip(6), "set.zip"))
    names = sorted(shapes_image_names(6))
    assert [i.name for i in manifest.images] == names
    assert manifest.n_images == 6 and not manifest.labeled and manifest.class_names is None
    assert not manifest.has_masks and not manifest.has_boxes
    originals = {n: (SHAPES_IMAGES / n).read_bytes() for n in names}
    assert dict(sink.calls) == originals  # each image stored once, byte for byte
    assert len(sink.calls) == 6
    for image in manifest.images:
        assert image.sha256 == _sha(originals[image.name])
        assert (image.width, image.height, image.label) == (32, 32, None)
        assert image.mask_sha256 is None and image.boxes is None
    assert manifest.total_bytes == sum(len(d) for d in originals.values())
    json.dumps(manifest.to_dict())


def test_manifest_records_what_the_sink_returns(tmp_path: Path) -> None:
    path = _write(tmp_path, valid_dataset_zip(2), "set.zip")
    manifest = read_dataset_archive(path, "set.zip", sink=lambda name, data: f"id:{name}")
    assert [i.sha256 for i in manifest.images] == [f"id:{i.name}" for i in manifest.images]


def test_labeled_zip_labels_images_by_folder_and_sorts_the_class_names(tmp_path: Path) -> None:
    data = valid_labeled_zip(2, classes=("triangle", "circle", "square"))
    manifest, sink = _read(_write(tmp_path, data, "set.zip"))
    assert manifest.labeled and manifest.class_names == ["circle", "square", "triangle"]
    assert [(i.name, i.label) for i in manifest.images] == [
        (f"{c}/{c}_{k}.png", c) for c in ("circle", "square", "triangle") for k in range(2)
    ]
    assert {name for name, _ in sink.calls} == {i.name for i in manifest.images}
    # the worker maps the folder names to the model's classes with the engine's rule
    model_classes = ("circle", "ring", "square", "triangle", "cross", "star")
    assert class_indices(manifest.class_names, model_classes) == {
        "circle": 0,
        "square": 2,
        "triangle": 3,
    }


def test_masks_are_matched_to_images_by_stem_and_stored(tmp_path: Path) -> None:
    manifest, sink = _read(_write(tmp_path, valid_dataset_zip(4, masks=True), "set.zip"))
    assert manifest.has_masks
    stored = dict(sink.calls)
    for image in manifest.images:
        mask = (SHAPES_MASKS / image.name).read_bytes()
        assert image.mask_sha256 == _sha(mask)
        assert stored[f"masks/{image.name}"] == mask
    assert len(sink.calls) == 8
    assert manifest.total_bytes == sum(len(d) for d in stored.values())


def test_labeled_set_masks_match_images_in_class_folders(tmp_path: Path) -> None:
    data = valid_labeled_zip(2, classes=("circle", "star"), masks=True)
    manifest, _ = _read(_write(tmp_path, data, "set.zip"))
    for image in manifest.images:
        stem = image.name.split("/")[1]
        assert image.mask_sha256 == _sha((SHAPES_MASKS / stem).read_bytes())


def test_boxes_json_attaches_boxes_to_their_images(tmp_path: Path) -> None:
    names = shapes_image_names(3)
    partial = {names[0]: [mask_box(names[0]), [0, 0, 32, 32]], names[1]: []}
    data = valid_dataset_zip(3, extra=[("boxes.json", json.dumps(partial).encode())])
    manifest, sink = _read(_write(tmp_path, data, "set.zip"))
    by_name = {i.name: i for i in manifest.images}
    assert manifest.has_boxes
    assert by_name[names[0]].boxes == [mask_box(names[0]), [0, 0, 32, 32]]
    assert by_name[names[1]].boxes == []
    assert by_name[names[2]].boxes is None
    assert "boxes.json" not in dict(sink.calls)


def test_boxes_from_masks_round_trip(tmp_path: Path) -> None:
    manifest, _ = _read(_write(tmp_path, valid_dataset_zip(4, masks=True, boxes=True), "s.zip"))
    for image in manifest.images:
        assert image.boxes == [mask_box(image.name)]
        assert image.mask_sha256 is not None


def test_a_single_top_level_folder_is_stripped(tmp_path: Path) -> None:
    plain, _ = _read(_write(tmp_path, valid_dataset_zip(4, masks=True, boxes=True), "a.zip"))
    wrapped_zip = valid_dataset_zip(4, masks=True, boxes=True, top_folder="my set")
    wrapped, _ = _read(_write(tmp_path, wrapped_zip, "b.zip"))
    assert wrapped.to_dict() == plain.to_dict()
    labeled, _ = _read(_write(tmp_path, valid_labeled_zip(1, top_folder="data"), "c.zip"))
    assert labeled.class_names == ["circle", "square", "triangle"]


def test_images_folder_is_an_unlabeled_set(tmp_path: Path) -> None:
    plain, _ = _read(_write(tmp_path, valid_dataset_zip(3, masks=True), "a.zip"))
    in_folder = valid_dataset_zip(3, masks=True, images_folder=True)
    folder, _ = _read(_write(tmp_path, in_folder, "b.zip"))
    assert folder.to_dict() == plain.to_dict()


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_archives_give_the_same_manifest_as_zip(mode: str, tmp_path: Path) -> None:
    from_zip, _ = _read(_write(tmp_path, valid_dataset_zip(4, masks=True, boxes=True), "a.zip"))
    data = valid_dataset_tar(4, mode=mode, masks=True, boxes=True)
    from_tar, sink = _read(_write(tmp_path, data, "set.tar"))
    assert from_tar.to_dict() == from_zip.to_dict()
    assert len(sink.calls) == 8


def test_tar_with_dot_slash_names_and_directories_is_accepted(tmp_path: Path) -> None:
    # what `tar -czf set.tgz -C folder .` writes
    root = tarfile.TarInfo(".")
    root.type = tarfile.DIRTYPE
    names = shapes_image_names(2)
    members: list[tuple[str | tarfile.TarInfo, bytes]] = [(root, b"")]
    members += [(f"./{n}", (SHAPES_IMAGES / n).read_bytes()) for n in names]
    manifest, _ = _read(_write(tmp_path, make_tar(members), "set.tgz"))
    assert [i.name for i in manifest.images] == sorted(names)


def test_hidden_files_macos_metadata_thumbs_db_and_directories_are_ignored(
    tmp_path: Path,
) -> None:
    junk = b"not an image"
    extra = [
        ("__MACOSX/._circle_0.png", junk),
        (".DS_Store", junk),
        ("Thumbs.db", junk),
        ("sub/.hidden.png", junk),
        ("empty_dir/", b""),
    ]
    manifest, sink = _read(_write(tmp_path, valid_dataset_zip(3, extra=extra), "set.zip"))
    assert manifest.n_images == 3
    assert all(data != junk for _, data in sink.calls)


def test_every_allowed_image_format_is_accepted_with_its_size(tmp_path: Path) -> None:
    base = Image.open(SHAPES_IMAGES / "circle_0.png").convert("RGB").resize((40, 24))
    members = []
    formats = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tiff"}
    for fmt, suffix in {**formats, "GIF": ".gif"}.items():
        buf = io.BytesIO()
        base.save(buf, format=fmt)
        members.append((f"img{suffix}", buf.getvalue()))
    manifest, _ = _read(_write(tmp_path, make_zip(members), "set.zip"))
    assert manifest.n_images == 6
    assert {(i.width, i.height) for i in manifest.images} == {(40, 24)}


def test_limits_can_be_tightened_and_image_count_raised_for_training_sets(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, valid_dataset_zip(6), "set.zip")
    expectations = [
        (ArchiveLimits(max_members=3), 413, "archive_too_large"),
        (ArchiveLimits(max_images=5), 413, "too_many_images"),
        (ArchiveLimits(max_member_bytes=100), 413, "archive_too_large"),
        (ArchiveLimits(max_total_bytes=1000), 413, "archive_too_large"),
    ]
    for limits, status, code in expectations:
        sink = RecordingSink()
        with pytest.raises(UploadRejected) as caught:
            read_dataset_archive(path, "set.zip", sink=sink, limits=limits)
        assert (caught.value.status, caught.value.code) == (status, code), limits
        assert sink.calls == []
    wrapped = _write(tmp_path, valid_dataset_zip(2, top_folder="top"), "wrapped.zip")
    with pytest.raises(UploadRejected, match="folders deep") as caught:
        _read(wrapped, limits=ArchiveLimits(max_depth=0))
    assert caught.value.code == "too_deep"
    assert ArchiveLimits().max_images == MAX_IMAGES
    manifest, _ = _read(path, limits=ArchiveLimits(max_images=100_000))
    assert manifest.n_images == 6


def test_tar_stream_caps_apply_to_skipped_members_too(tmp_path: Path) -> None:
    # a hidden member is skipped, yet its bytes are decompressed and counted
    names = shapes_image_names(2)
    images = [(n, (SHAPES_IMAGES / n).read_bytes()) for n in names]
    members = [(".big", bytes(3 * 1024 * 1024)), *images]
    path = _write(tmp_path, make_tar(members, mode="w"), "set.tar")
    manifest, _ = _read(path)  # an uncompressed tar has a ratio of 1
    assert manifest.n_images == 2
    with pytest.raises(UploadRejected) as caught:
        _read(path, limits=ArchiveLimits(max_total_bytes=1024 * 1024, max_members=10))
    assert (caught.value.status, caught.value.code) == (413, "archive_too_large")


# ---- the labeling rule, shared with the engine ---------------------------------------------


def test_class_indices_follows_the_engines_labeling_rule() -> None:
    assert class_indices(["cat", "dog"], ["dog", "bird", "cat"]) == {"cat": 2, "dog": 0}
    assert class_indices(["7", "3"], None) == {"7": 7, "3": 3}
    assert class_indices(["dog", "cat"], None) == {"cat": 0, "dog": 1}
    assert class_indices(["dog", "cat"], []) == {"cat": 0, "dog": 1}  # no names: as None
    with pytest.raises(ImageDecodeError) as caught:
        class_indices(["cat", "fox"], ["cat", "dog"], source="/data/train")
    assert caught.value.message == (
        "/data/train: class folders ['fox'] are not among the model's classes ['cat', 'dog']"
    )
    with pytest.raises(ImageDecodeError, match=r"^class folders \['fox'\]"):
        class_indices(["fox"], ["cat"])


def test_engine_images_still_exports_the_limits_now_kept_in_image_files() -> None:
    from saliency_audit.workers.engine import image_files, images

    for name in ("ALLOWED_FORMATS", "ALLOWED_SUFFIXES", "MAX_PIXELS", "MAX_IMAGES"):
        assert getattr(images, name) is getattr(image_files, name)
        assert name in images.__all__
    assert images.class_indices is class_indices


def test_ordered_dict_state_dicts_and_plain_dicts_are_both_accepted(tmp_path: Path) -> None:
    state = torch.nn.Linear(3, 2).state_dict()
    for name, obj in (("od.pt", OrderedDict(state)), ("d.pt", dict(state))):
        info = _inspect(_torch_file(tmp_path, obj, name), "resnet18")
        assert (info.tensors, info.parameters) == (2, 8)


def test_non_image_members_are_skipped_and_listed_not_refused(tmp_path: Path) -> None:
    # the same folder contents as saliency-audit run and the gate see (tests/engine,
    # tests/service/test_gate.py): a note, macOS metadata, a hidden file
    junk = b"not an image"
    extra = [
        ("notes.txt", b"taken on Tuesday\n"),
        (".DS_Store", junk),
        ("__MACOSX/._circle_0.png", junk),
        ("run.sh", b"#!/bin/sh\n"),
    ]
    manifest, sink = _read(_write(tmp_path, valid_dataset_zip(3, extra=extra), "set.zip"))
    assert manifest.n_images == 3
    assert manifest.skipped == [
        ".DS_Store (hidden)",
        "__MACOSX/._circle_0.png (macOS metadata)",
        "notes.txt (not an image)",
        "run.sh (not an image)",
    ]
    assert all(data != junk and not data.startswith(b"#!") for _, data in sink.calls)
    assert manifest.to_dict()["skipped"] == manifest.skipped
