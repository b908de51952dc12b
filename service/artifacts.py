"""Content-addressed artifact store on disk.

A file is stored once under ``root/ab/cd/<sha256>``, whoever uploads or produces it; rows refer
to it by sha256. Writes go to a temporary file in the same folder tree first and are renamed into
place, so a reader never sees half a file and a crash leaves at most a stray temporary file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ArtifactMissing(LookupError):
    pass


class TooLarge(ValueError):
    """A stream ran past the size limit it was received under."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class Received:
    """An upload copied to the store's temporary folder, hashed, not yet committed."""

    path: Path
    sha256: str
    size: int


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.exists(sha):
            with self._staged() as (handle, tmp_path):
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            self._commit(tmp_path, sha)
        return sha

    def stage_bytes(self, data: bytes) -> Received:
        """Bytes written to the temporary folder, hashed, not yet in the store: :meth:`commit`
        puts them in place, :meth:`discard` drops them."""
        with self._staged() as (handle, tmp_path):
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return Received(tmp_path, hashlib.sha256(data).hexdigest(), len(data))

    def receive(self, stream: BinaryIO, max_bytes: int) -> Received:
        """Stream an upload to a temporary file, hashing as it goes, and stop with
        :class:`TooLarge` past ``max_bytes``. Nothing is in the store until :meth:`commit`."""
        digest = hashlib.sha256()
        size = 0
        with self._staged() as (handle, tmp_path):
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(max_bytes)
                digest.update(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        return Received(tmp_path, digest.hexdigest(), size)

    def commit(self, received: Received) -> str:
        if self.exists(received.sha256):
            received.path.unlink(missing_ok=True)
        else:
            self._commit(received.path, received.sha256)
        return received.sha256

    def discard(self, received: Received) -> None:
        received.path.unlink(missing_ok=True)

    def read_bytes(self, sha256: str) -> bytes:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise ArtifactMissing(sha256) from None

    def open(self, sha256: str) -> BinaryIO:
        try:
            return open(self.path(sha256), "rb")
        except FileNotFoundError:
            raise ArtifactMissing(sha256) from None

    def delete(self, sha256: str) -> int | None:
        """Remove a file; its size in bytes, or None when it was not there. Whether any row
        still needs it is the caller's question (:mod:`saliency_audit.service.purge`)."""
        path = self.path(sha256)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return None
        return size

    def stored(self) -> Iterator[tuple[str, os.stat_result]]:
        """Every file in the store (not the temporary folder), with its stat."""
        for path in self.root.glob("??/??/*"):
            if SHA256_RE.match(path.name) and path.parent.parent.name == path.name[:2]:
                try:
                    yield path.name, path.stat()
                except FileNotFoundError:  # removed meanwhile
                    continue

    @contextmanager
    def _staged(self) -> Iterator[tuple[BinaryIO, Path]]:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="put-")
        tmp_path = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle, tmp_path
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise

    def _commit(self, tmp_path: Path, sha256: str) -> None:
        final = self.path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_path, final)
