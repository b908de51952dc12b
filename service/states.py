"""The states of an audit, declared once for the service, the workers and the release gate.

Standard library only: the gate (which runs where only the client's dependencies are installed)
imports it without SQLAlchemy.
"""

from __future__ import annotations

AUDIT_STATES = ("queued", "running", "succeeded", "failed", "canceled")
# an audit in one of these never changes state again
FINAL_STATES = ("succeeded", "failed", "canceled")
