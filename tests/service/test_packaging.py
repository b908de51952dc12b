"""Installing saliency-audit respects the user's environment (issue 17, item 7).

The distribution's import names live under one package, ``saliency_audit``: the repository's
top-level ``service/``, ``workers/`` and ``migrations/`` folders are installed as
``saliency_audit.service`` and so on, so a user whose own project has a ``service`` or ``workers``
package (often first on ``PYTHONPATH`` in CI) keeps it, and the CLI still works.

The wheel is built from this checkout and installed, client only (no torch, as the gate needs),
into a fresh virtual environment; the console script and the Python API then run there with an
unrelated ``service/`` and ``workers/`` first on ``sys.path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.servers import REPO

USER_PACKAGES = {
    "service": "WHOSE = 'the user'\n",
    "workers": "WHOSE = 'the user'\n",
    "migrations": "WHOSE = 'the user'\n",
}


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(out),
        ],
        timeout=300,
    )
    (built,) = out.glob("saliency_audit-*.whl")
    return built


@pytest.fixture(scope="module")
def client_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel and its base dependencies only (the client and the gate)."""
    venv = tmp_path_factory.mktemp("venv") / "client"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    _run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            str(wheel),
        ],
        timeout=600,
    )
    return venv


def test_the_wheel_has_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"saliency_audit", f"{wheel.name.split('-py3')[0]}.dist-info"}, tops
    # the three folders are inside it, with their data files
    for expected in (
        "saliency_audit/service/cli.py",
        "saliency_audit/workers/engine/api.py",
        "saliency_audit/workers/engine/policies/default.json",
        "saliency_audit/workers/engine/catalogue.json",
        "saliency_audit/migrations/script.py.mako",
        "saliency_audit/migrations/versions/0001_initial.py",
    ):
        assert expected in names, expected
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
        .decode()
    )
    assert "saliency-audit = saliency_audit.service.cli:main" in entry_points


def test_installing_adds_no_top_level_service_workers_or_migrations(client_venv: Path) -> None:
    (site,) = (client_venv / "lib").glob("python3*/site-packages")
    for name in ("service", "workers", "migrations"):
        assert not (site / name).exists(), f"{name} installed at the top level of {site}"
        assert not (site / f"{name}.py").exists()
    assert (site / "saliency_audit" / "service" / "cli.py").is_file()
    # the client install has no torch: the gate and the client need none
    assert not (site / "torch").exists()


def test_the_cli_runs_with_an_unrelated_service_package_first_on_the_path(
    client_venv: Path, tmp_path: Path
) -> None:
    project = tmp_path / "users_project"
    for name, text in USER_PACKAGES.items():
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(text)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SALIENCY_AUDIT_", "PYTHON"))},
        "PYTHONPATH": str(project),
    }
    bin_dir = client_venv / "bin"

    version = _run([str(bin_dir / "saliency-audit"), "--version"], env=env, cwd=project, timeout=60)
    assert version.stdout.startswith("saliency-audit "), version.stdout
    helped = _run(
        [str(bin_dir / "saliency-audit"), "gate", "--help"], env=env, cwd=project, timeout=60
    )
    assert "--require" in helped.stdout

    # in one interpreter: the user's packages stay the user's after the CLI and the API load
    script = (
        "import service, workers, migrations\n"
        "import saliency_audit, saliency_audit.service.cli, saliency_audit.service.gate\n"
        "import saliency_audit.migrations\n"
        "assert service.WHOSE == workers.WHOSE == migrations.WHOSE == 'the user'\n"
        "import sys\n"
        "assert sys.modules['service'] is service\n"
        "assert saliency_audit.service.cli.__name__ == 'saliency_audit.service.cli'\n"
        "print(saliency_audit.__version__)\n"
    )
    done = _run([str(bin_dir / "python"), "-c", script], env=env, cwd=project, timeout=60)
    assert done.stdout.strip() == version.stdout.split()[1]
