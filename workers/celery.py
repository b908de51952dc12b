"""The Celery app, built by :func:`create_celery` from a :class:`~service.config.Config`.

``celery -A workers worker -Q gpu`` finds this module and asks it for ``app``: the worker's app
is built then, from the environment (:func:`worker_app`), never when the module is imported, so
the API process and the tests build theirs from the configuration they hold.

Settings follow the job-lifecycle rules of ARCHITECTURE.md: late acknowledgement and
rejection on a lost worker (a killed worker's audit is delivered again), one message prefetched
per process, soft and hard time limits, and a broker visibility timeout longer than the hard
limit. Workers run the prefork pool with one child: the time limits need a child process, and
torch (CUDA) is first imported inside the child, never in the parent that forks it.

This module imports neither torch nor the engine: the API process imports it to send tasks.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from celery import Celery

from service.config import Config
from service.jobs import PART_TASK, RENDER_TASK, TASK_NAME, WEBHOOK_TASK

from .tasks import register_tasks


def create_celery(config: Config) -> Celery:
    """A Celery app with the workers' tasks registered; it sends and runs tasks for
    ``config`` (broker, queues, time limits)."""
    broker = config.resolved_broker_url
    if broker.startswith("sqla+sqlite:///"):
        Path(broker.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    app = Celery("saliency_audit", broker=broker)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="prefork",
        task_default_queue=config.queue,
        task_routes={
            TASK_NAME: {"queue": config.queue},
            PART_TASK: {"queue": config.queue},
            RENDER_TASK: {"queue": config.cpu_queue},
            WEBHOOK_TASK: {"queue": config.cpu_queue},
        },
        task_soft_time_limit=config.soft_time_limit_s,
        task_time_limit=config.hard_time_limit_s,
        # Redis redelivers an unacknowledged message after the visibility timeout; the
        # SQLAlchemy transport hands its options to create_engine and has no such timeout
        broker_transport_options=(
            {"visibility_timeout": config.broker_visibility_timeout_s}
            if broker.startswith(("redis://", "rediss://"))
            else {}
        ),
        broker_connection_retry_on_startup=True,
        # the audit row is the result: no result backend
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    app.conf.saliency_audit_config = config
    register_tasks(app)
    return app


@cache
def worker_app() -> Celery:
    """The app of a ``celery -A workers worker`` process: configured from the environment."""
    return create_celery(Config.from_env())


def __getattr__(name: str) -> Celery:
    # ``celery -A workers`` looks up ``workers.celery.app``: build it on that first look-up
    if name == "app":
        return worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
