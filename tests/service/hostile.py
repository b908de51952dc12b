"""A corpus of hostile uploads, built in memory at call time (nothing hostile is committed).

:func:`hostile_models` and :func:`hostile_datasets` return :class:`HostileCase` s: the bytes of
an upload, its file name, the form fields that go with it (``metadata``) and the status and
problem code the service must answer with. The unit tests in ``test_uploads.py`` feed them to
:mod:`saliency_audit.service.uploads` directly; HTTP tests can post the same bytes. The pickles here
are
written opcode by opcode and never loaded. :func:`valid_dataset_zip` and
:func:`valid_labeled_zip` build acceptable image sets from the bundled shapes images.

Every case is acceptable under the default limits except for the one thing it breaks, so the
expected code names that thing (the unit tests also check a valid twin of the trickier cases).
"""

from __future__ import annotations

import io
import json
import stat
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "reference"
SHAPES_IMAGES = REFERENCE / "shapes_images"
SHAPES_MASKS = REFERENCE / "shapes_masks"
RESNET18_ARCH = {"architecture": "resnet18"}


@dataclass(frozen=True)
class HostileCase:
    name: str
    filename: str
    data: bytes = field(repr=False)
    metadata: dict[str, Any]
    expected_status: int
    expected_code: str


# ---- small builders ---------------------------------------------------------------------------


def png(width: int = 8, height: int = 8, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_zip(members: Iterable[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name" is what some cases want
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return buf.getvalue()


def make_tar(members: Iterable[tuple[str | tarfile.TarInfo, bytes]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for name, data in members:
            info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
            if info.isreg():
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def _tar_entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _zeros_zip(name: str, n_bytes: int) -> bytes:
    """A ZIP member of ``n_bytes`` zeros, streamed so building it stays memory-light."""
    buf = io.BytesIO()
    chunk = bytes(1 << 20)
    with (
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf,
        zf.open(name, "w", force_zip64=True) as fh,
    ):
        for start in range(0, n_bytes, len(chunk)):
            fh.write(chunk[: min(len(chunk), n_bytes - start)])
    return buf.getvalue()


def _set_zip_encrypted_flag(data: bytes) -> bytes:
    """Mark every member as encrypted in both headers (zipfile cannot write encrypted ZIPs)."""
    out = bytearray(data)
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (i := out.find(signature, start)) >= 0:
            out[i + flag_offset] |= 0x01
            start = i + 4
    return bytes(out)


# ---- pickles, opcode by opcode (never loaded) ---------------------------------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _small_int(value: int) -> bytes:
    return b"K" + bytes([value]) if value < 256 else b"M" + struct.pack("<H", value)


def _call_pickle(module: str, name: str, argument: str) -> bytes:
    """``module.name(argument)`` as a protocol-2 pickle: GLOBAL, args tuple, REDUCE."""
    return b"\x80\x02" + _global(module, name) + _unicode(argument) + b"\x85R."


def state_dict_pickle(
    tensors: Sequence[tuple[str, str, tuple[int, ...]]], storage: str = "FloatStorage"
) -> bytes:
    """A protocol-2 pickle shaped exactly like torch.save's for a state dict of float tensors.

    ``tensors`` holds (state-dict key, storage record key, shape); each tensor is contiguous at
    offset 0 of its own storage.
    """
    out = b"\x80\x02" + _global("collections", "OrderedDict") + b")R("
    for key, record, shape in tensors:
        numel = int(np.prod(shape)) if shape else 1
        stride = tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))
        out += _unicode(key) + _global("torch._utils", "_rebuild_tensor_v2")
        out += b"((" + _unicode("storage") + _global("torch", storage) + _unicode(record)
        out += _unicode("cpu") + _small_int(numel) + b"tQ" + _small_int(0)
        out += b"(" + b"".join(_small_int(d) for d in shape) + b"t"
        out += b"(" + b"".join(_small_int(s) for s in stride) + b"t"
        out += b"\x89" + _global("collections", "OrderedDict") + b")Rt" + b"R"
    return out + b"u."


def torch_zip(pickle_bytes: bytes, records: dict[str, bytes] | None = None) -> bytes:
    """The layout torch.save writes: ``archive/data.pkl``, ``archive/data/<key>``, version."""
    members: list[tuple[str, bytes]] = [("archive/data.pkl", pickle_bytes)]
    members += [(f"archive/data/{k}", v) for k, v in (records or {}).items()]
    members += [("archive/version", b"3\n"), ("archive/byteorder", b"little")]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def valid_torch_zip() -> bytes:
    """A two-tensor state dict in torch.save's format, built by hand (the unit tests check that
    torch.load(weights_only=True) reads it), so hostile variants differ by one thing."""
    pkl = state_dict_pickle([("fc.weight", "0", (3, 2)), ("fc.bias", "1", (3,))])
    return torch_zip(pkl, {"0": bytes(24), "1": bytes(12)})


# ---- ONNX ------------------------------------------------------------------------------------


def onnx_model(*, external: str | None = None, where: str = "initializer") -> onnx.ModelProto:
    """A tiny valid classifier y = softmax((x @ W) * s); ``external`` points a tensor at a file."""
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    scale = numpy_helper.from_array(np.ones((1, 3), np.float32), "S")
    nodes = [
        helper.make_node("Constant", [], ["s"], value=scale),
        helper.make_node("MatMul", ["x", "W"], ["z"]),
        helper.make_node("Mul", ["z", "s"], ["m"]),
        helper.make_node("Softmax", ["m"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if external is not None:
        # where: "initializer", "attribute" (the Constant's tensor), or "entries_only": the
        # initializer keeps its data and its DEFAULT location but also lists external_data.
        if where == "attribute":
            target = model.graph.node[0].attribute[0].t
        else:
            target = model.graph.initializer[0]
        if where != "entries_only":
            target.ClearField("raw_data")
            target.ClearField("float_data")
            target.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", "48")):
            entry = target.external_data.add()
            entry.key, entry.value = key, value
    return model


def onnx_bytes(**kwargs: Any) -> bytes:
    return onnx_model(**kwargs).SerializeToString()


def onnx_failing_checker() -> bytes:
    """Parses fine, but a node reads a tensor nothing produces."""
    model = onnx_model()
    model.graph.node[1].input[0] = "undefined_tensor"
    return model.SerializeToString()


# ---- safetensors -----------------------------------------------------------------------------


def safetensors_file(header: Any, data: bytes, header_length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_length is None else header_length
    return struct.pack("<Q", n) + raw + data


def valid_safetensors() -> bytes:
    header = {
        "fc.weight": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 24]},
        "fc.bias": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]},
        "__metadata__": {"format": "pt"},
    }
    return safetensors_file(header, bytes(36))


# ---- image sets ------------------------------------------------------------------------------


def shapes_image_names(n: int) -> list[str]:
    """The first ``n`` shapes images, taking the classes in turn (circle_0, cross_0, ...)."""
    by_class: dict[str, list[str]] = {}
    for p in sorted(SHAPES_IMAGES.glob("*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1])):
        by_class.setdefault(p.stem.rsplit("_", 1)[0], []).append(p.name)
    columns = [by_class[c] for c in sorted(by_class)]
    order = [name for row in zip(*columns, strict=False) for name in row]
    return order[:n]


def mask_box(name: str) -> list[int]:
    """The tight box [x0, y0, x1, y1] around a shapes image's mask (x1, y1 exclusive)."""
    mask = np.asarray(Image.open(SHAPES_MASKS / name).convert("L")) > 0
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def valid_dataset_zip(
    n: int = 6,
    *,
    masks: bool = False,
    boxes: bool = False,
    top_folder: str | None = None,
    images_folder: bool = False,
    extra: Sequence[tuple[str, bytes]] = (),
) -> bytes:
    """An unlabeled set of ``n`` shapes images (and optionally their masks and boxes)."""
    return make_zip(
        _dataset_members(
            n,
            masks=masks,
            boxes=boxes,
            top_folder=top_folder,
            images_folder=images_folder,
            extra=extra,
        )
    )


def valid_labeled_zip(
    per_class: int = 3,
    *,
    classes: Sequence[str] = ("circle", "square", "triangle"),
    masks: bool = False,
    top_folder: str | None = None,
) -> bytes:
    """A labeled set: ``<class>/<image>`` for each class, from the shapes images."""
    prefix = f"{top_folder}/" if top_folder else ""
    members: list[tuple[str, bytes]] = []
    for cls in classes:
        for k in range(per_class):
            name = f"{cls}_{k}.png"
            members.append((f"{prefix}{cls}/{name}", (SHAPES_IMAGES / name).read_bytes()))
            if masks:
                members.append((f"{prefix}masks/{name}", (SHAPES_MASKS / name).read_bytes()))
    return make_zip(members)


def _dataset_members(
    n: int,
    *,
    masks: bool = False,
    boxes: bool = False,
    top_folder: str | None = None,
    images_folder: bool = False,
    extra: Sequence[tuple[str, bytes]] = (),
) -> list[tuple[str, bytes]]:
    prefix = f"{top_folder}/" if top_folder else ""
    image_prefix = prefix + ("images/" if images_folder else "")
    members: list[tuple[str, bytes]] = []
    names = shapes_image_names(n)
    for name in names:
        members.append((image_prefix + name, (SHAPES_IMAGES / name).read_bytes()))
        if masks:
            members.append((f"{prefix}masks/{name}", (SHAPES_MASKS / name).read_bytes()))
    if boxes:
        doc = {name: [mask_box(name)] for name in names}
        members.append((f"{prefix}boxes.json", json.dumps(doc).encode()))
    members.extend(extra)
    return members


def valid_dataset_tar(n: int = 6, mode: str = "w:gz", **kwargs: Any) -> bytes:
    """The same set as :func:`valid_dataset_zip`, as a tar (``mode`` picks the compression)."""
    return make_tar(_dataset_members(n, **kwargs), mode=mode)


# ---- the corpus ------------------------------------------------------------------------------


def hostile_models() -> list[HostileCase]:
    arch = RESNET18_ARCH
    cases = [
        HostileCase(
            "torch zip whose pickle calls os.system",
            "model.pt",
            torch_zip(_call_pickle("os", "system", "echo hostile-case-must-not-run")),
            arch,
            422,
            "unsafe_pickle",
        ),
        HostileCase(
            "torch zip whose pickle calls posix.system",
            "model.pt",
            torch_zip(_call_pickle("posix", "system", "echo hostile-case-must-not-run")),
            arch,
            422,
            "unsafe_pickle",
        ),
        HostileCase(
            "torch zip whose pickle calls builtins.eval",
            "model.pth",
            torch_zip(_call_pickle("builtins", "eval", "__import__('os').getcwd()")),
            arch,
            422,
            "unsafe_pickle",
        ),
        HostileCase(
            "torch zip whose pickle reaches eval through STACK_GLOBAL (protocol 4)",
            "model.pt",
            torch_zip(
                b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x031+1\x85R."  # never loaded
            ),
            arch,
            422,
            "unsafe_pickle",
        ),
        HostileCase(
            "torch zip pickling a whole __main__ model class (NEWOBJ + BUILD)",
            "model.pt",
            torch_zip(b"\x80\x02" + _global("__main__", "MyModel") + b")\x81}b."),
            arch,
            422,
            "unsafe_pickle",
        ),
        HostileCase(
            "torch zip pickling a torch.nn module",
            "model.pt",
            torch_zip(b"\x80\x02" + _global("torch.nn.modules.linear", "Linear") + b")\x81."),
            arch,
            422,
            "unsafe_pickle",
        ),
        HostileCase(
            "torch zip using INST to build os.system",
            "model.pt",
            torch_zip(b"(S'echo hostile'\nios\nsystem\n."),
            arch,
            422,
            "unsafe_pickle",
        ),
        HostileCase(
            "torch zip calling an allowlisted class that is not callable (REDUCE of a storage)",
            "model.pt",
            torch_zip(b"\x80\x02" + _global("torch", "FloatStorage") + b")R."),
            arch,
            422,
            "unsafe_pickle",
        ),
        HostileCase(
            "torch zip with BUILD on a class object",
            "model.pt",
            torch_zip(b"\x80\x02" + _global("collections", "OrderedDict") + b"}b."),
            arch,
            422,
            "unsafe_pickle",
        ),
        HostileCase(
            "torch zip using the copyreg extension registry (EXT1)",
            "model.pt",
            torch_zip(b"\x80\x02\x82\x01)R."),
            arch,
            422,
            "unsafe_pickle",
        ),
        HostileCase(
            "legacy raw-pickle .pt (not torch.save's zip format)",
            "model.pt",
            _call_pickle("os", "system", "echo hostile-case-must-not-run"),
            arch,
            422,
            "unsafe_pickle",
        ),
        HostileCase(
            "torch zip whose storage record is missing",
            "model.pt",
            torch_zip(state_dict_pickle([("fc.weight", "0", (3, 2))])),
            arch,
            422,
            "invalid_torch_file",
        ),
        HostileCase(
            "torch zip whose storage record is shorter than the tensor",
            "model.pt",
            torch_zip(state_dict_pickle([("fc.weight", "0", (3, 2))]), {"0": bytes(8)}),
            arch,
            422,
            "invalid_torch_file",
        ),
        HostileCase(
            "torch zip with a truncated pickle",
            "model.pt",
            torch_zip(state_dict_pickle([("fc.weight", "0", (3, 2))])[:-9], {"0": bytes(24)}),
            arch,
            422,
            "invalid_torch_file",
        ),
        HostileCase(
            "ZIP that is not a torch.save archive",
            "model.pt",
            make_zip([("readme.txt", b"hello")]),
            arch,
            415,
            "unsupported_format",
        ),
        HostileCase(
            "ONNX with external data at a relative path",
            "model.onnx",
            onnx_bytes(external="weights.bin"),
            {},
            422,
            "onnx_external_data",
        ),
        HostileCase(
            "ONNX with external data at ../../etc/passwd",
            "model.onnx",
            onnx_bytes(external="../../etc/passwd"),
            {},
            422,
            "onnx_external_data",
        ),
        HostileCase(
            "ONNX with external data at the absolute path /etc/passwd",
            "model.onnx",
            onnx_bytes(external="/etc/passwd"),
            {},
            422,
            "onnx_external_data",
        ),
        HostileCase(
            "ONNX with an attribute tensor (Constant) stored externally",
            "model.onnx",
            onnx_bytes(external="weights.bin", where="attribute"),
            {},
            422,
            "onnx_external_data",
        ),
        HostileCase(
            "ONNX with external_data entries but no EXTERNAL data_location",
            "model.onnx",
            onnx_bytes(external="/etc/passwd", where="entries_only"),
            {},
            422,
            "onnx_external_data",
        ),
        HostileCase(
            "truncated ONNX",
            "model.onnx",
            onnx_bytes()[:-40],
            {},
            422,
            "invalid_onnx",
        ),
        HostileCase(
            "ONNX the checker refuses (a node reads an undefined tensor)",
            "model.onnx",
            onnx_failing_checker(),
            {},
            422,
            "invalid_onnx",
        ),
        HostileCase(
            "garbage with no known magic",
            "model.onnx",
            b"GIF89a this is not a model at all \xff\xfe" * 4,
            {},
            415,
            "unsupported_format",
        ),
        HostileCase("empty file", "model.onnx", b"", {}, 422, "empty_file"),
        HostileCase(
            "safetensors whose offsets run past the end",
            "model.safetensors",
            safetensors_file(
                {"fc.weight": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 24]}},
                bytes(12),
            ),
            arch,
            422,
            "invalid_safetensors",
        ),
        HostileCase(
            "safetensors with an unknown dtype",
            "model.safetensors",
            safetensors_file(
                {"fc.weight": {"dtype": "F33", "shape": [3, 2], "data_offsets": [0, 24]}},
                bytes(24),
            ),
            arch,
            422,
            "invalid_safetensors",
        ),
        HostileCase(
            "safetensors claiming a 1 TiB header",
            "model.safetensors",
            safetensors_file({"a": 1}, bytes(16), header_length=1 << 40),
            arch,
            422,
            "invalid_safetensors",
        ),
        HostileCase(
            "safetensors whose header length runs past the end of the file",
            "model.safetensors",
            safetensors_file(b'{"a": {}}', b"", header_length=4096),
            arch,
            422,
            "invalid_safetensors",
        ),
        HostileCase(
            "safetensors with overlapping tensors",
            "model.safetensors",
            safetensors_file(
                {
                    "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
                },
                bytes(24),
            ),
            arch,
            422,
            "invalid_safetensors",
        ),
        HostileCase(
            "safetensors whose shape disagrees with its byte count",
            "model.safetensors",
            safetensors_file(
                {"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, bytes(16)
            ),
            arch,
            422,
            "invalid_safetensors",
        ),
        HostileCase(
            "safetensors header that is not JSON",
            "model.safetensors",
            safetensors_file(b"{not json", bytes(8)),
            arch,
            422,
            "invalid_safetensors",
        ),
        HostileCase(
            "safetensors without an architecture",
            "model.safetensors",
            valid_safetensors(),
            {},
            422,
            "architecture_required",
        ),
        HostileCase(
            "safetensors with an unknown architecture",
            "model.safetensors",
            valid_safetensors(),
            {"architecture": "resnet19"},
            422,
            "unknown_architecture",
        ),
        HostileCase(
            "torch state dict without an architecture",
            "model.pt",
            valid_torch_zip(),
            {},
            422,
            "architecture_required",
        ),
    ]
    return cases


def hostile_datasets() -> list[HostileCase]:
    img = png()
    image_zip = make_zip([("a.png", img)])
    tgz = make_tar([("a.png", img)])
    symlink = zipfile.ZipInfo("link.png")
    symlink.create_system = 3
    symlink.external_attr = (stat.S_IFLNK | 0o777) << 16
    ppm = io.BytesIO()
    Image.new("RGB", (4, 4)).save(ppm, format="PPM")
    ok = shapes_image_names(2)
    ok_members = [(n, (SHAPES_IMAGES / n).read_bytes()) for n in ok]

    def case(name: str, filename: str, data: bytes, status: int, code: str) -> HostileCase:
        return HostileCase(name, filename, data, {}, status, code)

    return [
        case("zip slip with ../evil.png", "set.zip", make_zip([("../evil.png", img)]), 422,
             "unsafe_path"),
        case("zip slip deeper: images/../../evil.png", "set.zip",
             make_zip([*ok_members, ("images/../../evil.png", img)]), 422, "unsafe_path"),
        case("zip member with the absolute path /tmp/evil.png", "set.zip",
             make_zip([("/tmp/evil.png", img)]), 422, "unsafe_path"),
        case("zip member with a backslash path", "set.zip",
             make_zip([("..\\evil.png", img)]), 422, "unsafe_path"),
        case("zip member with a drive letter", "set.zip", make_zip([("C:/evil.png", img)]),
             422, "unsafe_path"),
        case("tar slip with ../evil.png", "set.tar.gz", make_tar([("../evil.png", img)]), 422,
             "unsafe_path"),
        case("tar with a symlink", "set.tar.gz",
             make_tar([("a.png", img), (_tar_entry("b.png", tarfile.SYMTYPE, "/etc/passwd"),
                                        b"")]), 422, "link_member"),
        case("tar with a hard link", "set.tar",
             make_tar([("a.png", img), (_tar_entry("b.png", tarfile.LNKTYPE, "a.png"), b"")],
                      mode="w"), 422, "link_member"),
        case("tar with a fifo", "set.tar.gz",
             make_tar([("a.png", img), (_tar_entry("fifo.png", tarfile.FIFOTYPE), b"")]), 422,
             "special_member"),
        case("tar with a character device", "set.tar.gz",
             make_tar([("a.png", img), (_tar_entry("zero.png", tarfile.CHRTYPE), b"")]), 422,
             "special_member"),
        case("zip with a symlink entry", "set.zip",
             make_zip([("a.png", img), (symlink, b"/etc/passwd")]), 422, "link_member"),
        case("zip with a duplicate name", "set.zip",
             make_zip([("a.png", img), ("a.png", png(color=(1, 2, 3)))]), 422,
             "duplicate_member"),
        case("tar naming one file twice (./a.png and a.png)", "set.tar.gz",
             make_tar([("./a.png", img), ("a.png", img)]), 422, "duplicate_member"),
        case("zip bomb: one member expanding to 60 MB (over the member cap)", "set.zip",
             _zeros_zip("bomb.png", 60 * 1024 * 1024), 413, "archive_too_large"),
        case("zip bomb: 5 MB of zeros, compression ratio ~1000", "set.zip",
             _zeros_zip("bomb.png", 5 * 1024 * 1024), 422, "decompression_bomb"),
        case("tar.gz bomb: the stream expands ~1000 times", "set.tar.gz",
             make_tar([("bomb.png", bytes(5 * 1024 * 1024))]), 422, "decompression_bomb"),
        case("tar.gz bomb hidden in an ignored member", "set.tar.gz",
             make_tar([(".hidden", bytes(5 * 1024 * 1024)), *ok_members]), 422,
             "decompression_bomb"),
        case("tar.gz whose pax header expands to 5 MB", "set.tar.gz", _pax_bomb(), 422,
             "decompression_bomb"),
        case("zip in a zip in a zip", "set.zip",
             make_zip([("middle.zip", make_zip([("inner.zip", image_zip)]))]), 422,
             "nested_archive"),
        case("zip containing a tar.gz", "set.zip",
             make_zip([*ok_members, ("more.tar.gz", tgz)]), 422, "nested_archive"),
        case("tar containing a zip", "set.tar.gz", make_tar([("more.zip", image_zip)]), 422,
             "nested_archive"),
        case("a zip disguised as photo.png", "set.zip", make_zip([("photo.png", image_zip)]),
             422, "nested_archive"),
        case("truncated zip", "set.zip", valid_dataset_zip(4)[:-30], 422, "corrupt_archive"),
        case("truncated tar.gz", "set.tar.gz", _first_half(valid_dataset_tar(4)), 422,
             "corrupt_archive"),
        case("zip with an encrypted member", "set.zip",
             _set_zip_encrypted_flag(make_zip([("a.png", img)])), 422, "encrypted_member"),
        case("PNG whose header claims 100000x100000 pixels", "set.zip",
             make_zip([*ok_members, ("huge.png", png_header_only(100_000, 100_000))]), 422,
             "image_too_large"),
        case("PNG whose header claims 50 megapixels", "set.zip",
             make_zip([("big.png", png_header_only(10_000, 5_000))]), 422, "image_too_large"),
        case("garbage bytes named .png", "set.zip",
             make_zip([*ok_members, ("broken.png", b"\x89PNG\r\n\x1a\n garbage")]), 422,
             "invalid_image"),
        case("truncated PNG", "set.zip", make_zip([("cut.png", png(64, 64)[:60])]), 422,
             "invalid_image"),
        case("PPM (a format outside the allowlist) named .png", "set.zip",
             make_zip([("a.png", ppm.getvalue())]), 422, "invalid_image"),
        # a non-image member is skipped (and listed), but only after the checks every member
        # passes: an archive disguised as a note, or a note too deep, is still refused
        case("a zip archive named notes.txt", "set.zip",
             make_zip([*ok_members, ("notes.txt", image_zip)]), 422, "nested_archive"),
        case("a non-image member deeper than the limit", "set.zip",
             make_zip([*ok_members, ("a/b/c/d/e/run.sh", b"#!/bin/sh\n")]), 422, "too_deep"),
        case("an image below the layout's depth (class/sub/image)", "set.zip",
             make_zip([("cat/a.png", img), ("dog/b.png", img), ("dog/sub/c.png", img)]), 422,
             "unexpected_member"),
        case("folders nested deeper than the limit", "set.zip",
             make_zip([("a/b/c/d/e/f.png", img)]), 422, "too_deep"),
        case("empty zip archive", "set.zip", make_zip([]), 422, "no_images"),
        case("empty tar.gz archive", "set.tar.gz", make_tar([]), 422, "no_images"),
        case("archive holding only ignored files", "set.zip",
             make_zip([("__MACOSX/._a.png", img), (".DS_Store", b"x"), ("Thumbs.db", b"x")]),
             422, "no_images"),
        case("images both at the root and in class folders", "set.zip",
             make_zip([("a.png", img), ("cat/b.png", img), ("dog/c.png", img)]), 422,
             "invalid_layout"),
        case("a single class folder next to boxes.json", "set.zip",
             make_zip([("cat/a.png", img), ("boxes.json", b"{}")]), 422, "invalid_layout"),
        case("a mask for an unknown image", "set.zip",
             make_zip([*ok_members, ("masks/ghost.png", png())]), 422, "unknown_image"),
        case("a mask of the wrong size", "set.zip",
             make_zip([*ok_members, (f"masks/{ok[0]}", png(5, 5))]), 422, "invalid_mask"),
        case("a mask that is not a PNG", "set.zip",
             make_zip([*ok_members, (f"masks/{ok[0][:-4]}.bmp", _bmp(32, 32))]), 422,
             "invalid_mask"),
        case("boxes.json that is not JSON", "set.zip",
             make_zip([*ok_members, ("boxes.json", b"{oops")]), 422, "invalid_boxes"),
        case("boxes.json that is a list", "set.zip",
             make_zip([*ok_members, ("boxes.json", b"[[0, 0, 1, 1]]")]), 422, "invalid_boxes"),
        case("a box outside its image", "set.zip",
             make_zip([*ok_members, ("boxes.json", json.dumps({ok[0]: [[0, 0, 33, 10]]})
                                     .encode())]), 422, "invalid_boxes"),
        case("a box with x0 > x1", "set.zip",
             make_zip([*ok_members, ("boxes.json", json.dumps({ok[0]: [[9, 0, 3, 10]]})
                                     .encode())]), 422, "invalid_boxes"),
        case("a box for an unknown image", "set.zip",
             make_zip([*ok_members, ("boxes.json", json.dumps({"ghost.png": [[0, 0, 1, 1]]})
                                     .encode())]), 422, "unknown_image"),
        case("not an archive at all", "set.zip", b"this is plain text, not an archive" * 20,
             415, "unsupported_format"),
        case("a bare PNG instead of an archive", "set.zip", img, 415, "unsupported_format"),
        case("empty upload", "set.zip", b"", 422, "empty_file"),
    ]  # fmt: skip


def _pax_bomb() -> bytes:
    """A tar.gz whose first header is a pax record of 5 MB that tarfile reads in one go."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a.png")
        data = png()
        info.size = len(data)
        info.pax_headers = {"comment": "0" * (5 * 1024 * 1024)}
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _bmp(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 255).save(buf, format="BMP")
    return buf.getvalue()
