"""A split audit on two CPU workers against the same audit on one worker, end to end.

The production shape on this machine (a fresh PostgreSQL database, Redis, ``serve
--no-worker``), three configurations: A, one Celery worker with one torch thread (a worker per
core, as GPU workers are one per GPU) and ``audit_parts=1``; B, two such workers and
``audit_parts=2`` (each worker computes one part; the audit's worker merges); C, one worker
with torch's default threads (both cores for one process) and ``audit_parts=1``. All get the
same audit (every method but Score-CAM, cascading and independent randomization, the digits
CNN); the time is from submission to ``succeeded``. The order of A, B, C rotates run by run so
all see the same machine load, and every result is compared with A's of the same run (same
seed) for identity (scores, intervals, verdicts).

    .venv/bin/python bench/scale_out.py --repeats 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import psycopg
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from saliency_audit.service.config import Config  # noqa: E402
from saliency_audit.service.embedded import config_environment, worker_command  # noqa: E402

PG = "postgresql://127.0.0.1:5432/test"
METHODS = [
    "gradient",
    "gradient_x_input",
    "gradcam",
    "gradcam_pp",
    "smoothgrad",
    "smoothgrad_sq",
    "vargrad",
    "integrated_gradients",
    "guided_backprop",
    "guided_gradcam",
    "lrp",
    "relevance_cam",
]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def wait_ready(url: str) -> None:
    for _ in range(200):
        try:
            if requests.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start")


def wait_worker(log: Path) -> None:
    for _ in range(600):
        if log.exists() and " ready." in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise SystemExit(f"worker not ready: {log}")


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    return {k: report[k] for k in ("verdicts", "tests", "images", "fidelity")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()

    name = f"sa_scale_{secrets.token_hex(3)}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    workdir = Path(tempfile.mkdtemp(prefix="sa-scale-"))
    base = Config(
        data_dir=workdir,
        database_url=f"postgresql+psycopg://127.0.0.1:5432/{name}",
        broker_url="redis://127.0.0.1:6379/13",
        artifact_dir=workdir / "artifacts",
        reconcile_in_api=False,
    )
    shapes = {
        "A": base.with_overrides(queue="gpu-a", cpu_queue="cpu-a", audit_parts=1),
        "B": base.with_overrides(queue="gpu-b", cpu_queue="cpu-b", audit_parts=2),
        "C": base.with_overrides(queue="gpu-c", cpu_queue="cpu-c", audit_parts=1),
    }
    workers_of = {"A": 1, "B": 2, "C": 1}
    cli = [sys.executable, "-m", "saliency_audit.service.cli"]
    env = config_environment(base)
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True)
    key = subprocess.run(
        [*cli, "keys", "create", "--tenant", "bench"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    processes: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    try:
        for index, (label, config) in enumerate(shapes.items()):
            port = 8721 + index
            urls[label] = f"http://127.0.0.1:{port}"
            shape_env = config_environment(config)
            processes.append(
                start(
                    [*cli, "serve", "--no-worker", "--port", str(port)],
                    shape_env,
                    workdir / f"server-{label}.log",
                )
            )
            for w in range(workers_of[label]):
                worker_env = dict(shape_env)
                if label in ("A", "B"):
                    worker_env["OMP_NUM_THREADS"] = "1"  # one core per worker process
                log = workdir / f"worker-{label}{w}.log"
                processes.append(start(worker_command(config, [config.queue]), worker_env, log))
                wait_worker(log)
            wait_ready(urls[label])
        auth = {"Authorization": f"Bearer {key}"}
        model = requests.post(
            urls["A"] + "/v1/models",
            headers=auth,
            files={
                "file": ("m.onnx", (REPO / "examples/reference/digits_small_cnn.onnx").read_bytes())
            },
        ).json()
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for p in sorted((REPO / "examples/reference/digits_images").glob("*.png"))[
                : args.images
            ]:
                archive.write(p, p.name)
        dataset = requests.post(
            urls["A"] + "/v1/datasets", headers=auth, files={"file": ("d.zip", buffer.getvalue())}
        ).json()
        times: dict[str, list[float]] = {label: [] for label in shapes}
        reports: dict[tuple[str, int], dict[str, Any]] = {}
        for run in range(args.repeats + 1):  # run 0 warms up both shapes (imports, caches)
            order = list(shapes)
            for label in order[run % 3 :] + order[: run % 3]:
                t0 = time.perf_counter()
                audit = requests.post(
                    urls[label] + "/v1/audits",
                    headers=auth,
                    json={
                        "model_id": model["id"],
                        "dataset_id": dataset["id"],
                        "methods": METHODS,
                        "tests": ["cascading", "independent"],
                        "seed": run,
                    },
                ).json()
                while True:
                    state = requests.get(
                        urls[label] + f"/v1/audits/{audit['id']}", headers=auth
                    ).json()
                    if state["state"] in ("succeeded", "failed", "canceled"):
                        break
                    time.sleep(0.2)
                elapsed = time.perf_counter() - t0
                if state["state"] != "succeeded":
                    raise SystemExit(f"{label}: {state}")
                report = requests.get(
                    urls[label] + f"/v1/audits/{audit['id']}/report.json", headers=auth
                ).json()
                reports[(label, run)] = comparable(report)
                if run > 0:
                    times[label].append(elapsed)
                print(f"run {run} {label}: {elapsed:.1f} s", flush=True)
        # A and B of the same run share the seed: their results must be the same
        identical = all(reports[("A", r)] == reports[("B", r)] for r in range(args.repeats + 1))
        median = {k: statistics.median(v) for k, v in times.items()}
        print(
            json.dumps(
                {
                    "times_s": times,
                    "median_s": median,
                    "speedup_b_over_a": median["A"] / median["B"],
                    "speedup_b_over_c": median["C"] / median["B"],
                    "identical": identical,
                },
                indent=2,
            )
        )
    finally:
        for process in processes:
            stop(process)
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
