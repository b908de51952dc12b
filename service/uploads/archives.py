"""Reading ZIP and tar archives (plain, gzip, bzip2 or xz) without extracting anything.

Members are read into memory one at a time, under the caps of :class:`ArchiveLimits`; a tar is
read as a stream through a counter that stops a decompression bomb mid-stream. Member names are
checked before use: nothing absolute, no ``..``, backslash, drive letter or NUL.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

from saliency_audit.workers.engine.image_files import MAX_IMAGES

from .common import GiB, MiB, _reject, clip


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on an image-set archive; every one is checked before the bytes it bounds are read.

    ``max_ratio`` bounds uncompressed / compressed size per ZIP member and for the whole archive
    (a tar's stream), judged only above ``ratio_floor_bytes`` (small files compress arbitrarily
    well, and cannot hurt). ``max_depth`` counts folders in a member's path. ``max_images``
    defaults to an audit set's limit; a training set may raise it (e.g. 100_000).
    """

    max_members: int = 20_000
    max_member_bytes: int = 50 * MiB
    max_total_bytes: int = 2 * GiB
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 1 * MiB
    max_depth: int = 4
    max_images: int = MAX_IMAGES


# Magic numbers of archive and compressed formats: a member carrying one is refused.
_NESTED_MAGIC: tuple[bytes, ...] = (
    b"PK\x03\x04",
    b"PK\x05\x06",
    b"PK\x07\x08",
    b"\x1f\x8b",  # gzip
    b"BZh",  # bzip2
    b"\xfd7zXZ\x00",  # xz
    b"7z\xbc\xaf\x27\x1c",
    b"Rar!\x1a\x07",
    b"\x28\xb5\x2f\xfd",  # zstd
)
_NESTED_SUFFIXES = frozenset(
    {".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".7z", ".rar", ".zst"}
)
_DRIVE = re.compile(r"^[A-Za-z]:")


def is_nested_archive(name: str, data: bytes) -> bool:
    if data.startswith(_NESTED_MAGIC) or data[257:262] == b"ustar":
        return True
    return PurePosixPath(name).suffix.lower() in _NESTED_SUFFIXES


def normalize_name(raw: str) -> tuple[str, ...]:
    """A member's path as segments; refuse anything that could point outside the archive."""
    why = None
    if "\x00" in raw:
        why = "contains a NUL byte"
    elif "\\" in raw:
        why = "contains a backslash"
    elif raw.startswith("/"):
        why = "is absolute"
    elif _DRIVE.match(raw):
        why = "starts with a drive letter"
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if why is None and ".." in parts:
        why = "contains a '..' segment"
    if why is not None:
        raise _reject(
            f"archive member {clip(raw)!r} {why}; member names must be relative paths inside "
            "the archive",
            "unsafe_path",
            member=raw,
        )
    return tuple(parts)


MemberKind = Literal["file", "dir", "link", "special"]


@dataclass
class Member:
    """One entry of an archive as both readers see it."""

    name: str
    kind: MemberKind
    size: int
    compressed: int | None  # ZIP only
    encrypted: bool
    read: Callable[[int], bytes]


class _CountingReader(io.RawIOBase):
    """A decompressed stream that refuses to yield more than a cap or a compression ratio."""

    def __init__(self, inner: IO[bytes], compressed_size: int, limits: ArchiveLimits) -> None:
        self.inner = inner
        self.compressed_size = max(compressed_size, 1)
        self.limits = limits
        self.count = 0
        # Headers and padding are on top of the member data the caps count.
        self.cap = limits.max_total_bytes + 1536 * (limits.max_members + 16) + MiB

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.inner.read(len(view))
        n = len(data)
        view[:n] = data
        self.count += n
        if self.count > self.cap:
            raise _reject(
                f"the archive decompresses to more than {self.limits.max_total_bytes} bytes",
                "archive_too_large",
                status=413,
            )
        if (
            self.count > self.limits.ratio_floor_bytes
            and self.count > self.limits.max_ratio * self.compressed_size
        ):
            raise _reject(
                f"the archive decompresses more than {self.limits.max_ratio:g} times its size "
                f"({self.compressed_size} bytes): a decompression bomb",
                "decompression_bomb",
            )
        return n


def archive_kind(head: bytes) -> str | None:
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gz"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head[257:262] == b"ustar":
        return "tar"
    return None


ARCHIVE_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    EOFError,
    OSError,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,  # an unsupported ZIP compression method
    UnicodeDecodeError,
    ValueError,
)


def _decompressor(kind: str, raw: IO[bytes]) -> IO[bytes]:
    if kind == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if kind == "bz2":
        return bz2.BZ2File(raw, mode="rb")
    if kind == "xz":
        return lzma.LZMAFile(raw, mode="rb")
    return raw


def iter_members(path: Path, kind: str, limits: ArchiveLimits) -> Iterator[Member]:
    """Every entry of the archive in order; a member's ``read`` is valid until the next one."""
    if kind == "zip":
        yield from _zip_members(path, limits)
    else:
        yield from _tar_members(path, kind, limits)


def _zip_members(path: Path, limits: ArchiveLimits) -> Iterator[Member]:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise _reject(
                f"the archive has {len(infos)} members, more than {limits.max_members}",
                "archive_too_large",
                status=413,
            )
        for info in infos:

            def read(cap: int, info: zipfile.ZipInfo = info) -> bytes:
                with zf.open(info) as fh:
                    return fh.read(cap)

            yield Member(
                name=info.filename,
                kind=_zip_member_kind(info),
                size=info.file_size,
                compressed=info.compress_size,
                encrypted=bool(info.flag_bits & 0x1),
                read=read,
            )


def _zip_member_kind(info: zipfile.ZipInfo) -> MemberKind:
    fmt = stat.S_IFMT(info.external_attr >> 16)
    if fmt == stat.S_IFLNK:
        return "link"
    if info.is_dir() or fmt == stat.S_IFDIR:
        return "dir"
    if fmt in (0, stat.S_IFREG):
        return "file"
    return "special"


def _tar_members(path: Path, kind: str, limits: ArchiveLimits) -> Iterator[Member]:
    compressed_size = path.stat().st_size
    with path.open("rb") as raw:
        stream: IO[bytes] = _decompressor(kind, raw)
        with stream:
            counted = _CountingReader(stream, compressed_size, limits)
            # Stream mode ("r|"): strictly sequential reads through the counting reader, so the
            # caps bound every byte tarfile decompresses, headers and skipped members included.
            with tarfile.open(fileobj=counted, mode="r|") as tar:
                for n, member in enumerate(tar, start=1):
                    if n > limits.max_members:
                        raise _reject(
                            f"the archive has more than {limits.max_members} members",
                            "archive_too_large",
                            status=413,
                        )

                    def read(cap: int, member: tarfile.TarInfo = member) -> bytes:
                        fh = tar.extractfile(member)
                        if fh is None:
                            raise tarfile.ReadError(f"cannot read {member.name}")
                        return fh.read(cap)

                    yield Member(
                        name=member.name,
                        kind=_tar_member_kind(member),
                        size=member.size,
                        compressed=None,
                        encrypted=False,
                        read=read,
                    )


def _tar_member_kind(member: tarfile.TarInfo) -> MemberKind:
    if member.issym() or member.islnk():
        return "link"
    if member.isdir():
        return "dir"
    if member.isreg() and not member.issparse():
        return "file"
    return "special"
