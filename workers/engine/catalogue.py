"""A torch-free description of what the engine offers: methods, tests, measures.

The API process must not import torch, yet clients discover the methods from it
(``GET /v1/methods``) and submissions are validated against them. The registry itself lives in
:mod:`.methods` and :mod:`.sanity` (torch); this module reads ``catalogue.json``, which
``python -m saliency_audit.workers.engine.catalogue --write`` regenerates from the registry, and a
test checks
that the two agree, so the file cannot drift from the code.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from importlib import resources
from typing import Any

from .contract.catalogue import CatalogueFile
from .errors import SpecError


@cache
def catalogue() -> dict[str, Any]:
    """The built-in methods, tests and measures (``catalogue.json``) plus the explainers
    installed as entry points (:func:`plugin_methods`)."""
    text = resources.files(__package__).joinpath("catalogue.json").read_text()
    value: dict[str, Any] = CatalogueFile.model_validate_json(text).model_dump(mode="json")
    builtin = {m["name"] for m in value["methods"]}
    value["methods"] += [m for m in plugin_methods() if m["name"] not in builtin]
    return value


# the entry point group operators install explainers in (methods/plugins.py loads them), and
# the family prefix that marks a method as such an explainer (kind "plugin")
ENTRY_POINT_GROUP = "saliency_audit.explainers"
PLUGIN_FAMILY_PREFIX = "plugin:"


def _is_plugin(family: str) -> bool:
    return family.startswith(PLUGIN_FAMILY_PREFIX)


def plugin_methods() -> list[dict[str, Any]]:
    """Catalogue entries of the explainers installed in this environment as entry points in
    :data:`ENTRY_POINT_GROUP`, read from the installed packages' metadata only: nothing is
    imported, so the API process (torch-free) lists what the workers run without loading any
    plugin code. Operators install the same plugin packages in the API and worker images
    (docs/plugins.md)."""
    from dataclasses import asdict
    from importlib.metadata import entry_points

    from .contract.catalogue import MethodInfo

    points = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name)
    return [
        asdict(
            MethodInfo(
                name=point.name,
                family=PLUGIN_FAMILY_PREFIX + point.name,
                reference=point.value,
                description=f"explainer plugin {point.value} (installed by the operator)",
            )
        )
        for point in points
    ]


def method_names() -> list[str]:
    return [m["name"] for m in catalogue()["methods"]]


def control_names() -> list[str]:
    return [m["name"] for m in catalogue()["methods"] if m["is_control"]]


def check_methods(names: list[str]) -> None:
    known = method_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SpecError(
            f"unknown methods {unknown}; known methods: {', '.join(known)}", unknown=unknown
        )


def build_from_registry() -> dict[str, Any]:
    """What ``catalogue.json`` must contain (imports the torch registry)."""
    from dataclasses import asdict

    from .methods import METHODS
    from .sanity import TEST_INFO
    from .spec import MEASURES

    return {
        "methods": [asdict(info) for info in METHODS.values() if not _is_plugin(info.family)],
        "tests": [
            {"name": name, "description": t.description, "reference": t.reference}
            for name, t in TEST_INFO.items()
        ],
        "measures": list(MEASURES),
    }


def main(argv: list[str]) -> int:
    data = json.dumps(build_from_registry(), indent=2) + "\n"
    if argv[1:] == ["--write"]:
        path = resources.files(__package__).joinpath("catalogue.json")
        with resources.as_file(path) as real:
            real.write_text(data)
        return 0
    sys.stdout.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
