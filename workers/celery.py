"""The Celery app, built by :func:`create_celery` from a
:class:`~saliency_audit.service.config.Config`.

``celery -A saliency_audit.workers worker -Q gpu`` finds this module and asks it for ``app``: the
worker's app
is built then, from the environment (:func:`worker_app`), never when the module is imported, so
the API process and the tests build theirs from the configuration they hold.

The configuration (broker, queues, time limits, acknowledgement rules) is
:func:`saliency_audit.service.broker.celery_client`'s, the app the API process sends with; this
module adds
the tasks, so only the workers import the task code.
"""

from __future__ import annotations

from functools import cache

from celery import Celery

from saliency_audit.service.broker import celery_client
from saliency_audit.service.config import Config

from .tasks import register_tasks


def create_celery(config: Config) -> Celery:
    """A Celery app with the workers' tasks registered; it sends and runs tasks for
    ``config`` (broker, queues, time limits:
    :func:`saliency_audit.service.broker.celery_client`)."""
    app = celery_client(config)
    register_tasks(app)
    return app


@cache
def worker_app() -> Celery:
    """The app of a ``celery -A saliency_audit.workers worker`` process: configured from the
    environment."""
    return create_celery(Config.from_env())


def __getattr__(name: str) -> Celery:
    # ``celery -A saliency_audit.workers`` looks up ``saliency_audit.workers.celery.app``: build it
    # on that first look-up
    if name == "app":
        return worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
