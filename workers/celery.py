"""The Celery app: ``celery -A workers worker -Q gpu`` finds it here.

Settings follow the job-lifecycle rules of ARCHITECTURE.md: late acknowledgement and
rejection on a lost worker (a killed worker's audit is delivered again), one message prefetched
per process, soft and hard time limits, and a broker visibility timeout longer than the hard
limit. Workers run the prefork pool with one child: the time limits need a child process, and
torch (CUDA) is first imported inside the child, never in the parent that forks it.

This module imports neither torch nor the engine: the API process imports it to send tasks.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from service.config import Config


def create_celery(config: Config) -> Celery:
    broker = config.resolved_broker_url
    if broker.startswith("sqla+sqlite:///"):
        Path(broker.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    app = Celery("saliency_audit", broker=broker, include=["workers.tasks", "workers.parts"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="prefork",
        task_default_queue=config.queue,
        task_routes={
            "workers.run_audit": {"queue": config.queue},
            "workers.run_audit_part": {"queue": config.queue},
            "workers.render_reports": {"queue": config.cpu_queue},
            "workers.deliver_webhook": {"queue": config.cpu_queue},
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


app = create_celery(Config.from_env())
