"""Image-set archives (:func:`read_dataset_archive`): their layout, checked before anything is
stored.

A ZIP or a tar (plain, gzip, bzip2 or xz), recognised by its magic bytes and read by
:mod:`.archives`: members are read into memory one at a time with a hard cap and never
extracted. Layout, after ignoring directories, hidden files (any path segment starting with
``.``), ``__MACOSX/`` and ``Thumbs.db``, and after stripping a single top-level folder that
wraps everything::

    a.png, b.jpg, ...            unlabeled set (images at the root) ...
    images/a.png, ...            ... or in images/ (not both)
    cat/a.png, dog/b.png, ...    labeled set: two or more class folders, label = folder
                                 name; class names = the sorted folder names (the worker maps
                                 them to the model's classes with ``class_indices``)
    masks/<image stem>.png       optional: one mask per image, same size, nonzero = object
    boxes.json                   optional: {"<image name>": [[x0, y0, x1, y1], ...]} in
                                 pixel coordinates, 0 <= x0 < x1 <= width (same for y)

Image names are paths relative to the set's root without ``images/`` (``a.png``,
``cat/a.png``); ``boxes.json`` keys are those names, and masks match an image by the stem of
its file name (``masks/a.png`` is the mask of ``a.png`` or of ``cat/a.png``), so when masks
are present image stems must be unique. ``images`` and ``masks`` are never class names.
A boxes.json entry may be ``[]`` (no object); images it does not name have no boxes. Any
other file that is not an image (a ``.txt`` note, ``desktop.ini``) is skipped and listed in
the manifest's ``skipped`` (the rule ``saliency-audit run`` and the release gate apply:
:func:`saliency_audit.workers.engine.image_files.skip_reason`), after the same size and
nested-archive checks
as any member; links, devices, duplicate names, unsafe paths (absolute, ``..``, backslashes,
drive letters, NUL), oversize members and nested archives are refused. An image file that does
not fit the layout is refused too (``unexpected_member``).
Only when the whole archive validates is each image and mask handed to ``sink``, in a second
pass over the archive, so a refusal never stores anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from saliency_audit.workers.engine.image_files import ALLOWED_SUFFIXES, IMAGE_SET_FILES, skip_reason

from .archives import (
    ARCHIVE_ERRORS,
    ArchiveLimits,
    Member,
    archive_kind,
    is_nested_archive,
    iter_members,
    normalize_name,
)
from .common import UploadRejected, _reject, clip
from .images import parse_boxes_json, probe_image, validate_boxes


@dataclass(frozen=True)
class ManifestImage:
    name: str  # path in the set: "a.png" or "<class>/a.png"
    sha256: str  # as returned by the sink
    label: str | None
    width: int
    height: int
    mask_sha256: str | None = None
    boxes: list[list[float]] | None = None


@dataclass
class DatasetManifest:
    """What an accepted image-set archive holds; images sorted by name."""

    images: list[ManifestImage]
    labeled: bool
    class_names: list[str] | None
    n_images: int
    has_masks: bool
    has_boxes: bool
    total_bytes: int  # uncompressed bytes handed to the sink (images and masks)
    # members that are not images, with the reason: "notes.txt (not an image)"
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DEFAULT_LIMITS = ArchiveLimits()  # frozen, so one shared default is safe


def read_dataset_archive(
    path: Path,
    filename: str,
    *,
    sink: Callable[[str, bytes], str],
    limits: ArchiveLimits = _DEFAULT_LIMITS,
) -> DatasetManifest:
    """Validate an image-set archive (layout in the module docstring) and store its files.

    Pass 1 reads each member once, under the caps, and checks everything, keeping only names,
    sizes and hashes. Only if the whole archive is acceptable does pass 2 read it again and call
    ``sink(name, data)`` once per image (``name`` as in the manifest) and per mask
    (``masks/<file>``); ``sink`` returns the stored bytes' sha256, which the manifest records.
    Raises :class:`UploadRejected`; ``sink`` is then never called. An exception from ``sink``
    itself propagates, and what it already stored stays stored (content-addressed, so harmless).
    """
    fname = clip(filename)
    size = path.stat().st_size
    if size == 0:
        raise _reject(f"{fname}: the file is empty", "empty_file")
    with path.open("rb") as fh:
        head = fh.read(512)
    kind = archive_kind(head)
    if kind is None:
        raise _reject(
            f"{fname}: not a ZIP or tar archive (plain, .gz, .bz2 or .xz)",
            "unsupported_format",
            status=415,
        )
    skipped: list[str] = []
    entries = _first_pass(path, kind, limits, size, skipped)
    plan, manifest_fields = _plan(entries, limits)
    manifest = _second_pass(path, kind, limits, plan, manifest_fields, sink)
    manifest.skipped = sorted(skipped)
    return manifest


# ---- pass 1: every member once, under the caps ---------------------------------------------


@dataclass
class _Entry:
    """A member kept after pass 1: what it is and the hash of the bytes that were checked."""

    parts: tuple[str, ...]
    digest: str
    size: int
    width: int = 0
    height: int = 0
    image_format: str | None = None
    boxes_json: Any = None


@dataclass
class _Totals:
    """Running counts over pass 1."""

    bytes: int = 0  # uncompressed, of the members kept
    images: int = 0  # masks included


def _first_pass(
    path: Path, kind: str, limits: ArchiveLimits, size: int, skipped: list[str]
) -> dict[str, _Entry]:
    """The members kept, checked; what the layout skips is appended to ``skipped``."""
    entries: dict[str, _Entry] = {}
    seen: set[str] = set()
    totals = _Totals()
    try:
        for m in iter_members(path, kind, limits):
            parts = _kept_parts(m, seen, limits, skipped)
            if parts is None:
                continue
            key = "/".join(parts)
            _check_member_size(m, key, limits)
            totals.bytes += m.size
            _check_total_size(totals.bytes, limits, size)
            data = _read_member(m, key, limits)
            reason = skip_reason(parts, keep=IMAGE_SET_FILES)
            if reason is not None:  # checked like any member, then left out
                skipped.append(f"{key} ({reason})")
                continue
            entries[key] = _check_content(parts, data, limits, totals)
    except UploadRejected:
        raise
    except ARCHIVE_ERRORS as exc:
        raise _corrupt(exc) from None
    return entries


def _corrupt(exc: BaseException) -> UploadRejected:
    return _reject(
        f"corrupt or truncated archive ({type(exc).__name__}: {clip(str(exc))})",
        "corrupt_archive",
    )


def _ignored_reason(parts: tuple[str, ...]) -> str | None:
    """Hidden files, ``__MACOSX`` and system files: skipped before any other check (files
    that are merely not images are checked like any member first)."""
    reason = skip_reason(parts, keep=IMAGE_SET_FILES)
    return None if reason == "not an image" else reason


def _kept_parts(
    m: Member, seen: set[str], limits: ArchiveLimits, skipped: list[str]
) -> tuple[str, ...] | None:
    """The member's path segments, or None for what the layout skips (the root, directories,
    hidden and system files, listed in ``skipped``); refuses links, special files,
    duplicates, deep or encrypted members."""
    parts = normalize_name(m.name)
    if not parts:
        return None  # the archive root itself ("./")
    key = "/".join(parts)
    if m.kind == "dir":
        return None
    if m.kind == "link":
        raise _reject(
            f"archive member {clip(m.name)!r} is a link; links are not accepted",
            "link_member",
            member=m.name,
        )
    if m.kind == "special":
        raise _reject(
            f"archive member {clip(m.name)!r} is not a regular file (device, fifo or sparse file)",
            "special_member",
            member=m.name,
        )
    if key in seen:
        raise _reject(
            f"archive member {clip(key)!r} appears more than once",
            "duplicate_member",
            member=key,
        )
    seen.add(key)
    reason = _ignored_reason(parts)
    if reason is not None:
        skipped.append(f"{key} ({reason})")
        return None
    if len(parts) - 1 > limits.max_depth:
        raise _reject(
            f"archive member {clip(key)!r} is {len(parts) - 1} folders deep, more than "
            f"{limits.max_depth}",
            "too_deep",
            member=key,
        )
    if m.encrypted:
        raise _reject(f"archive member {clip(key)!r} is encrypted", "encrypted_member", member=key)
    return parts


def _check_member_size(m: Member, key: str, limits: ArchiveLimits) -> None:
    """The member's declared size, and its compression ratio where the archive says it."""
    if m.size > limits.max_member_bytes:
        raise _reject(
            f"archive member {clip(key)!r} is {m.size} bytes uncompressed, more than "
            f"{limits.max_member_bytes}",
            "archive_too_large",
            status=413,
            member=key,
        )
    if (
        m.compressed is not None
        and m.size > limits.ratio_floor_bytes
        and m.size > limits.max_ratio * max(m.compressed, 1)
    ):
        raise _reject(
            f"archive member {clip(key)!r} expands {m.size / max(m.compressed, 1):.0f} "
            f"times (limit {limits.max_ratio:g}): a decompression bomb",
            "decompression_bomb",
            member=key,
        )


def _check_total_size(total: int, limits: ArchiveLimits, size: int) -> None:
    """The members' declared sizes so far, against the cap and the archive's own size."""
    if total > limits.max_total_bytes:
        raise _reject(
            f"the archive holds more than {limits.max_total_bytes} bytes uncompressed",
            "archive_too_large",
            status=413,
        )
    if total > limits.ratio_floor_bytes and total > limits.max_ratio * size:
        raise _reject(
            f"the archive expands more than {limits.max_ratio:g} times its size: a "
            "decompression bomb",
            "decompression_bomb",
        )


def _read_member(m: Member, key: str, limits: ArchiveLimits) -> bytes:
    """The member's bytes, read under the cap (a declared size can lie); never an archive."""
    data = m.read(limits.max_member_bytes + 1)
    if len(data) > limits.max_member_bytes:
        raise _reject(
            f"archive member {clip(key)!r} is larger than {limits.max_member_bytes} bytes",
            "archive_too_large",
            status=413,
            member=key,
        )
    if is_nested_archive(key, data):
        raise _reject(
            f"archive member {clip(key)!r} is itself an archive or compressed file; "
            "nested archives are not accepted",
            "nested_archive",
            member=key,
        )
    return data


def _check_content(
    parts: tuple[str, ...], data: bytes, limits: ArchiveLimits, totals: _Totals
) -> _Entry:
    """An image (or mask) that decodes, or boxes.json that parses; nothing else."""
    key = "/".join(parts)
    entry = _Entry(parts=parts, digest=hashlib.sha256(data).hexdigest(), size=len(data))
    suffix = PurePosixPath(parts[-1]).suffix.lower()
    if parts[-1] == "boxes.json":
        entry.boxes_json = parse_boxes_json(data, key)
    elif suffix in ALLOWED_SUFFIXES:
        totals.images += 1
        # Masks are images too: stop early well past any acceptable count.
        if totals.images > 2 * limits.max_images:
            raise _reject(
                f"the archive holds more than {limits.max_images} images",
                "too_many_images",
                status=413,
            )
        entry.width, entry.height, entry.image_format = probe_image(data, key)
    else:
        raise _reject(
            f"archive member {clip(key)!r} is not an image "
            f"({', '.join(sorted(ALLOWED_SUFFIXES))}), a mask or boxes.json",
            "unexpected_member",
            member=key,
        )
    return entry


# ---- the layout: which member is what -----------------------------------------------------


@dataclass
class _Layout:
    """The kept members sorted by their place in the layout (after the wrapper folder)."""

    root_images: dict[str, _Entry] = field(default_factory=dict)  # name -> entry
    folder_images: dict[str, _Entry] = field(default_factory=dict)  # in images/
    labeled_images: dict[str, tuple[str, _Entry]] = field(default_factory=dict)  # (label, entry)
    masks: dict[str, tuple[str, _Entry]] = field(default_factory=dict)  # stem -> (key, entry)
    boxes_doc: tuple[str, Any] | None = None  # (member key, parsed boxes.json)


@dataclass
class _Plan:
    """What pass 2 stores: each kept member's sink name, and how images relate to masks."""

    entries: dict[str, _Entry]  # member key -> what pass 1 checked
    images: dict[str, _Entry]  # manifest name -> entry
    masks: dict[str, str]  # manifest image name -> mask member key
    member_roles: dict[str, str]  # member key -> sink name (images and masks only)
    label_of: dict[str, str | None]


def _plan(entries: dict[str, _Entry], limits: ArchiveLimits) -> tuple[_Plan, dict[str, Any]]:
    """Apply the layout rules to the members pass 1 kept."""
    strip = _wrapper_depth(entries)
    layout = _sort_members(entries, strip)
    class_names = _class_names(layout)
    images: dict[str, _Entry] = {
        **layout.root_images,
        **layout.folder_images,
        **{name: e for name, (_, e) in layout.labeled_images.items()},
    }
    label_of: dict[str, str | None] = {name: None for name in images}
    label_of.update({name: label for name, (label, _) in layout.labeled_images.items()})
    if not images:
        raise _reject("the archive holds no images", "no_images")
    if len(images) > limits.max_images:
        raise _reject(
            f"the archive holds {len(images)} images, more than {limits.max_images}",
            "too_many_images",
            status=413,
        )
    member_roles = _image_roles(entries, strip)
    mask_of = _match_masks(layout.masks, images)
    for key in mask_of.values():
        member_roles[key] = "masks/" + entries[key].parts[-1]
    boxes: dict[str, list[list[float]]] = {}
    if layout.boxes_doc is not None:
        sizes = {name: (e.width, e.height) for name, e in images.items()}
        boxes = validate_boxes(layout.boxes_doc[1], sizes, layout.boxes_doc[0])
    fields = {
        "labeled": bool(layout.labeled_images),
        "class_names": class_names,
        "has_masks": bool(layout.masks),
        "has_boxes": layout.boxes_doc is not None,
        "boxes": boxes,
    }
    plan = _Plan(
        entries=entries,
        images=images,
        masks=mask_of,
        member_roles=member_roles,
        label_of=label_of,
    )
    return plan, fields


def _wrapper_depth(entries: dict[str, _Entry]) -> int:
    """1 when a single top-level folder wraps every member, else 0."""
    if not entries:
        return 0
    firsts = {e.parts[0] for e in entries.values()}
    # "masks" alone at the top is a set without images, not a wrapper to strip.
    wrapped = (
        len(firsts) == 1
        and firsts != {"masks"}
        and all(len(e.parts) >= 2 for e in entries.values())
    )
    return 1 if wrapped else 0


def _sort_members(entries: dict[str, _Entry], strip: int) -> _Layout:
    layout = _Layout()
    for key, entry in entries.items():
        parts = entry.parts[strip:]
        if parts == ("boxes.json",):
            layout.boxes_doc = (key, entry.boxes_json)
        elif len(parts) == 1 and entry.image_format:
            layout.root_images[parts[0]] = entry
        elif len(parts) == 2 and parts[0] == "masks" and entry.image_format:
            _add_mask(layout.masks, key, parts[1], entry)
        elif len(parts) == 2 and parts[0] == "images" and entry.image_format:
            layout.folder_images[parts[1]] = entry
        elif len(parts) == 2 and entry.image_format:
            layout.labeled_images["/".join(parts)] = (parts[0], entry)
        else:
            raise _reject(
                f"archive member {clip(key)!r} does not fit the layout (images at the root or "
                "in images/, or in one folder per class; masks/<stem>.png; boxes.json)",
                "unexpected_member",
                member=key,
            )
    return layout


def _add_mask(
    masks: dict[str, tuple[str, _Entry]], key: str, file_name: str, entry: _Entry
) -> None:
    if entry.image_format != "PNG" or not file_name.lower().endswith(".png"):
        raise _reject(
            f"{clip(key)}: masks must be PNG files named <image stem>.png",
            "invalid_mask",
            member=key,
        )
    stem = PurePosixPath(file_name).stem
    if stem in masks:
        raise _reject(f"{clip(key)}: a second mask for {clip(stem)!r}", "invalid_mask", member=key)
    masks[stem] = (key, entry)


def _class_names(layout: _Layout) -> list[str] | None:
    """The sorted class folders of a labeled set (None if unlabeled); one layout only."""
    used = [bool(layout.root_images), bool(layout.folder_images), bool(layout.labeled_images)]
    if sum(used) > 1:
        raise _reject(
            "the archive mixes layouts: put unlabeled images either at the root or in images/, "
            "or labeled images in one folder per class, not several of these",
            "invalid_layout",
        )
    if not layout.labeled_images:
        return None
    class_names = sorted({label for label, _ in layout.labeled_images.values()})
    if len(class_names) < 2:
        raise _reject(
            f"only one class folder ({clip(class_names[0])!r}): a labeled set needs two or "
            "more class folders; unlabeled images go at the root or in images/",
            "invalid_layout",
        )
    return class_names


def _image_roles(entries: dict[str, _Entry], strip: int) -> dict[str, str]:
    """Member key -> manifest name, for every image that is not a mask."""
    roles: dict[str, str] = {}
    for key, entry in entries.items():
        parts = entry.parts[strip:]
        if entry.image_format and not (len(parts) == 2 and parts[0] == "masks"):
            name = parts[-1] if parts[0] == "images" and len(parts) == 2 else "/".join(parts)
            roles[key] = name
    return roles


def _match_masks(masks: dict[str, tuple[str, _Entry]], images: dict[str, _Entry]) -> dict[str, str]:
    """Image name -> its mask's member key; each mask needs one image of its stem and size."""
    mask_of: dict[str, str] = {}
    if not masks:
        return mask_of
    by_stem: dict[str, list[str]] = {}
    for name in images:
        by_stem.setdefault(PurePosixPath(name).stem, []).append(name)
    for stem, (key, mask) in masks.items():
        owners = by_stem.get(stem, [])
        if not owners:
            raise _reject(
                f"{clip(key)}: a mask for {clip(stem)!r}, but no image has that stem",
                "unknown_image",
                member=key,
                image=clip(stem),
            )
        if len(owners) > 1:
            raise _reject(
                f"{clip(key)}: several images have the stem {clip(stem)!r} "
                f"({', '.join(clip(o) for o in owners[:5])}); with masks, stems must be "
                "unique",
                "invalid_mask",
                member=key,
            )
        image = images[owners[0]]
        if (mask.width, mask.height) != (image.width, image.height):
            raise _reject(
                f"{clip(key)}: the mask is {mask.width}x{mask.height}, its image "
                f"{clip(owners[0])} is {image.width}x{image.height}",
                "invalid_mask",
                member=key,
            )
        mask_of[owners[0]] = key
    return mask_of


# ---- pass 2: store what pass 1 checked ----------------------------------------------------


def _second_pass(
    path: Path,
    kind: str,
    limits: ArchiveLimits,
    plan: _Plan,
    fields: dict[str, Any],
    sink: Callable[[str, bytes], str],
) -> DatasetManifest:
    stored: dict[str, str] = {}
    total = 0
    for m in iter_members(path, kind, limits):
        if m.kind != "file":
            continue
        key = "/".join(normalize_name(m.name))
        if key not in plan.member_roles:
            continue
        data = m.read(limits.max_member_bytes + 1)
        # The bytes stored must be the bytes checked; an untouched temp file guarantees it.
        if hashlib.sha256(data).hexdigest() != plan.entries[key].digest:
            raise RuntimeError(f"{key}: archive changed between the two passes")
        stored[key] = sink(plan.member_roles[key], data)
        total += len(data)
    name_to_key = {name: key for key, name in plan.member_roles.items()}
    images = [
        ManifestImage(
            name=name,
            sha256=stored[name_to_key[name]],
            label=plan.label_of[name],
            width=entry.width,
            height=entry.height,
            mask_sha256=stored[plan.masks[name]] if name in plan.masks else None,
            boxes=fields["boxes"].get(name),
        )
        for name, entry in sorted(plan.images.items())
    ]
    return DatasetManifest(
        images=images,
        labeled=fields["labeled"],
        class_names=fields["class_names"],
        n_images=len(images),
        has_masks=fields["has_masks"],
        has_boxes=fields["has_boxes"],
        total_bytes=total,
    )
