"""Load on the API over loopback: submit and status latency at fixed request rates, and the
API process's memory while it receives a 1 GB upload.

The production shape (a fresh PostgreSQL database on 127.0.0.1:5432, Redis on 6379, the API
under gunicorn as the Dockerfile runs it, ``--workers`` processes of ``--threads`` threads, or
``--server waitress`` for ``saliency-audit serve --no-worker``); no worker runs, so submitted
audits stay queued and the numbers are the API's own. The load is open-loop: requests are
sent on a fixed schedule (``--rates`` per second for ``--seconds``) by a bounded pool of
client threads, whatever the earlier ones are doing, and each latency is measured from the
moment its request was due, so a server that falls behind shows it. Everything stays on this
machine.

    .venv/bin/python bench/load/run.py --rates 50,100 --seconds 20 --repeats 3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psycopg
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from saliency_audit.service.config import Config  # noqa: E402
from saliency_audit.service.embedded import config_environment  # noqa: E402

PG = "postgresql://127.0.0.1:5432/test"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def open_loop(
    rate: float, seconds: float, call: Callable[[int], None], threads: int = 64
) -> list[float]:
    """Latencies (s) of rate x seconds calls, each timed from when it was due."""
    n = int(rate * seconds)
    start = time.perf_counter() + 0.5
    latencies: list[float] = [0.0] * n
    errors: list[str] = []

    def one(i: int) -> None:
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            call(i)
        except Exception as exc:  # counted, and the run is reported as failed
            errors.append(repr(exc))
        latencies[i] = time.perf_counter() - due

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} requests failed, e.g. {errors[0]}")
    return latencies


def api_processes(pid: int) -> list[int]:
    """The server process and its children (gunicorn's workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(c) for c in children)]


def rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def big_archive(path: Path, total_bytes: int) -> int:
    """A zip of noise PNGs (incompressible, each well under the 50 MB member limit)."""
    rng = np.random.default_rng(0)
    written = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        i = 0
        while written < total_bytes:
            pixels = rng.integers(0, 256, size=(2600, 2600, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
            archive.writestr(f"noise_{i:03d}.png", buffer.getvalue())
            written += len(buffer.getvalue())
            i += 1
    return path.stat().st_size


def big_onnx(path: Path, total_bytes: int) -> int:
    """A valid ONNX graph (y = x) carrying one initializer of ``total_bytes`` zeros."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.zeros(total_bytes // 4, dtype=np.float32), "big")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[weights],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path.stat().st_size


def multipart_stream(path: Path, boundary: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{path.name}"\r\nContent-Type: application/zip\r\n\r\n'
    ).encode()
    with open(path, "rb") as handle:
        while data := handle.read(chunk):
            yield data
    yield f"\r\n--{boundary}--\r\n".encode()


def measure_upload(
    server_pid: int, endpoint: str, auth: dict[str, str], upload_path: Path, size: int
) -> dict[str, object]:
    """Stream one file as a multipart upload and sample the API processes' RSS meanwhile."""
    pids = api_processes(server_pid)
    before = {p: rss_kib(p)[0] for p in pids}
    boundary = uuid.uuid4().hex
    growth = [0]
    stop = threading.Event()

    def watch() -> None:
        # the largest growth of any one API process (the one that receives the upload)
        while not stop.is_set():
            growth[0] = max(growth[0], *(rss_kib(p)[0] - before[p] for p in pids))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.perf_counter()
    response = requests.post(
        endpoint,
        headers={**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        data=multipart_stream(upload_path, boundary),
        timeout=1800,
    )
    seconds = time.perf_counter() - t0
    stop.set()
    watcher.join()
    body = response.json()
    return {
        "bytes": size,
        "status": response.status_code,
        "n_images": body.get("n_images"),
        "format": body.get("format"),
        "seconds": seconds,
        "rss_before_mib": {str(p): v / 1024 for p, v in before.items()},
        "rss_growth_mib": growth[0] / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rates", default="50,100")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server", choices=("gunicorn", "waitress"), default="gunicorn")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=8, help="threads per API process")
    parser.add_argument("--upload-gb", type=float, default=1.0)
    parser.add_argument("--only-uploads", action="store_true", help="skip the latency runs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    name = f"sa_load_{secrets.token_hex(3)}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    workdir = Path(tempfile.mkdtemp(prefix="sa-load-"))
    config = Config(
        data_dir=workdir,
        database_url=f"postgresql+psycopg://127.0.0.1:5432/{name}",
        broker_url="redis://127.0.0.1:6379/12",
        queue=f"gpu-load-{secrets.token_hex(3)}",
        reconcile_in_api=False,
    )
    env = config_environment(config)
    cli = [sys.executable, "-m", "saliency_audit.service.cli"]
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True)
    key = subprocess.run(
        [*cli, "keys", "create", "--tenant", "load"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    port = 8711
    if args.server == "gunicorn":
        command = [
            sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}",
            "--workers", str(args.workers), "--threads", str(args.threads),
            "--timeout", "1800", "saliency_audit.service.app:create_app()",
        ]  # fmt: skip
    else:
        command = [
            *cli,
            "serve",
            "--no-worker",
            "--port",
            str(port),
            "--threads",
            str(args.threads),
        ]
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO
    )
    url = f"http://127.0.0.1:{port}"
    results: dict[str, object] = {}
    try:
        for _ in range(100):
            try:
                if requests.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        auth = {"Authorization": f"Bearer {key}"}
        http = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=64, pool_maxsize=64)
        http.mount("http://", adapter)
        onnx_bytes = (REPO / "examples/reference/digits_small_cnn.onnx").read_bytes()
        model = http.post(
            url + "/v1/models", headers=auth, files={"file": ("m.onnx", onnx_bytes)}
        ).json()
        images = sorted((REPO / "examples/reference/digits_images").glob("*.png"))[:4]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for p in images:
                archive.write(p, p.name)
        dataset = http.post(
            url + "/v1/datasets", headers=auth, files={"file": ("d.zip", buffer.getvalue())}
        ).json()
        body = {"model_id": model["id"], "dataset_id": dataset["id"], "methods": ["gradient"]}
        ids: list[str] = []
        lock = threading.Lock()

        def submit(i: int) -> None:
            r = http.post(
                url + "/v1/audits",
                json=body,
                headers={**auth, "Idempotency-Key": str(uuid.uuid4())},
                timeout=30,
            )
            if r.status_code != 202:
                raise RuntimeError(f"submit answered {r.status_code}")
            with lock:
                ids.append(r.json()["id"])

        def status(i: int) -> None:
            r = http.get(url + f"/v1/audits/{ids[i % len(ids)]}", headers=auth, timeout=30)
            if r.status_code != 200:
                raise RuntimeError(f"status answered {r.status_code}")

        open_loop(20, 2, submit)  # warm-up: pools, caches, the first audits to read
        for rate in (float(r) for r in args.rates.split(",") if not args.only_uploads):
            for kind, call in (("submit", submit), ("status", status)):
                runs = []
                for _ in range(args.repeats):
                    lat = open_loop(rate, args.seconds, call)
                    p50, p99 = percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3
                    runs.append({"p50_ms": p50, "p99_ms": p99})
                    print(f"{kind} @ {rate:g}/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms", flush=True)
                results[f"{kind}@{rate:g}"] = {
                    "runs": runs,
                    "median_p50_ms": statistics.median(r["p50_ms"] for r in runs),
                    "median_p99_ms": statistics.median(r["p99_ms"] for r in runs),
                }

        for kind, endpoint, make in (
            ("dataset", "/v1/datasets", big_archive),
            ("model", "/v1/models", big_onnx),
        ):
            upload_path = workdir / ("big.zip" if kind == "dataset" else "big.onnx")
            size = make(upload_path, int(args.upload_gb * 1e9))
            results[f"upload_{kind}"] = measure_upload(
                server.pid, url + endpoint, auth, upload_path, size
            )
            print(json.dumps({kind: results[f"upload_{kind}"]}), flush=True)
            upload_path.unlink()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
