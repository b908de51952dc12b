"""Workers: the Celery app (``saliency_audit.workers.celery``), the audit task
(``saliency_audit.workers.tasks``), the
pure-compute audit engine (``saliency_audit.workers.engine``) and report rendering
(``saliency_audit.workers.reports``).

Importing this package imports nothing: ``celery -A saliency_audit.workers worker`` finds the app in
``saliency_audit.workers.celery``, and the API process imports only the torch-free modules it
needs."""
