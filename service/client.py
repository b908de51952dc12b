"""A Python client of the HTTP API (what the demo and a release pipeline use).

Every error the service sends is problem+json; the client raises it as :class:`ApiProblem`
with the status, the code and the detail, so a caller never has to parse HTML or guess.
"""

from __future__ import annotations

import email.utils
import io
import json
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
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

    def model(self, model_id: str) -> dict[str, Any]:
        """``GET /v1/models/{id}``."""
        result: dict[str, Any] = self._request("GET", f"/v1/models/{model_id}").json()
        return result

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        """``GET /v1/datasets/{id}`` (with the list of its images)."""
        result: dict[str, Any] = self._request("GET", f"/v1/datasets/{dataset_id}").json()
        return result

    def iter_list(self, path: str, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every item of a paginated list endpoint (``/v1/models``, ``/v1/datasets``, ...),
        page after page, newest first. A server configured with a smaller page limit than
        ``page_size`` is asked again with its own default page size."""
        offset = 0
        limit: int | None = page_size
        while True:
            params = {"offset": offset} if limit is None else {"limit": limit, "offset": offset}
            try:
                page: dict[str, Any] = self._request("GET", path, params=params).json()
            except ApiProblem as exc:
                if exc.code != "invalid_pagination" or limit is None:
                    raise
                limit = None
                continue
            items = page.get("items") or []
            yield from items
            if not page.get("next") or not items:
                return
            offset += len(items)

    def find_model_by_sha256(self, sha256: str) -> dict[str, Any] | None:
        """The tenant's live model whose file has this sha256, or None."""
        return next((m for m in self.iter_list("/v1/models") if m.get("sha256") == sha256), None)

    def find_dataset_by_sha256(self, sha256: str) -> dict[str, Any] | None:
        """The tenant's live dataset whose archive has this sha256, or None."""
        return next((d for d in self.iter_list("/v1/datasets") if d.get("sha256") == sha256), None)

    def upload_dataset_bytes(
        self, data: bytes, filename: str, metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """An archive already in memory (e.g. :func:`zip_folder_deterministic`'s)."""
        return self._upload("/v1/datasets", io.BytesIO(data), filename, metadata)

    def submit_audit(self, body: dict[str, Any], idempotency_key: str | None = None) -> Submitted:
        """``POST /v1/audits``, keeping what the headers say: whether the key replayed an
        earlier submission, and ``Retry-After``."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self._request("POST", "/v1/audits", json=body, headers=headers)
        return Submitted(
            audit=response.json(),
            replayed=response.headers.get("Idempotent-Replayed") == "true",
            retry_after_s=retry_after_seconds(response.headers.get("Retry-After")),
        )

    def audit_status(self, audit_id: str) -> tuple[dict[str, Any] | None, float | None]:
        """One poll of ``GET /v1/audits/{id}``: ``(audit, Retry-After seconds or None)``.

        A 429 or 503 answer that carries ``Retry-After`` (the service briefly without its
        database) gives ``(None, seconds)`` instead of raising: the caller waits and asks again.
        Any other error raises :class:`ApiProblem`.
        """
        response = self.http.request(
            "GET", f"{self.base_url}/v1/audits/{audit_id}", timeout=self.timeout_s
        )
        retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        if response.status_code in (429, 503) and retry_after is not None:
            return None, retry_after
        if response.status_code >= 400:
            raise problem_of(response)
        result: dict[str, Any] = response.json()
        return result, retry_after


@dataclass(frozen=True)
class Submitted:
    """What ``POST /v1/audits`` answered: the audit, whether an ``Idempotency-Key`` attached
    to an earlier submission, and the ``Retry-After`` the service asks polls to keep."""

    audit: dict[str, Any]
    replayed: bool
    retry_after_s: float | None


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` in seconds: a number of seconds or an HTTP date; None when absent or
    unreadable. Never negative."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def problem_of(response: requests.Response) -> ApiProblem:
    """The :class:`ApiProblem` of an error response (problem+json, or its text)."""
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text[:500]}
    return ApiProblem(response.status_code, body if isinstance(body, dict) else {})


def zip_folder(folder: Path) -> bytes:
    """The folder's files as a zip (paths relative to it; hidden files left out)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if path.is_file() and not any(p.startswith(".") for p in relative.parts):
                archive.write(path, relative.as_posix())
    return buffer.getvalue()


ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def zip_folder_deterministic(
    folder: Path, skip: Callable[[tuple[str, ...]], bool] | None = None
) -> bytes:
    """The folder's files as a zip whose bytes depend only on the files' relative paths and
    contents (:func:`zip_members_deterministic`). Hidden files are left out, as in
    :func:`zip_folder`; ``skip(path segments)``, when given, decides instead."""
    entries = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if not path.is_file():
            continue
        skipped = skip(relative.parts) if skip else any(p.startswith(".") for p in relative.parts)
        if not skipped:
            entries.append((relative.as_posix(), path.read_bytes))
    return zip_members_deterministic(entries)


def zip_members_deterministic(members: Iterable[tuple[str, Callable[[], bytes]]]) -> bytes:
    """``(name, read)`` pairs as a zip whose bytes depend only on the names and contents:
    names sorted, every timestamp 1980-01-01, the same permissions, so the archive's sha256 is
    the same on every run and machine (what lets a release gate find an upload the service
    already has). Members are stored, not deflated (images are compressed already, and no
    compressor version can change the bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, read in sorted(members, key=lambda member: member[0]):
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED  # no compressor version in the bytes
            info.external_attr = 0o100644 << 16
            info.create_system = 3  # unix, whatever the machine
            archive.writestr(info, read())
    return buffer.getvalue()
