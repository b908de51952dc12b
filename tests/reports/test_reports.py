"""The PDF and HTML reports, rendered from a real (small) audit of the reference shapes ResNet
and read back with poppler (pdftoppm, pdftotext, pdfimages) and headless Chromium."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from saliency_audit.workers.engine import similarity
from saliency_audit.workers.engine.images import (
    DecodedImage,
    load_image_folder,
    load_mask_folder,
    masks_tensor,
    preprocess,
)
from saliency_audit.workers.engine.models.loader import load_model
from saliency_audit.workers.engine.runner import run_audit
from saliency_audit.workers.engine.spec import AuditSpec
from saliency_audit.workers.reports import content
from saliency_audit.workers.reports.content import build_content
from saliency_audit.workers.reports.heatmaps import heatmap_png, overlay_png
from saliency_audit.workers.reports.html import render_html
from saliency_audit.workers.reports.pdf import render_pdf

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "reference"
CACHE = Path(__file__).resolve().parents[1] / ".cache"
TESTS = ("cascading", "independent", "layers")
METHODS = ("gradient", "guided_backprop", "gradcam", "relevance_cam")
HEATMAP_IMAGES = 16  # as workers/tasks.py: trained-model heatmaps of the first images


class Audit:
    """A report.json as the service stores it (with ``artifacts``) and its picture store."""

    def __init__(self, report: dict[str, Any], store: dict[str, bytes]) -> None:
        self.report = report
        self.store = store

    def picture(self, sha256: str) -> bytes:
        return self.store[sha256]


def _shapes_images() -> list[DecodedImage]:
    """One image of each of the six shape classes, so the grids show different targets."""
    decoded = load_image_folder(REFERENCE / "shapes_images", 3)
    first: dict[str, DecodedImage] = {}
    for image in decoded:
        first.setdefault(image.name.rsplit("_", 1)[0], image)
    return list(first.values())


def _artifacts(
    result: Any, images: list[DecodedImage]
) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The pictures the service renders (workers/tasks.py ``_heatmaps``), listed the way it
    lists them in report.json."""
    store: dict[str, bytes] = {}
    listed: list[dict[str, Any]] = []

    def add(
        test: str, stage: str, method: str, maps: np.ndarray, count: int, overlay: bool
    ) -> None:
        for i in range(min(count, len(maps))):
            png = overlay_png(maps[i], images[i].pixels) if overlay else heatmap_png(maps[i])
            sha = hashlib.sha256(png).hexdigest()
            store[sha] = png
            listed.append(
                {
                    "kind": "overlay_png" if overlay else "heatmap_png",
                    "method": method,
                    "test": test,
                    "stage": stage,
                    "image": images[i].name,
                    "sha256": sha,
                    "media_type": "image/png",
                    "url": f"/v1/audits/a1/artifacts/{sha}",
                }
            )

    for method, maps in result.maps.items():
        add("model", "trained", method, maps, HEATMAP_IMAGES, overlay=False)
    for name, test in result.tests.items():
        for stage, by_method in test.example_maps.items():
            for method, maps in by_method.items():
                add(name, stage, method, maps, len(maps), overlay=name == "layers")
    return listed, store


@pytest.fixture(scope="module")
def audit() -> Audit:
    model = load_model((REFERENCE / "shapes_small_resnet.onnx").read_bytes())
    decoded = _shapes_images()
    x = preprocess(decoded, model.input_spec)
    masks = masks_tensor(
        load_mask_folder(REFERENCE / "shapes_masks", [d.name for d in decoded]), model.input_spec
    )
    spec = AuditSpec(methods=METHODS, tests=TESTS, batch_size=8, seed=0)
    result = run_audit(model, x, spec, image_names=[d.name for d in decoded], masks=masks)
    report = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    report["artifacts"], store = _artifacts(result, decoded)
    return Audit(report, store)


@pytest.fixture(scope="module")
def pdf(audit: Audit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pdf") / "report.pdf"
    path.write_bytes(render_pdf(audit.report, audit.picture))
    return path


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (Debian: apt-get install poppler-utils chromium)")
    return found


def _pdftotext(path: Path) -> str:
    return subprocess.run(
        [_tool("pdftotext"), "-layout", str(path), "-"], check=True, capture_output=True, text=True
    ).stdout


def _pages(path: Path, out: Path) -> list[Path]:
    subprocess.run(
        [_tool("pdftoppm"), "-png", "-r", "60", str(path), str(out / "page")],
        check=True,
        capture_output=True,
    )
    return sorted(out.glob("page-*.png"), key=lambda p: int(p.stem.split("-")[-1]))


def _pdf_images(path: Path) -> list[tuple[int, int]]:
    """(width, height) of every image drawn on the PDF's pages, one per use (soft masks,
    the alpha channels of images, left out)."""
    listing = subprocess.run(
        [_tool("pdfimages"), "-list", str(path)], check=True, capture_output=True, text=True
    ).stdout.splitlines()[2:]
    rows = [line.split() for line in listing if line.strip()]
    return [(int(row[3]), int(row[4])) for row in rows if row[2] == "image"]


def _words(text: str) -> str:
    return re.sub(r"\s+", " ", text)


# ---------------------------------------------------------------------------------------- PDF


def test_the_pdf_has_the_verdicts_every_test_the_metrics_and_the_spec(
    audit: Audit, pdf: Path
) -> None:
    text = _pdftotext(pdf)
    flat = _words(text)
    verdicts = audit.report["verdicts"]
    assert verdicts, "the audit decided no verdict"
    for v in verdicts:
        assert v["method"] in text
        assert v["verdict"] in text
    for test in TESTS:
        assert test in text
    assert "Sanity check: cascading" in flat and "Sanity check: independent" in flat
    assert "Per-layer analysis" in flat
    assert "Average Drop" in text
    # the reproduction spec is printed whole: every line of its JSON is on some page
    spec_lines = json.dumps(audit.report["spec"], indent=2, sort_keys=True).splitlines()
    page_lines = {line.strip() for line in text.splitlines()}
    missing = [line for line in spec_lines if line.strip() not in page_lines]
    assert not missing, f"spec lines not in the PDF: {missing[:5]}"
    assert audit.report["model"]["sha256"] in text


def test_the_pdf_pages_are_drawn_with_a_cover_and_coloured_figures(
    pdf: Path, tmp_path: Path
) -> None:
    pages = _pages(pdf, tmp_path)
    assert len(pages) > 2
    cover = np.asarray(Image.open(pages[0]).convert("L"), dtype=np.float64)
    assert cover.std() > 20, "the cover page is blank"

    def coloured_share(page: Path) -> float:
        rgb = np.asarray(Image.open(page).convert("RGB"), dtype=np.int32)
        return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean())

    assert max(coloured_share(p) for p in pages[1:]) > 0.01, "no page has colour (figures)"
    # the verdict table is coloured on the cover itself
    assert coloured_share(pages[0]) > 0.005


def test_the_pdf_shows_each_picture_of_the_content_and_one_figure_per_sanity_test(
    audit: Audit, pdf: Path
) -> None:
    built = build_content(audit.report)
    drawn = _pdf_images(pdf)
    figures = [size for size in drawn if size[0] > 600]  # curves: 7.5 in at 150 dpi
    pictures = [size for size in drawn if size[0] <= 600]
    assert len(figures) == len(built.figures()) == 2  # cascading and independent
    assert len(pictures) == len(built.pictures()) > 0
    # per image shown (2): the sanity grids, methods and controls x (trained + each stage),
    # and the layer grid, the analysis' methods x its layers
    tests = audit.report["tests"]
    rows = len(METHODS) + 2
    sanity = sum(
        rows * (1 + len(tests[t]["stage_plan"]["computed"])) for t in ("cascading", "independent")
    )
    layers = len(tests["layers"]["details"]["methods"]) * len(tests["layers"]["stages"])
    assert len(built.pictures()) == content.GRID_IMAGES * (sanity + layers)


def test_the_same_report_gives_the_same_pdf_bytes(audit: Audit, pdf: Path) -> None:
    again = render_pdf(copy.deepcopy(audit.report), audit.picture)
    assert again == pdf.read_bytes()


# --------------------------------------------------------------------------------------- HTML


def test_the_html_says_what_the_pdf_says_with_the_same_pictures(audit: Audit, pdf: Path) -> None:
    page = render_html(audit.report, audit.picture)
    for v in audit.report["verdicts"]:
        assert v["method"] in page and v["verdict"] in page
    for test in TESTS:
        assert test in page
    assert "Average Drop" in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    drawn = [size for size in _pdf_images(pdf) if size[0] <= 600]
    assert len(images) == len(drawn) == len(build_content(audit.report).pictures())
    assert page.count("<svg") == 2
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<script" not in page
    assert render_html(copy.deepcopy(audit.report), audit.picture) == page


# what chromium logs for the page's own console (``console.error``, uncaught exceptions, CSP
# refusals): "CONSOLE(12)" in older builds, "INFO:CONSOLE:12]" in newer ones; its own chatter
# (dbus, GPU, sandbox) is not about the page
_PAGE_CONSOLE = re.compile(r"CONSOLE[(:]|Uncaught|Refused to")


def _chromium_screenshot(page: Path, shot: Path, profile: Path) -> list[str]:
    """Open ``page`` in headless Chromium, save a 1280 x 2400 screenshot to ``shot`` and
    return the page's console lines."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: the HTML report cannot be checked in a browser")
    run = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            "--window-size=1280,2400",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), f"no screenshot (rc {run.returncode}): {run.stderr[-2000:]}"
    return [line for line in run.stderr.splitlines() if _PAGE_CONSOLE.search(line)]


def test_the_console_check_sees_a_page_that_logs_an_error(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><body><p>x</p><script>console.error('boom');</script></body></html>",
        encoding="utf-8",
    )
    lines = _chromium_screenshot(page, tmp_path / "broken.png", tmp_path / "profile")
    assert any("boom" in line for line in lines), lines


def test_the_html_renders_in_headless_chromium_without_console_errors(
    audit: Audit, tmp_path: Path
) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(audit.report, audit.picture), encoding="utf-8")
    shot = tmp_path / "report.png"
    page_errors = _chromium_screenshot(page, shot, tmp_path / "profile")
    assert not page_errors, "\n".join(page_errors)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels.std() > 20, "the screenshot is blank"
    # the coloured verdict cells are on screen
    assert ((pixels.max(axis=2) - pixels.min(axis=2)) > 60).mean() > 0.001
    CACHE.mkdir(exist_ok=True)
    shutil.copyfile(shot, CACHE / "report-screenshot.png")


def test_report_text_is_escaped_in_the_html(audit: Audit) -> None:
    report = copy.deepcopy(audit.report)
    hostile = '<script>alert("x")</script>'
    report["images"][0]["name"] = hostile
    report["tests"]["cascading"]["stages"][0]["name"] = f"fc{hostile}"
    for score in report["tests"]["cascading"]["scores"]:
        if score["stage_index"] == 1:
            score["stage"] = f"fc{hostile}"
    page = render_html(report, audit.picture)
    assert "<script" not in page
    assert "&lt;script&gt;" in page


# ------------------------------------------------------------------------------ missing parts


def test_a_report_without_layers_or_pictures_still_renders_and_says_so(
    audit: Audit, tmp_path: Path
) -> None:
    report = copy.deepcopy(audit.report)
    del report["tests"]["layers"]
    del report["artifacts"]
    report["spec"]["tests"] = ["cascading", "independent"]

    def no_picture(sha256: str) -> bytes:
        raise AssertionError(f"no picture should be fetched, asked for {sha256}")

    path = tmp_path / "bare.pdf"
    path.write_bytes(render_pdf(report, no_picture))
    text = _words(_pdftotext(path))
    assert "The layers analysis was not run" in text
    assert "No heatmaps of cascading in this report" in text
    assert "No layers analysis, so no faithfulness metrics" in text
    assert _pdf_images(path) and all(w > 600 for w, _ in _pdf_images(path))  # figures only
    page = render_html(report, no_picture)
    assert "The layers analysis was not run" in page and "<img" not in page
    for v in report["verdicts"]:
        assert v["method"] in text and v["verdict"] in text


def test_a_report_of_a_test_that_did_not_run_and_no_verdicts_renders(audit: Audit) -> None:
    report = copy.deepcopy(audit.report)
    report["verdicts"] = []
    independent = report["tests"]["independent"]
    independent.update(status="not_run", reason="the model has one unit", scores=[], stages=[])
    built = build_content(report)
    texts = [b.text for b in built.blocks() if isinstance(b, content.Paragraph)]
    assert any("No verdicts" in t for t in texts)
    assert any(t == "Not run: the model has one unit." for t in texts)
    assert render_pdf(report, audit.picture).startswith(b"%PDF")


def test_a_missing_picture_is_marked_not_fatal(audit: Audit) -> None:
    def flaky(sha256: str) -> bytes:
        raise FileNotFoundError(sha256)

    page = render_html(audit.report, flaky)
    assert "image unavailable" in page and "<img" not in page
    assert render_pdf(audit.report, flaky).startswith(b"%PDF")


# -------------------------------------------------------------------------------- definitions


def test_the_measure_definitions_state_the_engines_parameters() -> None:
    """The report restates the similarity parameters (its package cannot import torch);
    a change in the engine must show up here."""
    hog = content.MEASURE_DEFINITIONS["hog_pearson"]
    assert f"{similarity.HOG_ORIENTATIONS} unsigned orientation bins" in hog
    assert "{}x{}-pixel cells".format(*similarity.HOG_PIXELS_PER_CELL) in hog
    assert "{}x{}-cell blocks".format(*similarity.HOG_CELLS_PER_BLOCK) in hog
    assert f"at least {similarity.MIN_MAP_SIDE_PX['hog_pearson']} pixels" in hog
    ssim = content.MEASURE_DEFINITIONS["ssim"]
    win = similarity.SSIM_WIN_SIZE
    assert f"{win}x{win} uniform window" in ssim
    assert f"K1 = {similarity.SSIM_K1}, K2 = {similarity.SSIM_K2}" in ssim
    assert set(content.MEASURE_DEFINITIONS) >= set(similarity.MEASURES)


def test_the_appendix_defines_every_metric_and_measure_used(audit: Audit) -> None:
    built = build_content(audit.report)
    terms = [
        term
        for block in built.blocks()
        if isinstance(block, content.Definitions)
        for term, _ in block.items
    ]
    scored = {s["measure"] for s in audit.report["tests"]["cascading"]["scores"]}
    assert scored
    for measure in scored:
        assert any(t.startswith(f"{measure}:") for t in terms), measure
    for metric in audit.report["tests"]["layers"]["details"]["metrics"]:
        assert metric in terms
