"""``make demo``: a real audit of the bundled sample model, over HTTP, against the embedded
service.

It starts ``saliency-audit serve`` with a fresh data folder (SQLite, artifact folder, a Celery
worker on the SQLAlchemy transport: no server to install), creates an API key, uploads
``examples/reference/shapes_small_resnet.onnx`` and the bundled shape images, submits an audit
of every method with the cascading randomization test, follows its progress, prints the
method and verdict tables, writes ``report.json``, ``report.pdf`` and ``report.html`` to the
output folder and stops the service.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from saliency_audit.service.client import Client
from saliency_audit.workers.reports.text import format_summary

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "examples" / "reference" / "shapes_small_resnet.onnx"
IMAGES = REPO / "examples" / "reference" / "shapes_images"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cli(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "saliency_audit.service.cli", *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def wait_ready(url: str, server: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: the service exited with code {server.returncode}")
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise SystemExit("error: the service did not become ready in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--methods", default=None, help="comma-separated (default: all)")
    args = parser.parse_args()
    out: Path = args.out
    data_dir = out / "service-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SALIENCY_AUDIT_") and k not in ("DATABASE_URL", "BROKER_URL")
    }
    env["SALIENCY_AUDIT_DATA_DIR"] = str(data_dir.resolve())
    env["PYTHONUNBUFFERED"] = "1"
    cli("db", "upgrade", env=env)
    key = cli("keys", "create", "--tenant", "demo", env=env)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = open(out / "service.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "saliency_audit.service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=server_log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(url, server)
        print(f"service ready at {url} (embedded; data in {data_dir})")
        client = Client(url, key)
        model = client.upload_model(MODEL)
        dataset = client.upload_dataset(IMAGES, {"name": "shapes sample images"})
        print(
            f"uploaded model {model['id']} ({model['format']}, {model['size_bytes']} bytes) "
            f"and dataset {dataset['id']} ({dataset['n_images']} images)"
        )
        methods = (
            args.methods.split(",")
            if args.methods
            else [m["name"] for m in client._request("GET", "/v1/methods").json()["methods"]]
        )
        audit = client.submit(
            {
                "model_id": model["id"],
                "dataset_id": dataset["id"],
                "methods": [m for m in methods if not m.startswith("control_")],
                "tests": ["cascading"],
                "seed": 0,
            },
            idempotency_key=f"demo-{model['sha256'][:12]}",
        )
        print(f"audit {audit['id']} queued; following {url}{audit['links']['self']}")
        last = [""]

        def show(state: dict[str, object]) -> None:
            line = f"  [{float(state['progress']) * 100:5.1f}%] {state['state']}: {state['step']}"  # type: ignore[arg-type]
            if line != last[0]:
                print(line, flush=True)
                last[0] = line

        final = client.wait(audit["id"], timeout_s=1800, poll_s=1.0, on_progress=show)
        if final["state"] != "succeeded":
            print(f"error: the audit {final['state']}: {final.get('error')}", file=sys.stderr)
            return 1
        report = client._request("GET", f"/v1/audits/{audit['id']}/report.json").content
        (out / "report.json").write_bytes(report)
        print()
        print(format_summary(client.report(audit["id"])))
        # the PDF and HTML reports are rendered on the CPU queue right after the audit
        deadline = time.monotonic() + 300
        while client.audit(audit["id"])["documents_state"] not in ("ready", "failed"):
            if time.monotonic() > deadline:
                print("error: the reports were not rendered in time", file=sys.stderr)
                return 1
            time.sleep(1.0)
        written = [out / "report.json"]
        for path, name in (("report.pdf", "report.pdf"), ("report", "report.html")):
            data = client._request("GET", f"/v1/audits/{audit['id']}/{path}").content
            (out / name).write_bytes(data)
            written.append(out / name)
        print(f"\nwrote {', '.join(map(str, written))}; service log in {out / 'service.log'}")
        return 0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()


if __name__ == "__main__":
    sys.exit(main())
