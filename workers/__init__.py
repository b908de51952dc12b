"""Workers: the Celery app (``workers.celery``), the audit task (``workers.tasks``), the
pure-compute audit engine (``workers.engine``) and report rendering (``workers.reports``).

Importing this package imports nothing: ``celery -A workers worker`` finds the app in
``workers.celery``, and the API process imports only the torch-free modules it needs."""
