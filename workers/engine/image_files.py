"""Torch-free rules about image files: allowed formats, size limits and how folders become labels.

The API process validates uploads with these same rules before a worker ever sees the files, and
it must not import torch, so they live apart from :mod:`saliency_audit.workers.engine.images` (which
decodes
into tensors). This module imports only the standard library and the engine's errors.
"""

from __future__ import annotations

import glob
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import ImageDecodeError

__all__ = [
    "ALLOWED_FORMATS",
    "ALLOWED_SUFFIXES",
    "IMAGE_SET_FILES",
    "MAX_IMAGES",
    "MAX_PIXELS",
    "ImageFile",
    "ImageListing",
    "class_indices",
    "list_images",
    "skip_reason",
    "skipped_note",
]

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "WEBP", "TIFF", "GIF")
ALLOWED_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
)
MAX_PIXELS = 40_000_000  # per image, checked before decoding (about 6300 x 6300)
MAX_IMAGES = 10_000


def class_indices(
    folder_names: Sequence[str],
    class_names: Sequence[str] | None,
    *,
    source: str | None = None,
) -> dict[str, int]:
    """The class index of each class folder of a labeled image set.

    When the model names its classes, each folder must be one of those names and gets that
    class's index; otherwise folder names that are all integers are the class indices, and any
    other names are numbered in sorted order. ``source`` (the folder or archive the names come
    from) only prefixes the error message.
    """
    names = list(folder_names)
    if class_names:
        unknown = [n for n in names if n not in class_names]
        if unknown:
            prefix = f"{source}: " if source is not None else ""
            raise ImageDecodeError(
                f"{prefix}class folders {unknown} are not among the model's classes "
                f"{list(class_names)}",
                image=source if source is not None else "",
            )
        return {n: list(class_names).index(n) for n in names}
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(sorted(names))}


# ---- the one input rule: which files of a folder, an archive or a list are the images ---------

SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini"})
# the file an uploaded image set may hold besides images and masks (service/uploads)
IMAGE_SET_FILES = frozenset({"boxes.json"})


def skip_reason(parts: Sequence[str], keep: frozenset[str] = frozenset()) -> str | None:
    """Why a file (its path segments inside the folder or archive) is not one of the images,
    or None for an image (by suffix) and for a file name in ``keep`` (the service's
    ``boxes.json``). The same rule for ``saliency-audit run``, the release gate, the Python API
    and image-set uploads: such files are skipped and listed in a note, never an error."""
    if not parts:
        return "empty name"
    if parts[0] == "__MACOSX":
        return "macOS metadata"
    if any(p.startswith(".") for p in parts):
        return "hidden"
    if parts[-1].lower() in SYSTEM_FILES:
        return "system file"
    if parts[-1] in keep:
        return None
    if PurePosixPath(parts[-1]).suffix.lower() not in ALLOWED_SUFFIXES:
        return "not an image"
    return None


def skipped_note(skipped: Sequence[str]) -> str | None:
    """The one note that lists skipped files (None when nothing was skipped)."""
    if not skipped:
        return None
    shown = ", ".join(skipped[:10]) + (
        f", ... ({len(skipped) - 10} more)" if len(skipped) > 10 else ""
    )
    return f"skipped {len(skipped)} file(s) that are not images: {shown}"


@dataclass(frozen=True)
class ImageFile:
    """One image found by :func:`list_images`: its name in the set, and how to read it."""

    name: str
    read: Callable[[], bytes] = field(repr=False, compare=False)


@dataclass
class ImageListing:
    """The images of an input and what was skipped (``"notes.txt (not an image)"``)."""

    images: list[ImageFile]
    skipped: list[str]

    @property
    def note(self) -> str | None:
        return skipped_note(self.skipped)


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def _skip(name: str, parts: Sequence[str], skipped: list[str]) -> bool:
    reason = skip_reason(parts)
    if reason is not None:
        skipped.append(f"{name} ({reason})")
    return reason is not None


def _file_reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def _list_folder(folder: Path, images: list[ImageFile], skipped: list[str]) -> None:
    """Images directly in ``folder``: sub-folders (class folders and masks have their own
    arguments) and non-image files are skipped."""
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            # a folder's own reason (hidden, macOS metadata) when it has one
            reason = skip_reason((path.name, "image.png")) or "folder"
            skipped.append(f"{path.name}/ ({reason})")
        elif not _skip(path.name, (path.name,), skipped):
            images.append(ImageFile(path.name, _file_reader(path)))


def _list_zip(path: Path, images: list[ImageFile], skipped: list[str]) -> None:
    with zipfile.ZipFile(path) as archive:
        infos = sorted(archive.infolist(), key=lambda i: i.filename)
    for info in infos:
        if info.is_dir():
            continue
        name = info.filename
        parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
        if ".." in parts or name.startswith("/"):
            raise ImageDecodeError(f"{path}: unsafe member name {name!r}", image=str(path))
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            skipped.append(f"{name} (link)")
            continue
        if not _skip(name, parts, skipped):

            def read(info: zipfile.ZipInfo = info) -> bytes:
                with zipfile.ZipFile(path) as archive:
                    return archive.read(info)

            images.append(ImageFile(name, read))


def _list_tar(path: Path, images: list[ImageFile], skipped: list[str]) -> None:
    with tarfile.open(path) as archive:
        members = sorted(archive.getmembers(), key=lambda m: m.name)
    for member in members:
        if member.isdir():
            continue
        name = member.name
        parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
        if ".." in parts or name.startswith("/"):
            raise ImageDecodeError(f"{path}: unsafe member name {name!r}", image=str(path))
        if not member.isfile():
            skipped.append(f"{name} (link or special file)")
            continue
        if not _skip(name, parts, skipped):

            def read(member: tarfile.TarInfo = member) -> bytes:
                with tarfile.open(path) as archive:
                    fh = archive.extractfile(member)
                    assert fh is not None  # a regular file
                    return fh.read()

            images.append(ImageFile(name, read))


def list_images(source: str | Path | Sequence[str | Path]) -> ImageListing:
    """The images of ``source``: a folder (the images directly in it), a zip or tar archive
    (images at any depth, named by their path in it), a single image file, a glob pattern
    (``"photos/*.jpg"``), or a list of any of these. Hidden files, ``__MACOSX``, system files
    and non-image files are skipped and listed (:func:`skip_reason`). Nothing is decoded here
    and archives are never extracted: each image is read when its ``read()`` is called.
    Raises ``ImageDecodeError`` for a missing path, an input with no image, or more than
    ``MAX_IMAGES``."""
    sources = [source] if isinstance(source, str | Path) else list(source)
    images: list[ImageFile] = []
    skipped: list[str] = []
    for item in sources:
        text = str(item)
        path = Path(item)
        if not path.exists() and glob.has_magic(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise ImageDecodeError(f"{text}: no file matches the pattern", image=text)
            for match in matches:
                match_path = Path(match)
                if match_path.is_file() and not _skip(match_path.name, (match_path.name,), skipped):
                    images.append(ImageFile(match_path.name, _file_reader(match_path)))
            continue
        if path.is_dir():
            _list_folder(path, images, skipped)
        elif not path.is_file():
            raise ImageDecodeError(f"{path}: no such file or folder", image=text)
        elif zipfile.is_zipfile(path):
            _list_zip(path, images, skipped)
        elif path.name.lower().endswith(ARCHIVE_SUFFIXES[1:]) or _is_tar(path):
            _list_tar(path, images, skipped)
        elif not _skip(path.name, (path.name,), skipped):
            images.append(ImageFile(path.name, _file_reader(path)))
    if not images:
        raise ImageDecodeError(
            f"{', '.join(str(s) for s in sources)}: no images (allowed suffixes: "
            f"{', '.join(sorted(ALLOWED_SUFFIXES))})"
            + (f"; {skipped_note(skipped)}" if skipped else ""),
            image=str(sources[0]) if sources else "",
        )
    if len(images) > MAX_IMAGES:
        raise ImageDecodeError(f"{len(images)} images exceeds the limit of {MAX_IMAGES}")
    counts = Counter(i.name for i in images)
    duplicates = sorted(n for n, c in counts.items() if c > 1)
    if duplicates:
        raise ImageDecodeError(f"image names appear more than once: {duplicates[:5]}")
    return ImageListing(images, skipped)


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False
