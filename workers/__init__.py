"""Workers: the Celery glue (later) and the pure-compute audit engine in ``workers.engine``."""
