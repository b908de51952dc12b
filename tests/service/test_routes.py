"""The links a worker writes into ``report.json`` (without a request context) are the paths the
API serves: :mod:`saliency_audit.service.routes` fills the same rules the audits blueprint
registers."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask, url_for

from saliency_audit.service import routes
from saliency_audit.service.app import create_app
from saliency_audit.service.config import Config

ROUTES = {name: value for name, value in vars(routes).items() if isinstance(value, routes.Route)}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    data: Path = tmp_path_factory.mktemp("routes")
    return create_app(Config(data_dir=data, reconcile_in_api=False))


def _endpoint(app: Flask, route: routes.Route) -> str:
    rules = [r for r in app.url_map.iter_rules() if r.rule == route.prefix + route.rule]
    assert rules, f"no view serves {route.prefix}{route.rule}"
    return rules[0].endpoint


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_every_route_is_served_and_filled_as_url_for_fills_it(app: Flask, name: str) -> None:
    route = ROUTES[name]
    values = {v: f"{v}-1/ä b" for v in route.variables}  # encoded as url_for encodes
    with app.test_request_context():
        assert route.path(**values) == url_for(_endpoint(app, route), **values)


def test_report_links_are_paths_the_api_serves(app: Flask) -> None:
    links = routes.report_links("a1b2")
    adapter = app.url_map.bind("localhost")
    endpoints = {key: adapter.match(path, method="GET")[0] for key, path in links.items()}
    assert endpoints == {
        "audit": "audits.get_audit",
        "report_json": "audits.report_json",
        "report_pdf": "audits.report_pdf",
        "report_html": "audits.report_html",
        "results": "audits.results",
        "heatmaps": "audits.heatmaps",
    }
    assert adapter.match(routes.artifact_path("a1b2", "f" * 64), method="GET") == (
        "audits.artifact",
        {"audit_id": "a1b2", "sha256": "f" * 64},
    )


def test_a_missing_or_unknown_variable_is_an_error() -> None:
    with pytest.raises(TypeError):
        routes.AUDIT_ARTIFACT.path(audit_id="a1b2")
    with pytest.raises(TypeError):
        routes.AUDIT.path(audit_id="a1b2", sha256="f")
