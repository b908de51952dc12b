"""The URLs of an audit's resources, declared once.

The audits blueprint registers its views on these rules, and whoever writes a link without a
request context (the worker's ``report.json``, the release gate's messages) fills the same rules
with :meth:`Route.path`, so a link in a report cannot drift from the route that serves it.
Standard library only: the workers and the gate import it without Flask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

API_PREFIX = "/v1"
AUDITS_PREFIX = f"{API_PREFIX}/audits"

# a Werkzeug rule variable: <name> or <converter:name> or <converter(args):name>
_VARIABLE = re.compile(r"<(?:[A-Za-z_]\w*(?:\([^)]*\))?:)?([A-Za-z_]\w*)>")
# what a URL path segment may hold unencoded (the WHATWG set Werkzeug's converters keep)
_PATH_SAFE = "!$&'()*+,/:;=@"


@dataclass(frozen=True)
class Route:
    """One URL rule of a blueprint: ``rule`` is relative to the blueprint's ``prefix``."""

    prefix: str
    rule: str

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(_VARIABLE.findall(self.rule))

    def path(self, **values: str) -> str:
        """The absolute path with every variable filled (percent-encoded as ``url_for``
        encodes it); a missing or an unknown variable is a programming error."""
        if set(values) != set(self.variables):
            raise TypeError(
                f"route {self.prefix}{self.rule} takes {self.variables}, got {tuple(values)}"
            )
        filled = _VARIABLE.sub(lambda m: quote(str(values[m.group(1)]), safe=_PATH_SAFE), self.rule)
        return self.prefix + filled


AUDIT = Route(AUDITS_PREFIX, "/<audit_id>")
AUDIT_REPORT_JSON = Route(AUDITS_PREFIX, "/<audit_id>/report.json")
AUDIT_REPORT_PDF = Route(AUDITS_PREFIX, "/<audit_id>/report.pdf")
AUDIT_REPORT_HTML = Route(AUDITS_PREFIX, "/<audit_id>/report")
AUDIT_RESULTS = Route(AUDITS_PREFIX, "/<audit_id>/results")
AUDIT_HEATMAPS = Route(AUDITS_PREFIX, "/<audit_id>/heatmaps")
AUDIT_ARTIFACT = Route(AUDITS_PREFIX, "/<audit_id>/artifacts/<sha256>")


def report_links(audit_id: str) -> dict[str, str]:
    """The ``links`` of a stored ``report.json``: the audit and every view of its results."""
    return {
        "audit": AUDIT.path(audit_id=audit_id),
        "report_json": AUDIT_REPORT_JSON.path(audit_id=audit_id),
        "report_pdf": AUDIT_REPORT_PDF.path(audit_id=audit_id),
        "report_html": AUDIT_REPORT_HTML.path(audit_id=audit_id),
        "results": AUDIT_RESULTS.path(audit_id=audit_id),
        "heatmaps": AUDIT_HEATMAPS.path(audit_id=audit_id),
    }


def artifact_path(audit_id: str, sha256: str) -> str:
    return AUDIT_ARTIFACT.path(audit_id=audit_id, sha256=sha256)
