"""What each command of ``saliency-audit`` loads: ``serve`` runs the API, so it must load
neither the HTTP client (``requests``, :mod:`saliency_audit.service.client`,
:mod:`saliency_audit.service.gate`) nor torch;
the command line's modules import no command's dependencies at module level.

Each check runs in a fresh interpreter, so modules an earlier test imported cannot hide one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.servers import REPO

SERVE = textwrap.dedent(
    """
    import sys
    import waitress

    class Server:
        effective_port = 0

        def run(self):
            pass

        def close(self):
            pass

    waitress.create_server = lambda app, **options: Server()

    from saliency_audit.service.cli import main
    from saliency_audit.service.config import Config
    from saliency_audit.service.jobs import Enqueuer

    assert main(["serve", "--port", "0", "--no-worker"]) == 0
    # the Celery app the API sends tasks with (built by the same factory as the workers')
    Enqueuer(Config.from_env()).app
    loaded = [
        m
        for m in (
            "requests", "saliency_audit.service.client", "saliency_audit.service.gate", "torch",
            "torchvision",
        )
        if m in sys.modules
    ]
    assert not loaded, f"serve imported {loaded}"
    print("OK serve")
    """
)

PARSER = textwrap.dedent(
    """
    import sys

    from saliency_audit.service.cli import build_parser

    parser = build_parser()
    parser.parse_args(["gate", "--model", "m.onnx", "--images", "i", "--methods", "gradient",
                       "--require", "gradient"])
    parser.parse_args(["run", "--model", "m.onnx", "--images", "i"])
    loaded = [
        m
        for m in (
            "requests", "saliency_audit.service.gate", "saliency_audit.workers.local",
            "saliency_audit.workers.engine", "numpy",
        )
        if m in sys.modules
    ]
    assert not loaded, f"building the parser imported {loaded}"
    print("OK parser")
    """
)


def _run(script: str, tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALIENCY_AUDIT_")}
    env.pop("DATABASE_URL", None)
    env.pop("BROKER_URL", None)
    env["SALIENCY_AUDIT_DATA_DIR"] = str(tmp_path / "data")
    env["SALIENCY_AUDIT_RECONCILE_IN_API"] = "false"
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_serve_loads_neither_the_http_client_nor_torch(tmp_path: Path) -> None:
    assert "OK serve" in _run(SERVE, tmp_path)


def test_building_the_parser_loads_no_command(tmp_path: Path) -> None:
    assert "OK parser" in _run(PARSER, tmp_path)
