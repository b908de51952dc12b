"""Large ONNX files are checked in a child process (the API process's memory does not grow with
them); the child gives exactly the answers of the in-process check."""

from __future__ import annotations

from pathlib import Path

import pytest

from saliency_audit.service import uploads
from saliency_audit.service.uploads import onnx_model
from tests.service.hostile import hostile_models

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "reference"
ONNX_CASES = [
    c
    for c in hostile_models()
    if c.expected_code in ("onnx_external_data", "invalid_onnx", "unsupported_format")
]


def _inspect(path: Path, isolated: bool, monkeypatch: pytest.MonkeyPatch) -> object:
    monkeypatch.setattr(onnx_model, "ONNX_IN_PROCESS_MAX_BYTES", 0 if isolated else 1 << 40)
    try:
        return uploads.inspect_model(path, path.name, architecture=None, max_bytes=1 << 31)
    except uploads.UploadRejected as exc:
        return (exc.status, exc.code, exc.detail, exc.extra)


def test_the_child_process_check_accepts_what_the_in_process_one_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = REFERENCE / "digits_small_cnn.onnx"
    isolated = _inspect(path, True, monkeypatch)
    assert isinstance(isolated, uploads.ModelInfo) and isolated.format == "onnx"
    assert isolated == _inspect(path, False, monkeypatch)


@pytest.mark.parametrize("case", ONNX_CASES, ids=[c.name for c in ONNX_CASES])
def test_the_child_process_check_refuses_what_the_in_process_one_refuses(
    case: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / case.filename  # type: ignore[attr-defined]
    path.write_bytes(case.data)  # type: ignore[attr-defined]
    isolated = _inspect(path, True, monkeypatch)
    assert isinstance(isolated, tuple)
    assert isolated[:2] == (case.expected_status, case.expected_code)  # type: ignore[attr-defined]
    assert isolated == _inspect(path, False, monkeypatch)
