"""The Python API (``saliency_audit.audit``) and bring-your-own explainers: an in-memory module
or an ONNX file on a tensor or on files, a Captum Occlusion audited like a built-in method
through the API and through ``saliency-audit run --method-plugin``."""

from __future__ import annotations

import json
import os
import re
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import saliency_audit
from saliency_audit import AuditResult, audit, register_explainer
from saliency_audit.service.cli import main
from saliency_audit.workers.engine import api as engine_api
from saliency_audit.workers.engine.catalogue import build_from_registry, plugin_methods
from saliency_audit.workers.engine.errors import ImageDecodeError, SpecError
from saliency_audit.workers.engine.image_files import list_images
from saliency_audit.workers.engine.methods import METHODS
from saliency_audit.workers.engine.methods.plugins import is_plugin, unregister_explainer
from saliency_audit.workers.engine.spec import expand_tests
from tests.engine.explainers import occlusion, wrong_shape
from tests.engine.nets import images, small_cnn

REPO = Path(__file__).resolve().parents[2]
DIGITS_MODEL = REPO / "examples/reference/digits_small_cnn.onnx"
DIGITS = REPO / "examples/reference/digits_images"


@pytest.fixture(autouse=True)
def no_plugins_left() -> Iterator[None]:
    """Each test leaves the method registry as it found it."""
    before = set(METHODS)
    yield
    for name in set(METHODS) - before:
        unregister_explainer(name)


def messy_folder(root: Path, count: int = 3) -> Path:
    """Digit images with what a user's folder also holds: a note, macOS metadata."""
    folder = root / "photos"
    folder.mkdir()
    for path in sorted(DIGITS.glob("*.png"))[:count]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("taken on Tuesday\n")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._0_0.png").write_bytes(b"\0\5\26\7")
    return folder


def test_an_in_memory_module_on_a_tensor_gets_verdicts_for_a_captum_occlusion_explainer() -> None:
    result = audit(
        small_cnn(),
        images(4),
        methods=["gradient", "occlusion"],
        explainers={"occlusion": occlusion},
        device="cpu",
    )
    assert isinstance(result, AuditResult)
    report = result.to_dict()
    method = report["methods"]["occlusion"]
    assert method["status"] == "ok" and method["family"] == "plugin:occlusion"
    assert method["reference"] == "tests.engine.explainers:occlusion"
    assert result.maps["occlusion"].shape == (4, 32, 32)
    verdicts = {(v["method"], v["test"]): v["verdict"] for v in report["verdicts"]}
    assert verdicts[("occlusion", "cascading")] in ("PASS", "FAIL", "INCONCLUSIVE")
    assert verdicts[("gradient", "cascading")] in ("PASS", "FAIL", "INCONCLUSIVE")
    assert report["model"]["source"] == "torch" and len(report["model"]["sha256"]) == 64
    assert METHODS["occlusion"].description.startswith("Occlusion (Zeiler and Fergus 2014)")


def test_a_plugin_is_computed_like_a_builtin_on_every_randomized_model() -> None:
    result = audit(
        small_cnn(),
        images(3),
        methods=["occlusion"],
        explainers={"occlusion": occlusion},
        tests=["independent"],
        device="cpu",
    )
    scores = [s for s in result.tests["independent"].scores if s.method == "occlusion"]
    stages = {s.name for s in result.tests["independent"].stages}
    assert {s.stage for s in scores} == stages and len(stages) > 1


def test_an_explainer_returning_no_map_is_an_error_of_that_method_only() -> None:
    result = audit(
        small_cnn(),
        images(2),
        methods=["gradient", "bad"],
        explainers={"bad": wrong_shape},
        tests=[],
        device="cpu",
    )
    assert result.methods["bad"].status == "error"
    assert "expected" in (result.methods["bad"].reason or "")
    assert result.methods["gradient"].status == "ok"


def test_an_explainer_cannot_take_a_builtin_methods_name() -> None:
    with pytest.raises(SpecError, match="built-in"):
        register_explainer("gradient", occlusion)


def test_plugins_stay_out_of_the_shipped_catalogue() -> None:
    register_explainer("occlusion", occlusion)
    assert "occlusion" not in {m["name"] for m in build_from_registry()["methods"]}


def test_an_onnx_path_and_a_folder_with_notes_and_macos_metadata(tmp_path: Path) -> None:
    folder = messy_folder(tmp_path)
    result = audit(DIGITS_MODEL, folder, methods=["gradient"], tests=[], device="cpu")
    assert [i.name for i in result.images] == ["0_0.png", "0_1.png", "0_2.png"]
    note = next(n for n in result.model["notes"] if n.startswith("skipped"))
    for name in ("notes.txt (not an image)", ".DS_Store (hidden)", "__MACOSX/ (macOS metadata)"):
        assert name in note
    result.write(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written == json.loads(json.dumps(result.to_dict()))
    assert np.load(tmp_path / "out" / "maps.npz")["gradient"].shape == (3, 32, 32)


def test_zip_tar_single_files_and_globs_list_the_same_images(tmp_path: Path) -> None:
    folder = messy_folder(tmp_path)
    members = sorted(p for p in folder.rglob("*") if p.is_file())
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in members:
            z.write(p, p.relative_to(folder).as_posix())
    tar = tmp_path / "set.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        for p in members:
            t.add(p, p.relative_to(folder).as_posix())
    expected = ["0_0.png", "0_1.png", "0_2.png"]
    for source in (folder, archive, tar, str(folder / "*.png"), sorted(folder.glob("*.png"))):
        listing = list_images(source)  # type: ignore[arg-type]
        assert [i.name for i in listing.images] == expected, source
        assert listing.images[0].read() == (folder / "0_0.png").read_bytes()
    skipped = list_images(archive).skipped
    assert "notes.txt (not an image)" in skipped and ".DS_Store (hidden)" in skipped
    assert "__MACOSX/._0_0.png (macOS metadata)" in skipped
    with pytest.raises(ImageDecodeError, match="no images"):
        list_images(folder / "notes.txt")


def test_method_plugin_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = messy_folder(tmp_path)
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--model",
            str(DIGITS_MODEL),
            "--images",
            str(folder),
            "--methods",
            "gradient,occ",
            "--method-plugin",
            "tests.engine.explainers:occlusion=occ",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "note: skipped 3 file(s) that are not images" in printed and "notes.txt" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["methods"]["occ"]["status"] == "ok"
    assert report["methods"]["occ"]["reference"] == "tests.engine.explainers:occlusion"
    assert ("occ", "cascading") in {(v["method"], v["test"]) for v in report["verdicts"]}


def test_an_unknown_method_plugin_is_an_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "run",
            "--model",
            str(DIGITS_MODEL),
            "--images",
            str(DIGITS),
            "--method-plugin",
            "tests.engine.explainers:nothing_here",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "tests.engine.explainers:nothing_here" in capsys.readouterr().err


def test_entry_point_explainers_are_listed_without_being_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist = tmp_path / "my_explainers-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-explainers\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[saliency_audit.explainers]\nocclusion = no_such_module_anywhere:occlusion\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    listed = {m["name"]: m for m in plugin_methods()}
    assert listed["occlusion"]["family"] == "plugin:occlusion"
    assert listed["occlusion"]["reference"] == "no_such_module_anywhere:occlusion"


def test_readme_python_api_example_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    exec(compile(code.group(1), "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    lines = dict(line.rsplit(" ", 1) for line in printed.strip().splitlines())
    # the comment in the README states these two verdicts; the controls are printed too
    assert lines["gradient cascading"] == "PASS" and lines["guided_backprop cascading"] == "FAIL"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {v["method"] for v in report["verdicts"]} >= {"gradient", "gradcam", "guided_backprop"}
    assert not any(is_plugin(info) for info in METHODS.values() if info.name == "gradient")
    assert os.path.exists(tmp_path / "out" / "maps.npz")


def test_run_takes_a_zip_and_a_single_image_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = messy_folder(tmp_path)
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    sources: list[tuple[list[str], int]] = [
        ([str(archive)], 3),
        ([str(folder / "0_1.png")], 1),
        ([str(folder / "0_0.png"), str(folder / "0_2.png")], 2),  # image files by name
        ([str(folder / "0_[01].png")], 2),  # a quoted glob
    ]
    for i, (source, n) in enumerate(sources):
        out = tmp_path / f"out_{i}"
        argv = ["run", "--model", str(DIGITS_MODEL), "--images", *source,
                "--methods", "gradient", "--tests", "none", "--device", "cpu",
                "--out", str(out), "--quiet"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        report = json.loads((out / "report.json").read_text())
        assert len(report["images"]) == n, source
    assert "__MACOSX/._0_0.png (macOS metadata)" in capsys.readouterr().out


def test_the_public_names_are_the_engines_functions() -> None:
    assert audit is engine_api.audit and AuditResult is engine_api.AuditResult
    assert set(saliency_audit.__all__) >= {"audit", "AuditResult", "Explainer", "read_images"}
    with pytest.raises(AttributeError):
        _ = saliency_audit.run_audit  # internals stay internal


def test_all_and_none_are_read_as_the_cli_and_the_api_read_them(tmp_path: Path) -> None:
    verdict_tests = [
        "cascading",
        "cascading_bottom_up",
        "independent",
        "smprt",
        "emprt",
        "random_logit",
    ]
    assert expand_tests(["all"], training=False) == verdict_tests
    assert expand_tests(["all"], training=True) == [
        *verdict_tests[:3],
        "data_randomization",
        *verdict_tests[3:],
    ]
    assert expand_tests(["none"], training=True) == []
    assert expand_tests(["cascading"], training=False) == ["cascading"]
    files = sorted(DIGITS.rglob("*.png"))[:2]
    result = audit(DIGITS_MODEL, files, methods=["gradient"], tests=["none"], device="cpu")
    assert not result.to_dict()["tests"]
    with pytest.raises(SpecError):
        audit(DIGITS_MODEL, files, methods=["gradient"], tests=["every"], device="cpu")
