"""The Celery app is built by a factory from a configuration: importing the workers builds
nothing, ``celery -A saliency_audit.workers`` gets an app built from the environment when it asks,
and every
app the factory builds carries the workers' tasks and routes them by its own configuration."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from saliency_audit.service.config import Config
from saliency_audit.service.jobs import (
    INSPECT_TASK,
    PART_TASK,
    RENDER_TASK,
    TASK_NAME,
    WEBHOOK_TASK,
)
from saliency_audit.workers.celery import create_celery
from tests.servers import REPO

TASKS = {TASK_NAME, PART_TASK, RENDER_TASK, WEBHOOK_TASK, INSPECT_TASK}


def test_the_factory_registers_the_tasks_on_each_app_it_builds(tmp_path: Path) -> None:
    first = create_celery(Config(data_dir=tmp_path / "a", queue="gpu-a"))
    second = create_celery(Config(data_dir=tmp_path / "b", queue="gpu-b"))
    for app, queue in ((first, "gpu-a"), (second, "gpu-b")):
        assert set(app.tasks) >= TASKS
        assert all(app.tasks[name].app is app for name in TASKS)
        assert app.conf.task_routes[TASK_NAME] == {"queue": queue}
        assert app.conf.task_routes[PART_TASK] == {"queue": queue}
    assert first.tasks[WEBHOOK_TASK].max_retries is None
    assert first.conf.saliency_audit_config.queue == "gpu-a"


CELERY_A = textwrap.dedent(
    """
    import sys

    import saliency_audit.workers.celery
    from celery.app.utils import find_app

    assert "app" not in vars(saliency_audit.workers.celery), "an app was built at import time"
    assert saliency_audit.workers.celery.worker_app.cache_info().currsize == 0
    app = find_app("saliency_audit.workers")  # what `celery -A saliency_audit.workers worker` does
    assert app is saliency_audit.workers.celery.worker_app()
    config = app.conf.saliency_audit_config
    assert str(config.data_dir) == sys.argv[1], config.data_dir
    print(sorted(name for name in app.tasks if name.startswith("workers.")))
    """
)


def test_celery_dash_a_workers_builds_the_app_from_the_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALIENCY_AUDIT_")}
    env.pop("DATABASE_URL", None)
    env.pop("BROKER_URL", None)
    env["SALIENCY_AUDIT_DATA_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", CELERY_A, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == str(sorted(TASKS))
