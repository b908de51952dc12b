"""The one-file CI recipes of examples/ci, run as a CI runner runs them.

Both YAML files are parsed and their install and gate commands are run verbatim with bash in a
fresh virtual environment (``python -m venv``), with the job's variables in the environment and
``SALIENCY_AUDIT_SOURCE`` pointed at this checkout (its packaging files copied, as a git
clone or an sdist holds them) instead of the recipe's git URL. The gate runs where a checkout of
saliency-audit would have the bundled sample model (``examples/``), from outside this
repository, with the installed console script.

The fresh venv gets the dependencies' already installed files the way a CI cache gives them: a
``.pth`` line adds a folder of links to this environment's installed distributions (torch,
onnxruntime, ...; never saliency-audit itself), so the recipe's ``pip install`` resolves the
worker extra against them and builds and installs saliency-audit from the source. A cold
install of the worker extra into an empty venv copies about 6 GB and took 4 min 31 s on this
machine (measured once by hand, not in CI, which has 30 minutes for everything).

It must PASS (exit 0, a JUnit file with no failure and no error, the required methods'
verdicts PASS) and, with a requirement that FAILs added to the same command, exit 1 with
that method as the one failure.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import junitparser
import pytest
import yaml

from saliency_audit.service.cli import build_parser
from tests.servers import REPO
from tests.service.test_gate import case_props, gitlab_counts, junit

CI = REPO / "examples" / "ci"
INSTALL_TIMEOUT_S = 1500
GATE_TIMEOUT_S = 600
# what a wheel is built from: pyproject.toml's packages, its readme
PACKAGING = ("pyproject.toml", "README.md", "service", "workers", "migrations", "saliency_audit")


@dataclass(frozen=True)
class Recipe:
    """What a CI tool runs of one recipe: the job's variables, the install commands, the gate
    command and the JUnit file the tool reads."""

    name: str
    variables: dict[str, str]
    install: list[str]
    gate: str
    junit: str


def github_recipe() -> Recipe:
    document = yaml.safe_load((CI / "github-actions.yml").read_text())
    (job,) = document["jobs"].values()
    steps = job["steps"]
    install = [s["run"] for s in steps if "pip install" in s.get("run", "")]
    (gate_step,) = [s for s in steps if "saliency-audit gate" in s.get("run", "")]
    (report,) = [s for s in steps if "test-reporter" in s.get("uses", "")]
    # the JUnit file the gate writes is the one the test report reads, even after a failure
    assert report["if"] == "always()" and report["with"]["reporter"] == "java-junit"
    # the report is red exactly when the gate fails: no need to ignore its failures
    assert "fail-on-error" not in report["with"]
    assert steps.index(report) > steps.index(gate_step)
    variables = {**job.get("env", {}), **gate_step.get("env", {})}
    return Recipe("github", variables, install, gate_step["run"], report["with"]["path"])


def gitlab_recipe() -> Recipe:
    document = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    jobs = [j for j in document.values() if isinstance(j, dict) and "script" in j]
    (job,) = jobs
    (gate,) = [s for s in job["script"] if "saliency-audit gate" in s]
    assert job["artifacts"]["when"] == "always"
    variables = {**document.get("variables", {}), **job.get("variables", {})}
    install = [s for s in job.get("before_script", []) if "pip install" in s]
    return Recipe("gitlab", variables, install, gate, job["artifacts"]["reports"]["junit"])


RECIPES: dict[str, Callable[[], Recipe]] = {"github": github_recipe, "gitlab": gitlab_recipe}


def gate_arguments(command: str) -> list[str]:
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:2] == ["saliency-audit", "gate"], words
    return words[1:]


# --- what the recipes say (no install) -------------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_the_recipe_gates_locally_installs_from_source_and_keeps_keys_off_command_lines(
    name: str,
) -> None:
    recipe = RECIPES[name]()
    args = build_parser().parse_args(gate_arguments(recipe.gate))
    assert args.command == "gate" and args.local
    assert args.server is None and args.api_key is None
    assert set(args.require) <= set(args.methods) and args.junit == Path(recipe.junit)
    assert args.model == Path("$SALIENCY_AUDIT_MODEL") and args.images == ["$SALIENCY_AUDIT_IMAGES"]
    # the bundled sample model by default: what `make demo` audits
    assert recipe.variables["SALIENCY_AUDIT_MODEL"] == "examples/reference/shapes_small_resnet.onnx"
    assert (REPO / recipe.variables["SALIENCY_AUDIT_MODEL"]).is_file()
    assert (REPO / recipe.variables["SALIENCY_AUDIT_IMAGES"]).is_dir()
    # installed from the repository (a direct reference), never by name from an index
    (install,) = recipe.install
    assert re.fullmatch(
        r'python -m pip install "saliency-audit\[worker\] @ \$\{SALIENCY_AUDIT_SOURCE\}"',
        install.strip(),
    ), install
    assert recipe.variables["SALIENCY_AUDIT_SOURCE"].startswith("git+https://")
    text = (CI / ("github-actions.yml" if name == "github" else "gitlab-ci.yml")).read_text()
    commands = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any(re.search(r"pip install\s+saliency-audit\b(?!\[)", c) for c in commands)
    # a key only ever in the environment: not an option anywhere, not even in comments
    assert "--api-key" not in text and "--server" not in text
    assert "SALIENCY_AUDIT_KEY" not in recipe.gate


def test_the_ci_readme_documents_local_and_service_mode() -> None:
    readme = (CI / "README.md").read_text()
    for needle in ("--local", "exit", "--inconclusive", "--require", "--junit", "--timeout",
                   "SALIENCY_AUDIT_SOURCE", "SALIENCY_AUDIT_KEY"):  # fmt: skip
        assert needle in readme, needle
    assert "pip install saliency-audit " not in readme


# --- the recipes run --------------------------------------------------------------------------


@dataclass(frozen=True)
class FreshVenv:
    path: Path
    source: Path
    install_s: dict[str, float]

    def environment(self, recipe: Recipe) -> dict[str, str]:
        """The runner's environment: this machine's (its pip configuration included) without
        this checkout on the Python path, the venv first on PATH, the job's variables with
        the source pointed at this checkout."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
            and not k.startswith("SALIENCY_AUDIT_")
        }
        env.update(recipe.variables)
        env["SALIENCY_AUDIT_SOURCE"] = self.source.as_uri()
        env["PATH"] = f"{self.path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.path)
        return env


def shell(
    command: str, env: dict[str, str], cwd: Path, timeout_s: float
) -> subprocess.CompletedProcess[str]:
    """One recipe command as the runners run it: bash, stop at the first error."""
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", command],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def dependency_cache(folder: Path, venv: Path) -> None:
    """Links to this environment's installed distributions except saliency-audit's own files,
    added to ``venv``'s path by a ``.pth`` line (what a CI cache of site-packages provides)."""
    ours = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in ours.iterdir():
        name = entry.name.lower()
        if name.startswith(("saliency_audit", "__editable__", "_saliency_audit")) or (
            name.endswith(".pth")
            or name in ("pip", "setuptools", "_distutils_hack")
            or name.startswith(("pip-", "setuptools-"))
        ):
            continue
        (folder / entry.name).symlink_to(entry)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "ci-dependency-cache.pth").write_text(f"{folder}\n")


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FreshVenv]:
    """One empty venv, and each recipe's install commands run into it, timed."""
    root = tmp_path_factory.mktemp("ci-recipes")
    source = root / "saliency-audit"
    source.mkdir()
    for name in PACKAGING:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name,
                source / name,
                symlinks=True,  # saliency_audit/'s links to the three folders stay links
                ignore=shutil.ignore_patterns("__pycache__"),
            )
        else:
            shutil.copy(REPO / name, source / name)
    venv = FreshVenv(root / "venv", source, {})
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv.path)], check=True, timeout=300)
        dependency_cache(root / "cache", venv.path)
        for name, recipe_of in RECIPES.items():
            recipe = recipe_of()
            started = time.monotonic()
            for command in recipe.install:
                done = shell(command, venv.environment(recipe), root, INSTALL_TIMEOUT_S)
                assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            venv.install_s[name] = time.monotonic() - started
        print(  # shown with pytest -s: the cost of the recipes' installs on this machine
            "recipe installs into a fresh venv: "
            + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in venv.install_s.items()),
            file=sys.stderr,
        )
        # the installed distribution, not this checkout, is what runs
        where = subprocess.run(
            [
                str(venv.path / "bin" / "python"),
                "-c",
                "import saliency_audit.service.gate as g; print(g.__file__)",
            ],
            env=venv.environment(github_recipe()),
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
        assert where.stdout.strip().startswith(str(venv.path)), where.stdout
        yield venv
    finally:
        shutil.rmtree(venv.path, ignore_errors=True)  # gigabytes: never left in the tmp folder


@pytest.mark.parametrize("name", RECIPES)
def test_the_recipe_passes_on_the_bundled_model_and_fails_when_a_failing_method_is_required(
    fresh_venv: FreshVenv, name: str, tmp_path: Path
) -> None:
    recipe = RECIPES[name]()
    checkout = tmp_path / "checkout"  # what the job's checkout of saliency-audit holds
    checkout.mkdir()
    (checkout / "examples").symlink_to(REPO / "examples")
    env = fresh_venv.environment(recipe)
    assert shutil.which("saliency-audit", path=env["PATH"]) == str(
        fresh_venv.path / "bin" / "saliency-audit"
    )
    required = build_parser().parse_args(gate_arguments(recipe.gate)).require

    passed = shell(recipe.gate, env, checkout, GATE_TIMEOUT_S)
    assert passed.returncode == 0, passed.stdout + passed.stderr[-5000:]
    assert "audited in this process (--local)" in passed.stdout
    assert "64 images audited; explained classes: " in passed.stdout
    assert f"gate PASS (exit 0): required {'; '.join(f'{m} PASS' for m in required)}" in (
        passed.stdout
    )
    report = checkout / recipe.junit
    suite, cases, props = junit(report)
    (parsed,) = list(junitparser.JUnitXml.fromfile(str(report)))
    assert (parsed.failures, parsed.errors) == (0, 0)
    counted = gitlab_counts(ET.parse(report).getroot())
    assert counted["failed"] + counted["error"] == 0 and counted["success"] == len(required)
    for method in required:  # PASS for real, not counted as one
        assert case_props(cases[("saliency-audit.cascading", method)])["verdict"] == "PASS"
    assert props["mode"] == "local" and props["gate_outcome"] == "PASS"
    assert suite.get("failures") == "0" and suite.get("errors") == "0"

    # the same command requiring guided backprop, which FAILs cascading randomization
    failing = shell(
        f"{recipe.gate} --require guided_backprop --junit failing.xml",
        env,
        checkout,
        GATE_TIMEOUT_S,
    )
    assert failing.returncode == 1, failing.stdout + failing.stderr[-5000:]
    assert "gate FAIL (exit 1): required guided_backprop FAIL (cascading)" in failing.stdout
    _, cases, _ = junit(checkout / "failing.xml")
    (parsed,) = list(junitparser.JUnitXml.fromfile(str(checkout / "failing.xml")))
    assert (parsed.failures, parsed.errors) == (1, 0)
    (red,) = [c for c in cases.values() if c.find("failure") is not None]
    assert red.get("name") == "guided_backprop"
