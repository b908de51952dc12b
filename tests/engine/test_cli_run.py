"""`saliency-audit run` as a user runs it: an ONNX file and a folder of photos in, a report out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.sample_photos import write_sample_photos
from saliency_audit.service.cli import main
from saliency_audit.workers.engine.methods import METHODS
from tests.engine.nets import torchvision_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mobilenet_dynamo_onnx(artifact_cache: Path) -> Path:
    """torchvision mobilenet_v3_small (seeded random weights, BatchNorm statistics measured on
    224 px inputs) exported with the dynamo exporter."""
    path = artifact_cache / "cli_mobilenet_v3_small_dynamo_seed0_bnstats.onnx"
    if not path.exists():
        model = torchvision_model("mobilenet_v3_small", seed=0, statistics_at=224)
        tmp = path.with_suffix(".tmp")
        torch.onnx.export(
            model, (torch.randn(1, 3, 224, 224),), str(tmp), dynamo=True, external_data=False
        )
        tmp.rename(path)
    return path


@pytest.mark.slow
def test_run_computes_every_method_on_a_dynamo_onnx_mobilenet(
    mobilenet_dynamo_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = tmp_path / "photos"
    write_sample_photos(photos)
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--model",
            str(mobilenet_dynamo_onnx),
            "--images",
            str(photos),
            "--out",
            str(out),
            "--tests",
            "none",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == set(METHODS)
    for name in ("guided_backprop", "guided_gradcam"):  # Hardswish has no guided rule
        guided = report["methods"].pop(name)
        assert guided["status"] == "not_applicable" and "Hardswish" in guided["reason"]
    for name, method in report["methods"].items():
        assert method["status"] == "ok", (name, method.get("reason"))
        stats = method["statistics"]
        assert stats["n_images"] == 8 and stats["height"] == 224 and stats["width"] == 224
        assert np.isfinite(stats["mean_abs"])
    fidelity = report["fidelity"]
    assert fidelity["passed"] and fidelity["n_images"] == 8
    assert fidelity["max_abs_diff"] <= fidelity["atol"]
    assert fidelity["argmax_agreement"] == 1.0
    assert report["model"]["input_spec"]["layout"] == "NCHW"
    maps = np.load(out / "maps.npz")
    assert set(maps.files) == set(METHODS) - {"guided_backprop", "guided_gradcam"}
    assert maps["gradcam"].shape == (8, 224, 224)
    printed = capsys.readouterr().out
    assert "fidelity vs ONNX Runtime" in printed and "scorecam" in printed


DIGITS_MODEL = REPO / "examples/reference/digits_small_cnn.onnx"
DIGITS_IMAGES = REPO / "examples/reference/digits_images"


def saliency_audit(*args: str | Path, timeout_s: int = 300) -> subprocess.CompletedProcess[str]:
    """The installed console script, run as a user runs it."""
    exe = Path(sys.executable).with_name("saliency-audit")
    return subprocess.run(
        [str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout_s
    )


def test_the_installed_command_runs_the_bundled_sample(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = saliency_audit(
        "run",
        "--model",
        DIGITS_MODEL,
        "--images",
        DIGITS_IMAGES,
        "--methods",
        "gradient,gradcam,lrp,relevance_cam",
        "--out",
        out,
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["input_spec"]["channels"] == 1  # from the ONNX metadata
    correct = [r["predicted"] == int(r["name"].split("_")[0]) for r in report["images"]]
    assert len(correct) == 64 and sum(correct) >= 61  # the model is 99.7% accurate on test digits
    assert report["spec"]["resolved_layer"] is not None


def test_errors_are_reported_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not onnx")
    (tmp_path / "imgs").mkdir()
    proc = saliency_audit("run", "--model", bad, "--images", tmp_path / "imgs", timeout_s=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    proc = saliency_audit(
        "run",
        "--model",
        DIGITS_MODEL,
        "--images",
        DIGITS_IMAGES,
        "--methods",
        "gradient,not_a_method",
        timeout_s=120,
    )
    assert proc.returncode == 2 and "unknown method 'not_a_method'" in proc.stderr


def test_run_prints_verdicts_and_writes_them_for_the_papers_tests(tmp_path: Path) -> None:
    """The issue's command: cascading, independent and data randomization on a bundled model."""
    from examples.reference.export_training_set import export_training_set

    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(DIGITS_IMAGES.iterdir())[:16]:
        (images / path.name).write_bytes(path.read_bytes())
    train = tmp_path / "train"
    export_training_set("digits", train, per_class=30)
    out = tmp_path / "out"
    proc = saliency_audit(
        "run",
        "--model",
        DIGITS_MODEL,
        "--images",
        images,
        "--methods",
        "gradient,gradcam,guided_backprop",
        "--tests",
        "cascading,independent,data_randomization",
        "--train",
        train,
        "--out",
        out,
        "--quiet",
        timeout_s=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    verdicts = report["verdicts"]
    methods = ["gradient", "gradcam", "guided_backprop", "control_sobel", "control_random"]
    tests = ["cascading", "independent", "data_randomization"]
    assert {(v["method"], v["test"]) for v in verdicts} == {(m, t) for m in methods for t in tests}
    for v in verdicts:
        assert v["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE") and v["reason"]
        assert v["policy_version"] == report["policy"]["version"]
    assert {v["verdict"] for v in verdicts if v["method"] == "control_sobel"} == {"FAIL"}
    training = report["tests"]["data_randomization"]["details"]
    assert training["permuted_labels_run"]["n_train"] == 300
    cascading = report["tests"]["cascading"]
    assert [s["name"] for s in cascading["stages"]] == ["fc", "block3", "block2", "block1"]
    assert all(len(s["values"]) == 16 for s in cascading["scores"])
    printed = proc.stdout
    assert "verdicts (policy" in printed
    assert "cascading" in printed and "data_randomization" in printed
    table = printed.split("verdicts (policy", 1)[1]
    for method in methods:
        assert method in table


SHAPES_MODEL = REPO / "examples/reference/shapes_small_cnn.onnx"


@pytest.fixture(scope="module")
def json_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One small audit (4 shapes images, gradient, cascading) with ``--json --report pdf,html``."""
    root = tmp_path_factory.mktemp("json_run")
    images = root / "images"
    images.mkdir()
    for path in sorted((REPO / "examples/reference/shapes_images").glob("*.png"))[::16]:
        (images / path.name).write_bytes(path.read_bytes())
    out = root / "out"
    proc = saliency_audit(
        "run", "--model", SHAPES_MODEL, "--images", images, "--methods", "gradient",
        "--out", out, "--json", "--report", "pdf,html",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc, out


def test_run_json_prints_report_json_alone_on_stdout(
    json_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, out = json_run
    assert json.loads(proc.stdout) == json.loads((out / "report.json").read_text())
    # what is said on the way goes to stderr
    assert "input spec used" in proc.stderr and "wrote " in proc.stderr


def test_run_report_writes_the_services_pdf_and_html(
    json_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    import shutil

    _, out = json_run
    pdf = (out / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-")
    pdfinfo = shutil.which("pdfinfo")
    assert pdfinfo is not None, "run tests/install_tools.sh (poppler-utils)"
    info = subprocess.run([pdfinfo, str(out / "report.pdf")], capture_output=True, text=True)
    pages = int(next(line for line in info.stdout.splitlines() if line.startswith("Pages:"))[6:])
    assert pages >= 2
    html = (out / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html")
    # the heatmaps are in it, as the service's report has them (inline PNGs)
    assert html.count("data:image/png;base64,") >= 4
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["sha256"] in html


def test_run_progress_lines_show_elapsed_time_and_eta(
    json_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    proc, _ = json_run
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert lines and all("(elapsed " in line and ", ETA " in line for line in lines)
    assert lines[-1].startswith("[100.0%]") and lines[-1].endswith("ETA 0:00)")
    # the ETA starts from the cost model's prediction, said before the audit starts
    (predicted,) = [line for line in proc.stderr.splitlines() if "predicted wall time" in line]
    assert predicted.startswith("predicted wall time: about ")
    assert "this model's passes timed here on cpu" in predicted
    assert proc.stderr.index(predicted) < proc.stderr.index(lines[0])
    assert ", ETA -)" not in lines[0]  # a number from the first line on


def test_the_table_names_the_class_each_map_explains(
    json_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    from saliency_audit.workers.reports.text import format_summary

    _, out = json_run
    report = json.loads((out / "report.json").read_text())
    printed = format_summary(report)
    assert "explained class per image" in printed
    for image in report["images"]:
        row = next(line for line in printed.splitlines() if line.startswith(image["name"] + " "))
        assert f"{image['target']} ({image['target_name']})" in row
    assert all(image["target_name"] for image in report["images"])  # the model names classes
