"""The torch-free catalogue the API serves is the engine's registry, field for field."""

from __future__ import annotations

import pytest

from saliency_audit.workers.engine.catalogue import build_from_registry, catalogue, check_methods
from saliency_audit.workers.engine.errors import SpecError


def test_catalogue_json_matches_the_method_and_test_registry() -> None:
    # regenerate with: python -m saliency_audit.workers.engine.catalogue --write
    assert catalogue() == build_from_registry()


def test_unknown_methods_are_named_in_the_error() -> None:
    check_methods(["gradient", "lrp"])
    with pytest.raises(SpecError, match="telepathy"):
        check_methods(["gradient", "telepathy"])
