"""The audit engine: pure compute on tensors, usable as a library and from the CLI.

It imports nothing from Flask, Celery, SQLAlchemy or ``service``; its only inputs are what its
caller hands it (model bytes, decoded images, a spec) and its only output is an ``AuditResult``.
"""
