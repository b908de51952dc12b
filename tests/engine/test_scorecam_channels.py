"""Score-CAM's channel selection (``params.scorecam_channels``, Faster Score-CAM's top-k channels
by spatial variance): every channel when k reaches the layer's width, otherwise exactly
Score-CAM on the selected channels alone, with one masked pass per kept channel; the contract,
the cost estimate and the reports state the selection.

The reference for "Score-CAM on those channels" is pytorch-grad-cam's ``ScoreCAM``: its
``get_cam_weights`` takes the activations to weight as an argument, so it is handed the
channels that the selection must pick, derived by hand from a net whose channel variances are
set by construction.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from pytorch_grad_cam import ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from saliency_audit.workers.engine.contract import cost
from saliency_audit.workers.engine.errors import SpecError
from saliency_audit.workers.engine.methods.base import MethodContext, compute_methods, get_module
from saliency_audit.workers.engine.methods.scorecam import top_variance_channels
from saliency_audit.workers.engine.models.base import LoadedModel
from saliency_audit.workers.engine.runner import run_audit
from saliency_audit.workers.engine.spec import AuditSpec, InputSpec, MethodParams
from saliency_audit.workers.reports.content import Table, build_content
from saliency_audit.workers.reports.html import render_html
from saliency_audit.workers.reports.text import format_summary
from tests.engine.nets import images, small_cnn

RTOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet_reference_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def scorecam(model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: str, k: int | None) -> Any:
    ctx = MethodContext(layer=layer, params=MethodParams(scorecam_batch=7, scorecam_channels=k))
    out = compute_methods(model, x, t, ["scorecam"], ctx)["scorecam"]
    assert isinstance(out, torch.Tensor)
    return out


def min_max(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1).double()
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / flat.max(dim=1, keepdim=True).values
    return flat.view(maps.shape[0], *maps.shape[2:]).float()


# --- a net whose CAM layer copies the input: channel variances are chosen by construction ------


class PassThrough(nn.Module):
    """``layer`` is a 1x1 conv with identity weights, so its activation is the input itself and
    each channel's spatial variance is whatever the input gives it; a seeded head follows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.layer = nn.Conv2d(4, 4, 1, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        self.head = nn.Sequential(
            nn.Conv2d(4, 6, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x))


# per image, the standard deviation of each input channel (and so of each CAM channel)
SPREADS = ((1.0, 2.0, 3.0, 0.5), (3.0, 0.5, 1.0, 2.0))
# largest variance first: image 0 keeps channels 2 (sd 3) and 1 (sd 2), image 1 keeps 0 and 3
TOP_TWO = ((2, 1), (0, 3))
TARGETS = torch.tensor([1, 2])


def spread_images() -> torch.Tensor:
    """Two 4-channel 6x6 images whose channel c has exactly the standard deviation
    ``SPREADS[n][c]`` over its pixels (standardized noise, scaled), plus a positive offset."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    z = (z - z.mean(dim=(2, 3), keepdim=True)) / z.std(dim=(2, 3), keepdim=True, unbiased=False)
    return (z * torch.tensor(SPREADS, dtype=torch.float64)[:, :, None, None] + 1.0).float()


def test_the_selection_keeps_each_images_channels_of_largest_spatial_variance() -> None:
    x = spread_images()
    assert top_variance_channels(x, 2).tolist() == [list(c) for c in TOP_TWO]
    assert top_variance_channels(x, 1).tolist() == [[2], [0]]
    assert top_variance_channels(x, 4) is None and top_variance_channels(x, None) is None
    # constant channels (variance 0) tie: the lower index wins, whatever the run
    flat = torch.zeros(1, 5, 3, 3)
    flat[0, 3] = torch.arange(9.0).view(3, 3)
    assert top_variance_channels(flat, 3).tolist() == [[3, 0, 1]]


def test_top_k_scorecam_is_scorecam_on_the_selected_channels_alone() -> None:
    model, x = PassThrough().eval(), spread_images()
    ours = scorecam(model, x, TARGETS, "layer", k=2)
    # reference: pytorch-grad-cam's Score-CAM weights of the hand-picked channels only (each
    # masked input still runs through the whole model), then ReLU(sum_k w_k A_k); the layer has
    # the input's 6x6 size, so there is nothing to upsample.
    picked = torch.stack([x[n, list(TOP_TWO[n])] for n in range(2)])
    with ScoreCAM(model, [model.layer]) as cam:
        weights = cam.get_cam_weights(
            x, model.layer, [ClassifierOutputTarget(int(c)) for c in TARGETS], picked.numpy(), None
        )
    expected = torch.relu((torch.from_numpy(weights)[:, :, None, None] * picked).sum(1))
    torch.testing.assert_close(ours[:, 0], expected, rtol=RTOL, atol=RTOL * float(expected.max()))
    # and the selection matters here: Score-CAM over all four channels draws another map
    full = scorecam(model, x, TARGETS, "layer", k=None)
    assert float((min_max(full) - min_max(ours)).abs().max()) > 0.05


def test_k_at_or_above_the_layer_width_is_full_scorecam_and_matches_pytorch_grad_cam() -> None:
    model, x, t = small_cnn(), images(3, 32, seed=3), torch.tensor([3, 0, 4])
    layer = "features.3"  # 16 channels
    full = scorecam(model, x, t, layer, k=None)
    for k in (16, 17, 10_000):
        assert torch.equal(scorecam(model, x, t, layer, k=k), full)
    with ScoreCAM(model, [get_module(model, layer)]) as cam:
        expected = cam(x, [ClassifierOutputTarget(int(c)) for c in t])
    torch.testing.assert_close(min_max(full), torch.from_numpy(expected), rtol=RTOL, atol=RTOL)
    assert not torch.equal(scorecam(model, x, t, layer, k=15), full)


@pytest.mark.parametrize("k", [1, 3, None])
def test_scorecam_runs_one_masked_row_per_kept_channel(k: int | None) -> None:
    model, x = PassThrough().eval(), spread_images()
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        scorecam(model, x, TARGETS, "layer", k=k)
    finally:
        handle.remove()
    # the capture of the layer (2 rows), then 2 images x k kept channels (4: all), 7 a pass
    masked = 2 * (4 if k is None else k)
    assert rows[0] == 2 and sum(rows[1:]) == masked and max(rows[1:]) <= 7


# --- the contract, the cost estimate and the reports -----------------------------------------


@pytest.mark.parametrize("k", [0, 16_385, "8", True])
def test_scorecam_channels_out_of_bounds_is_a_spec_error(k: Any) -> None:
    with pytest.raises(SpecError, match="scorecam_channels"):
        MethodParams(scorecam_channels=k)


def test_every_channel_is_the_default_because_top_k_changed_verdicts() -> None:
    # bench/RESULTS.md ("Score-CAM channel selection"): top-k moved every calibration
    # statistic out of the full audit's interval, so it stays an option
    assert MethodParams().scorecam_channels is None


def test_the_cost_estimate_prices_k_masked_rows_per_image_and_state() -> None:
    families = {"scorecam": "scorecam"}

    def forward_rows(k: int | None) -> float:
        spec = AuditSpec(methods=("scorecam",), params=MethodParams(scorecam_channels=k))
        count = cost.audit_passes(spec, families, images=10, stages=0, onnx=False)
        return count.total_rows()[cost.FW]

    # one state (the trained model), 10 images: capture 10 + predictions 10 + masked 10 x k
    assert forward_rows(32) == 20 + 10 * 32
    assert forward_rows(None) == 20 + 10 * cost.SCORECAM_CHANNELS
    assert forward_rows(10_000) == forward_rows(None)  # never more than the upper bound


def test_the_reports_state_the_scorecam_channel_selection() -> None:
    model = LoadedModel(small_cnn(), InputSpec(height=32, width=32), "torch", "t")
    x = images(2, 32, seed=1)
    texts = {}
    for k in (None, 8):
        spec = AuditSpec(methods=("scorecam",), params=MethodParams(scorecam_channels=k))
        report = json.loads(json.dumps(run_audit(model, x, spec).to_dict()))
        assert report["spec"]["params"]["scorecam_channels"] == k
        cover = next(b for b in build_content(report).cover if isinstance(b, Table))
        rows = {r[0].text: r[1].text for r in cover.rows}
        summary = format_summary(report)
        assert f"Score-CAM channels: {rows['Score-CAM channels']}" in summary
        texts[k] = rows["Score-CAM channels"]
    assert texts[None] == "every channel of the CAM layer"
    assert texts[8].startswith("each image's 8 channels of largest spatial variance")
    # the PDF and the HTML draw that cover; the HTML is checked here (no picture to fetch)
    page = render_html(report, lambda sha256: b"")
    assert "Score-CAM channels" in page
    assert "8 channels of largest spatial variance (Faster Score-CAM" in page
