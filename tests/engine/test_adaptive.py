"""Adaptive audits (spec ``adaptive``): images in rounds, stop when every verdict is decided.

On a tiny CNN with many cheap images: the adaptive run stops early with the full run's verdicts
and says why; an undecidable verdict uses every image; the rounds measure exactly what one
fixed run over the same images measures; what the confidence sequence cannot decide is refused
up front."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from saliency_audit.workers.engine.adaptive import image_order
from saliency_audit.workers.engine.contract.cost import audit_passes
from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.engine.image_files import MAX_IMAGES
from saliency_audit.workers.engine.images import DecodedImage
from saliency_audit.workers.engine.merge import splittable
from saliency_audit.workers.engine.methods import METHODS
from saliency_audit.workers.engine.result import AuditResult
from saliency_audit.workers.engine.runner import run_audit
from saliency_audit.workers.engine.spec import AuditSpec
from saliency_audit.workers.reports.content import Table, build_content
from saliency_audit.workers.reports.heatmaps import report_pictures
from saliency_audit.workers.reports.schema import report_schema
from tests.engine.nets import images, small_cnn
from tests.engine.test_runner import FAST, _loaded

REPO = Path(__file__).resolve().parents[2]
N = 64
ROUND = 32


def _spec(**kwargs: Any) -> AuditSpec:
    base: dict[str, Any] = dict(
        methods=("gradient",),
        tests=("cascading",),
        measures=("ssim",),
        seed=0,
        batch_size=32,
        device="cpu",
        params=FAST,
    )
    return AuditSpec.from_dict({**base, **kwargs})


@pytest.fixture(scope="module")
def inputs() -> tuple[Any, list[str], np.ndarray]:
    x = images(N, 16, seed=3)
    names = [f"img_{i:02d}" for i in range(N)]
    order = image_order(N, _spec(adaptive={"round_images": ROUND}))
    return x, names, order


@pytest.fixture(scope="module")
def full(inputs: tuple[Any, list[str], np.ndarray]) -> AuditResult:
    """The fixed audit of every image, in the order an adaptive audit takes them."""
    x, names, order = inputs
    return run_audit(_loaded(small_cnn()), x[order], _spec(), image_names=[names[i] for i in order])


def _verdicts(result: AuditResult) -> dict[tuple[str, str], str]:
    return {(v.method, v.test): v.verdict for v in result.verdicts}


def test_a_clear_verdict_stops_the_audit_early_with_the_full_runs_verdict(
    inputs: tuple[Any, list[str], np.ndarray], full: AuditResult
) -> None:
    x, names, order = inputs
    result = run_audit(
        _loaded(small_cnn()), x, _spec(adaptive={"round_images": ROUND}), image_names=names
    )
    assert _verdicts(full)[("gradient", "cascading")] == "PASS"
    assert _verdicts(result) == _verdicts(full)  # the controls' verdicts included
    run = result.adaptive
    assert run is not None and run.stopped == "decided"
    assert run.images_used == ROUND < run.images_available == N
    assert run.reason == f"every verdict was decided after {ROUND} of {N} images (1 round)"
    assert [(r.round, r.images, r.decided, r.pending) for r in run.rounds] == [(1, ROUND, 3, 0)]
    # every number of the report speaks of the images used: the first round of the order
    assert [i.name for i in result.images] == [names[i] for i in order[:ROUND]]
    assert result.maps["gradient"].shape == (ROUND, 16, 16)
    gradient = next(v for v in result.verdicts if v.method == "gradient")
    assert gradient.n == ROUND and "95% confidence sequence" in gradient.reason
    # the report says so, validates against the published schema and reads back
    document = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert document["adaptive"]["images_used"] == ROUND
    jsonschema.Draft202012Validator(report_schema()).validate(document)
    assert json.loads(json.dumps(AuditResult.from_dict(document).to_dict())) == document
    assert "adaptive" not in full.to_dict()
    # the PDF and HTML reports say what the intervals are
    captions = [b.caption or "" for b in build_content(document).blocks() if isinstance(b, Table)]
    assert any("anytime-valid 95% confidence sequence (an adaptive audit: every" in c
               for c in captions)  # fmt: skip
    # the report's pictures name the images the maps are of (given in the files' order)
    given = [DecodedImage(name, np.zeros((16, 16, 3), np.uint8)) for name in names]
    listed, _ = report_pictures(result, given)
    trained = [p["image"] for p in listed if p["method"] == "gradient" and p["stage"] == "trained"]
    assert trained == [names[i] for i in order[:16]]


def test_an_undecidable_verdict_uses_every_image_and_rounds_measure_what_one_run_does(
    inputs: tuple[Any, list[str], np.ndarray], full: AuditResult
) -> None:
    x, names, _ = inputs
    # a policy whose undecided zone holds gradient's mean: no number of images decides it
    mean = next(v.mean for v in full.verdicts if v.method == "gradient")
    assert mean is not None
    zone = {"threshold": round(mean - 0.05, 3), "fail_threshold": round(mean + 0.05, 3)}
    policy = {"extends": "default", "tests": {"cascading": {**_cascading(), **zone}}}
    result = run_audit(
        _loaded(small_cnn()),
        x,
        _spec(adaptive={"round_images": ROUND}, policy=policy),
        image_names=names,
    )
    run = result.adaptive
    assert run is not None and run.stopped == "exhausted" and run.images_used == N
    assert run.reason.startswith(f"the images ran out after {N} images with undecided verdicts")
    assert "gradient/cascading" in run.reason
    assert [r.images for r in run.rounds] == [ROUND, N] and run.rounds[-1].pending >= 1
    assert _verdicts(result)[("gradient", "cascading")] == "INCONCLUSIVE"
    # two rounds of 32 give every per-image score, mean and bootstrap interval of one run over
    # the same 64 images (noise and random maps follow each image's position, not its round)
    assert [i.name for i in result.images] == [i.name for i in full.images]
    assert result.tests["cascading"].scores == full.tests["cascading"].scores
    for name, maps in full.maps.items():
        np.testing.assert_array_equal(result.maps[name], maps)


def _cascading() -> dict[str, Any]:
    from saliency_audit.workers.engine.policy import default_document

    rule: dict[str, Any] = default_document()["tests"]["cascading"]
    return rule


@pytest.mark.parametrize(
    ("tests", "words"),
    [
        (("cascading", "emprt"), "not emprt"),
        (("data_randomization",), "not data_randomization"),
        (("layers",), "not layers"),
    ],
)
def test_what_a_confidence_sequence_cannot_decide_is_refused_by_the_spec(
    tests: tuple[str, ...], words: str
) -> None:
    with pytest.raises(SpecError, match=words):
        _spec(tests=tests, adaptive={})
    _spec(tests=tests)  # a fixed audit runs them


def test_the_order_is_seeded_and_max_images_caps_it() -> None:
    spec = _spec(adaptive={"round_images": 8, "max_images": 20})
    order = image_order(50, spec)
    assert len(order) == 20 and len(set(order.tolist())) == 20
    np.testing.assert_array_equal(order, image_order(50, spec))
    assert not np.array_equal(order, image_order(50, _spec(seed=1, adaptive={"max_images": 20})))
    # the cap cannot exceed what an image set holds
    with pytest.raises(SpecError, match="max_images must be <= 10000"):
        _spec(adaptive={"max_images": MAX_IMAGES + 1})


def test_an_adaptive_audit_is_priced_at_its_cap_and_never_split_across_workers() -> None:
    families = {name: info.family for name, info in METHODS.items()}
    capped = _spec(methods=("gradient", "guided_backprop"), adaptive={"max_images": 20})
    whole = _spec(methods=("gradient", "guided_backprop"))
    common = dict(stages=5, onnx=True)
    assert audit_passes(capped, families, images=100, **common) == audit_passes(
        whole, families, images=20, **common
    )
    assert audit_passes(_spec(adaptive={}), families, images=100, **common) == audit_passes(
        _spec(), families, images=100, **common
    )
    assert splittable(whole) and not splittable(capped)


def test_cli_run_adaptive_stops_early_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from saliency_audit.service.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((REPO / "examples/reference/shapes_images").glob("*.png"))[:40]:
        (folder / path.name).write_bytes(path.read_bytes())
    model = REPO / "examples/reference/shapes_small_cnn.onnx"
    args = ["run", "--model", str(model), "--images", str(folder), "--methods", "gradient",
            "--measures", "ssim"]  # fmt: skip
    assert main([*args, "--max-images", "20", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--max-images needs --adaptive" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main([*args, "--adaptive", "16", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    run = report["adaptive"]
    assert run["round_images"] == 16 and run["images_available"] == 40
    assert run["stopped"] == "decided" and run["images_used"] < 40
    assert len(report["images"]) == run["images_used"]
    assert report["fidelity"]["n_images"] == run["images_used"]  # checked round by round
    assert f"adaptive: {run['reason']}; rounds of 16 images" in printed
    assert "PASS when the 95% confidence sequence is below" in printed
