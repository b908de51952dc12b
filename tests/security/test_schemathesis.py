"""schemathesis against the running API's own /openapi.json: generated requests (coverage,
fuzzing and stateful phases) get no 5xx, and every response conforms to the document (status
code, content type, headers, body schema)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from saliency_audit.service.db import Database
from tests.servers import Server, new_key

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


def test_generated_requests_get_no_5xx_and_conforming_responses(
    pg_server: Server, pg_database: Database, tmp_path: Path
) -> None:
    st = shutil.which("st", path=str(Path(__file__).resolve().parents[2] / ".venv" / "bin"))
    assert st is not None, "schemathesis is not installed (it is in the dev extra)"
    key = new_key(pg_database)
    done = subprocess.run(
        [
            st,
            "run",
            f"{pg_server.url}/openapi.json",
            "-H",
            f"Authorization: Bearer {key}",
            "--checks",
            CHECKS,
            "--max-examples",
            "15",
            "--seed",
            "1",
            "--request-timeout",
            "30",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "generated" in output and " failed" not in output.split("Test cases:")[-1], output[
        -3000:
    ]
    # the service is still up afterwards
    assert "passed" in output
