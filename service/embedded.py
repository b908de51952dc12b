"""``saliency-audit serve``: the API, and in embedded mode its worker, from one command.

Embedded (no ``DATABASE_URL`` / ``BROKER_URL``): the schema is brought up to date in the SQLite
file, a real Celery worker process is started on the SQLAlchemy transport (no broker server),
and the API runs the reconciler in a thread. With a database and broker configured, ``serve``
runs only the API (workers are separate ``celery -A saliency_audit.workers worker -Q gpu``
processes) unless
``--worker`` asks for one beside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from types import FrameType
from typing import Any

from .config import PREFIX, Config

log = logging.getLogger(__name__)


def config_environment(config: Config, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables that give a child process exactly this configuration."""
    env = dict(os.environ if base is None else base)
    for f in fields(config):
        value = getattr(config, f.name)
        if value is None:
            env.pop(PREFIX + f.name.upper(), None)
            continue
        env[PREFIX + f.name.upper()] = str(value)
    env.pop("DATABASE_URL", None)
    env.pop("BROKER_URL", None)
    return env


def worker_command(
    config: Config, queues: list[str] | None = None, loglevel: str = "INFO"
) -> list[str]:
    """A Celery worker on ``queues`` (default: the audit queue and the CPU queue, as the
    embedded service runs one worker for everything)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "saliency_audit.workers",
        "worker",
        "-Q",
        ",".join(queues or [config.queue, config.cpu_queue]),
        "--pool",
        "prefork",
        "--concurrency",
        "1",
        "--prefetch-multiplier",
        "1",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        loglevel,
    ]


def start_worker(
    config: Config, log_path: Path | None = None, queues: list[str] | None = None
) -> subprocess.Popen[bytes]:
    out = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 (kept open)
    return subprocess.Popen(
        worker_command(config, queues),
        env=config_environment(config),
        stdout=out or None,
        stderr=subprocess.STDOUT if out else None,
        start_new_session=True,
    )


def stop_worker(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """Drain the worker, then SIGKILL what is left after ``timeout_s``.

    SIGTERM goes to the worker's parent process only: its warm shutdown passes it on to the
    pool child, which lets the running audit finish within ``drain_grace_s`` or hands it back
    (workers/tasks.py). Sent to the whole process group it would reach the child twice."""
    if process.poll() is not None:
        return
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=timeout_s)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def problem_channel_class() -> type:
    """Waitress's HTTP channel, answering the errors Waitress raises itself (a body over
    ``max_request_body_size``, a malformed request line or chunk) as ``application/problem+json``
    like every error of the app, instead of its plain-text page."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    from .problems import PROBLEM_JSON, TYPE_BASE

    codes = {400: "bad_request", 413: "payload_too_large", 431: "headers_too_large"}

    class ProblemErrorTask(ErrorTask):
        def execute(self) -> None:
            error = self.request.error
            code = codes.get(error.code, "http_error")
            body = json.dumps(
                {
                    "type": TYPE_BASE + code,
                    "title": error.reason,
                    "status": error.code,
                    "detail": str(error.body),
                    "code": code,
                    "instance": self.request.path or None,
                }
            ).encode()
            self.status = f"{error.code} {error.reason}"
            self.response_headers.append(("Content-Type", PROBLEM_JSON))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class ProblemChannel(HTTPChannel):
        error_task_class = ProblemErrorTask

    return ProblemChannel


def make_server(app: Any, config: Config, host: str, port: int, threads: int) -> Any:
    """The Waitress server of ``serve``: bodies up to ``max_request_bytes`` (Waitress's own
    default stops at 1 GiB), its own errors as problem+json."""
    from waitress import create_server
    from waitress.server import BaseWSGIServer

    server = create_server(
        app,
        host=host,
        port=port,
        threads=threads,
        max_request_body_size=config.max_request_bytes,
    )
    channel = problem_channel_class()
    # one listening socket gives the server itself, several a MultiSocketServer of them
    for listener in [server, *getattr(server, "map", {}).values()]:
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = channel
    return server


# after SIGTERM, requests already received get this long to be answered (seconds)
API_DRAIN_S = 20.0


def _listeners(server: Any) -> list[Any]:
    from waitress.server import BaseWSGIServer

    return [
        s for s in [server, *getattr(server, "map", {}).values()] if isinstance(s, BaseWSGIServer)
    ]


def serve_until_stopped(server: Any, stopping: list[int]) -> None:
    """Run the Waitress server until ``stopping`` is non-empty (a signal arrived), then drain
    it: the listening sockets close (no new connection), idle keep-alive connections are closed,
    and the loop goes on until the requests received so far are answered (at most
    ``API_DRAIN_S``)."""
    import time

    from waitress import wasyncore
    from waitress.channel import HTTPChannel

    listeners = _listeners(server)
    if not listeners:  # not a Waitress server this loop can drive (a test double): its own
        server.run()
        return
    channels_map = listeners[0]._map
    adj = listeners[0].adj
    deadline: float | None = None
    while True:
        wasyncore.loop(
            timeout=adj.asyncore_loop_timeout,
            map=channels_map,
            use_poll=adj.asyncore_use_poll,
            count=1,
        )
        if not stopping:
            continue
        if deadline is None:
            deadline = time.monotonic() + API_DRAIN_S
            for listener in listeners:  # no new connections; the trigger stays open
                if listener.socket is not None:
                    wasyncore.dispatcher.close(listener)
        busy = False
        for channel in list(channels_map.values()):
            if not isinstance(channel, HTTPChannel):
                continue
            if channel.requests or channel.request is not None or channel.total_outbufs_len:
                busy = True
            else:
                channel.will_close = True
        if not busy or time.monotonic() > deadline:
            break
    server.task_dispatcher.shutdown(cancel_pending=False, timeout=5)
    wasyncore.close_all(channels_map)


def serve(config: Config, host: str, port: int, with_worker: bool | None, threads: int) -> int:
    from . import db
    from .app import create_app

    if config.embedded:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        db.upgrade(config.resolved_database_url)
    worker = None
    if with_worker if with_worker is not None else config.embedded:
        log_path = config.data_dir / "worker.log"
        config.data_dir.mkdir(parents=True, exist_ok=True)
        worker = start_worker(config, log_path)
        print(f"worker: pid {worker.pid}, log {log_path}", file=sys.stderr, flush=True)
    app = create_app(config)
    server = make_server(app, config, host, port, threads)
    stopping: list[int] = []

    def shutdown(signum: int, frame: FrameType | None) -> None:
        # the loop below notices within a poll timeout; the worker starts draining at once
        if not stopping and worker is not None and worker.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                worker.send_signal(signal.SIGTERM)
        stopping.append(signum)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    from sqlalchemy.engine import make_url

    where = (
        str(config.data_dir.resolve())
        if config.embedded
        else make_url(config.resolved_database_url).render_as_string(hide_password=True)
    )
    mode = "embedded" if config.embedded else "external database and broker"
    print(
        f"saliency-audit serving on http://{host}:{server.effective_port} ({mode}; data in "
        f"{where})",
        file=sys.stderr,
        flush=True,
    )
    try:
        serve_until_stopped(server, stopping)
    finally:
        if worker is not None:
            print("draining the worker", file=sys.stderr, flush=True)
            stop_worker(worker, config.shutdown_grace_s)
    return 0
