"""The Celery app that sends tasks: broker, queues, routes and time limits from a
:class:`~saliency_audit.service.config.Config`, and no task code. The API process builds this one to
enqueue
audits (it never imports the task module, so never the engine); the workers build theirs with
:func:`saliency_audit.workers.celery.create_celery`, which adds the tasks to the same configuration.

Settings follow the job-lifecycle rules of ARCHITECTURE.md: late acknowledgement and
rejection on a lost worker (a killed worker's audit is delivered again), one message prefetched
per process, soft and hard time limits, and a broker visibility timeout longer than the hard
limit. Workers run the prefork pool with one child: the time limits need a child process, and
torch (CUDA) is first imported inside the child, never in the parent that forks it.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from .config import Config
from .jobs import INSPECT_TASK, PART_TASK, RENDER_TASK, TASK_NAME, WEBHOOK_TASK


def celery_client(config: Config) -> Celery:
    """A Celery app configured for ``config`` (broker, queues, time limits), without tasks."""
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
            INSPECT_TASK: {"queue": config.cpu_queue},
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
    return app
