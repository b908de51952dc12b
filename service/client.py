"""A Python client of the HTTP API (what the demo and a release pipeline use).

Every error the service sends is problem+json; the client raises it as :class:`ApiProblem`
with the status, the code and the detail, so a caller never has to parse HTML or guess.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import requests


class ApiProblem(Exception):
    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.code = str(problem.get("code", "http_error"))
        self.detail = str(problem.get("detail", ""))
        super().__init__(f"{status} {self.code}: {self.detail}")


class Client:
    def __init__(self, base_url: str, api_key: str, timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {api_key}"

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout_s)
        response = self.http.request(method, self.base_url + path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"detail": response.text[:500]}
            raise ApiProblem(response.status_code, body if isinstance(body, dict) else {})
        return response

    def _upload(
        self, path: str, file: BinaryIO, filename: str, metadata: dict[str, Any] | None
    ) -> dict[str, Any]:
        files: dict[str, Any] = {"file": (filename, file, "application/octet-stream")}
        if metadata:
            files["metadata"] = (None, json.dumps(metadata), "application/json")
        result: dict[str, Any] = self._request("POST", path, files=files).json()
        return result

    def upload_model(self, path: Path, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        with open(path, "rb") as handle:
            return self._upload("/v1/models", handle, path.name, metadata)

    def upload_dataset(self, path: Path, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """A zip or tar archive, or a folder (zipped on the fly, sub-folders kept)."""
        if path.is_dir():
            return self._upload(
                "/v1/datasets", io.BytesIO(zip_folder(path)), f"{path.name}.zip", metadata
            )
        with open(path, "rb") as handle:
            return self._upload("/v1/datasets", handle, path.name, metadata)

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        result: dict[str, Any] = self._request(
            "POST", "/v1/audits", json=body, headers=headers
        ).json()
        return result

    def audit(self, audit_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/audits/{audit_id}").json()
        return result

    def cancel(self, audit_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("DELETE", f"/v1/audits/{audit_id}").json()
        return result

    def report(self, audit_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/audits/{audit_id}/report.json").json()
        return result

    def wait(
        self,
        audit_id: str,
        timeout_s: float = 3600.0,
        poll_s: float = 1.0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the audit is succeeded, failed or canceled; TimeoutError past
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            audit = self.audit(audit_id)
            if on_progress is not None:
                on_progress(audit)
            if audit["state"] in ("succeeded", "failed", "canceled"):
                return audit
            if time.monotonic() > deadline:
                raise TimeoutError(f"audit {audit_id} still {audit['state']} after {timeout_s} s")
            time.sleep(poll_s)


def zip_folder(folder: Path) -> bytes:
    """The folder's files as a zip (paths relative to it; hidden files left out)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if path.is_file() and not any(p.startswith(".") for p in relative.parts):
                archive.write(path, relative.as_posix())
    return buffer.getvalue()
