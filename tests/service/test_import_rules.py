"""The import rules of ARCHITECTURE.md are enforced by ``make lint`` (lint-imports with the
contracts in pyproject.toml's ``[tool.importlinter]``), not kept by convention: the real tree
passes, and a copy of it with one forbidden import added fails on that rule."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
ENGINE_RULE = "The engine is a library"
CONTRACT_RULE = "The API imports only the contract from the engine"
TORCH_RULE = "The API never imports torch"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # the tree under test first on the path, ahead of the editable install of the real one
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def verdicts(output: str) -> dict[str, str]:
    """Contract name prefix -> KEPT or BROKEN, from lint-imports' summary."""
    flat = " ".join(output.split())
    out = {}
    for rule in (ENGINE_RULE, CONTRACT_RULE, TORCH_RULE):
        after = flat.split(rule, 1)[1] if rule in flat else ""
        out[rule] = next((w for w in after.split() if w in ("KEPT", "BROKEN")), "missing")
    return out


def test_make_lint_runs_the_import_rules() -> None:
    lint = (REPO / "Makefile").read_text().split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "$(BIN)/lint-imports" in lint


def test_the_tree_keeps_every_import_rule() -> None:
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(verdicts(done.stdout).values()) == {"KEPT"}, done.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("workers/engine/stats.py", "import saliency_audit.service.config", ENGINE_RULE),
        ("workers/engine/similarity.py", "from saliency_audit.workers import tasks", ENGINE_RULE),
        ("workers/engine/maps.py", "import flask", ENGINE_RULE),
        ("service/api/meta.py", "import torch", TORCH_RULE),
        # a torch-free engine module, but not on the allow-list
        ("service/problems.py", "from saliency_audit.workers.engine import stats", CONTRACT_RULE),
        ("service/api/audits.py", "from saliency_audit.workers.reports import pdf", CONTRACT_RULE),
        ("service/openapi.py", "import onnxruntime", TORCH_RULE),
    ],
)
def test_one_forbidden_import_breaks_its_rule(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("service", "workers"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=ignore)
    # the import names: saliency_audit/ whose entries link to the top-level folders
    shutil.copytree(
        REPO / "saliency_audit", tmp_path / "saliency_audit", symlinks=True, ignore=ignore
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{line}  # the violation under test\n")

    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout
    assert verdicts(done.stdout)[broken] == "BROKEN", done.stdout
    assert f"saliency_audit.{module[:-3].replace('/', '.')} -> " in done.stdout, done.stdout
