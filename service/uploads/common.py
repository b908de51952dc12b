"""What every upload check shares: size units, the one refusal type, and safe text from a file.

Imports only the standard library: every format module builds on it, and the API process
imports them all.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

MiB = 1 << 20
GiB = 1 << 30


class UploadRejected(Exception):
    """An upload refused, with what the HTTP layer needs to answer.

    ``status`` is 400, 413 (a size limit exceeded), 415 (format not recognized) or 422 (the
    right kind of file, but malformed or unsafe); ``code`` is a short stable slug; ``detail`` a
    sentence for a human; ``extra`` JSON-able fields such as the offending ``member``.
    """

    def __init__(
        self, detail: str, *, status: int = 422, code: str = "invalid_upload", **extra: Any
    ) -> None:
        if status not in (400, 413, 415, 422):
            raise ValueError(f"UploadRejected status must be 400, 413, 415 or 422, not {status}")
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code
        self.extra: dict[str, Any] = extra

    def to_dict(self) -> dict[str, Any]:
        """``{"status", "code", "detail", **extra}``, ready for a problem+json body."""
        return {"status": self.status, "code": self.code, "detail": self.detail, **self.extra}

    def __repr__(self) -> str:
        return f"UploadRejected({self.status}, {self.code!r}, {self.detail!r})"


def clip(text: str, limit: int = 200) -> str:
    """Names from a hostile file go into messages: keep them printable and short."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


# A name is shown in listings, reports and file dialogs: a control character hides or garbles
# it, and a bidirectional override or isolate (or an invisible direction mark) makes
# "report\u202egpj.exe" display as "reportexe.jpg". Such names are refused rather than
# cleaned, so that what is stored is exactly what the client sent.
_UNSAFE_IN_NAME = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def unsafe_name_character(name: str) -> str | None:
    """The first character a name may not hold, as ``U+XXXX``, or None."""
    found = _UNSAFE_IN_NAME.search(name)
    return None if found is None else f"U+{ord(found.group()):04X}"


# ``tests/service/test_openapi.py`` collects the (status, code) pairs that calls of
# ``UploadRejected`` and ``_reject`` name, to compare with the documented ones: keep both names.
def _reject(
    detail: str, code: str, *, status: int = 422, member: str | None = None, **extra: Any
) -> UploadRejected:
    """An :class:`UploadRejected` about an archive member, whose name is clipped."""
    if member is not None:
        extra["member"] = clip(member)
    return UploadRejected(detail, status=status, code=code, **extra)


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads`: a key twice is an error, not a choice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {clip(key)!r}")
        out[key] = value
    return out


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


ModelFormat = Literal["onnx", "safetensors", "torch"]


@dataclass(frozen=True)
class ModelInfo:
    """What an accepted model file is. Shapes are ONNX's (a dim is an int, a name or None);
    ``output`` and ``output_shape`` are those of the graph output an audit explains."""

    format: ModelFormat
    opset: int | None
    input_shape: list[int | str | None] | None
    output_shape: list[int | str | None] | None
    num_classes: int | None
    tensors: int
    parameters: int  # elements over all tensors, buffers included
    notes: list[str] = field(default_factory=list)
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_file_size(path: Path, filename: str, max_bytes: int) -> int:
    size = path.stat().st_size
    if size == 0:
        raise UploadRejected(f"{clip(filename)}: the file is empty", code="empty_file")
    if size > max_bytes:
        raise UploadRejected(
            f"{clip(filename)}: {size} bytes exceeds the limit of {max_bytes} bytes",
            status=413,
            code="file_too_large",
            size=size,
            limit=max_bytes,
        )
    return size
