"""The cost model: pass prices measured on the model, a prediction derived from the spec.

The prediction's arithmetic is checked by hand on small specs; the probe's model facts (stages,
CAM layer, channels) against the engine's own; the ETA's blend by hand. How close predictions
come to real wall times is a benchmark (bench/cost_model.py, bench/RESULTS.md), not a timed
unit test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from saliency_audit.workers.engine.contract.cost import (
    ORT_MIN_WORK_PIXELS,
    Line,
    PassPrices,
    eta_seconds,
    predict,
)
from saliency_audit.workers.engine.contract.spec import AuditSpec, MethodParams

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {
    "gradient": "gradient",
    "gradcam": "gradient",
    "guided_backprop": "guided",
    "lrp": "lrp",
    "relevance_cam": "lrp",
    "integrated_gradients": "integrated_gradients",
    "smoothgrad": "noise",
    "scorecam": "scorecam",
}


def prices(**changes: object) -> PassPrices:
    base: dict[str, object] = dict(
        device="cpu",
        threads=2,
        height=32,
        width=32,
        forward_backward=Line(0.5, 0.1),
        forward=Line(0.1, 0.05),
        forward_ort=Line(0.0, 0.01),
        export_s=2.0,
        lrp_passes=3.0,
        score_s=0.01,
        scored_measures=("ssim", "spearman"),
        stages={"block": 3, "module": 10},
        cam_layer="conv2",
        channels={"conv1": 8, "conv2": 16},
        measured_s=0.5,
    )
    base.update(changes)
    return PassPrices(**base)  # type: ignore[arg-type]


def spec(**changes: object) -> AuditSpec:
    fields: dict[str, object] = dict(
        methods=("gradient",),
        tests=("cascading",),
        batch_size=4,
        stages="all",
        measures=("ssim",),
    )
    fields.update(changes)
    return AuditSpec(**fields)  # type: ignore[arg-type]


def test_a_line_through_two_measured_batch_sizes() -> None:
    line = Line.through((4, 1.0), (16, 2.2))
    assert line.per_row == pytest.approx(0.1) and line.fixed == pytest.approx(0.6)
    assert line.at(32) == pytest.approx(3.8)
    # a larger batch measured faster than a smaller one (noise) never prices rows negatively
    flat = Line.through((4, 1.0), (16, 0.9))
    assert flat.per_row == 0.0 and flat.at(64) == pytest.approx(1.0)


def test_one_gradient_method_priced_by_hand() -> None:
    # 3 block stages, every one computed: 4 model states x 8 images = 32 forward + backward rows
    # in passes of 4 (8 x (0.5 + 0.4) = 7.2 s); predictions 8 rows (2 x (0.1 + 0.2) = 0.6 s);
    # scoring gradient and the random control, one measure, 8 images, 3 stages (0.48 s)
    found = predict(spec(), FAMILIES, prices(), images=8, onnx=False)
    assert found.parts == pytest.approx({"forward+backward": 7.2, "forward": 0.6, "scoring": 0.48})
    assert found.seconds == pytest.approx(8.28)
    # an ONNX model: the fidelity check's forward rows and one session
    onnx = predict(spec(), FAMILIES, prices(), images=8, onnx=True)
    assert onnx.seconds == pytest.approx(8.28 + 0.6 + 2.0)


def test_measures_that_do_not_apply_at_the_size_are_not_priced() -> None:
    two = spec(measures=("ssim", "spearman", "hog_pearson"))
    found = predict(two, FAMILIES, prices(), images=8, onnx=False)
    assert found.parts["scoring"] == pytest.approx(2 * 0.48)  # hog: not at 32 px


def test_lrp_is_priced_at_its_measured_multiple_of_a_plain_pass() -> None:
    found = predict(
        spec(methods=("lrp", "relevance_cam")), FAMILIES, prices(), images=8, onnx=False
    )
    # two LRP map sets per state, each 3 plain passes: 2 x 32 rows / 4 x 0.9 s x 3
    assert found.parts["forward+backward (LRP rules)"] == pytest.approx(2 * 8 * 0.9 * 3)


def test_samples_run_in_passes_of_32_rows() -> None:
    params = MethodParams(ig_steps=8)
    found = predict(
        spec(methods=("integrated_gradients",), params=params),
        FAMILIES,
        prices(),
        images=8,
        onnx=False,
    )
    # 8 steps x 8 images x 4 states = 256 rows in passes of 32: 8 x (0.5 + 3.2)
    assert found.parts["forward+backward"] == pytest.approx(8 * 3.7)


def test_scorecam_masks_every_channel_of_its_layer_in_pytorch_or_onnx_runtime() -> None:
    small = predict(spec(methods=("scorecam",)), FAMILIES, prices(), images=8, onnx=False)
    # conv2 has 16 channels: 8 x 16 x 4 states masked rows in passes of 64 (PyTorch: a batch
    # of 4 images x 16 channels x 32 x 32 px is under ORT_MIN_WORK_PIXELS)
    assert ORT_MIN_WORK_PIXELS > 4 * 16 * 32 * 32
    assert small.parts["forward (masked)"] == pytest.approx(512 / 64 * (0.1 + 64 * 0.05))
    assert "scorecam export" not in small.parts
    big = prices(height=224, width=224, channels={"conv2": 512})
    large = predict(spec(methods=("scorecam",)), FAMILIES, big, images=8, onnx=False)
    rows = 8 * 512 * 4
    assert large.parts["scorecam masked (ONNX Runtime)"] == pytest.approx(rows / 64 * 0.64)
    assert large.parts["scorecam export"] == pytest.approx(4 * 2.0)  # one export per state
    # a named layer is priced by its own channels
    named = predict(
        spec(methods=("scorecam",), layer="conv1"), FAMILIES, prices(), images=8, onnx=False
    )
    assert named.parts["forward (masked)"] == pytest.approx(256 / 64 * (0.1 + 64 * 0.05))
    # on a GPU there is no ONNX Runtime export: the masked rows are PyTorch forwards
    on_gpu = prices(device="cuda", height=224, width=224, channels={"conv2": 512})
    gpu = predict(spec(methods=("scorecam",)), FAMILIES, on_gpu, images=8, onnx=False)
    assert "scorecam export" not in gpu.parts and "forward (masked)" in gpu.parts


def test_the_stage_plan_and_the_granularity_decide_the_states() -> None:
    from saliency_audit.workers.engine.policy import load_policy

    rules = {t: r.stage for t, r in load_policy(None).rules.items()}
    every = predict(
        spec(granularity="module"), FAMILIES, prices(), images=8, onnx=False, rule_stages=rules
    )
    planned = predict(
        spec(granularity="module", stages="rule"),
        FAMILIES,
        prices(),
        images=8,
        onnx=False,
        rule_stages=rules,
    )
    # 10 module stages: all of them (11 states) against the rule's plan (the area over the
    # first 25%: stages 1-3, and the last stage: 5 states); 2 passes of 4 rows per state
    assert every.parts["forward+backward"] == pytest.approx(11 * 2 * 0.9)
    assert planned.parts["forward+backward"] == pytest.approx(5 * 2 * 0.9)
    blocks = predict(
        spec(stages="rule"), FAMILIES, prices(), images=8, onnx=False, rule_stages=rules
    )
    assert blocks.parts["forward+backward"] < every.parts["forward+backward"]


def test_the_contract_keeps_the_engines_onnx_runtime_threshold() -> None:
    from saliency_audit.workers.engine.methods._ort import MIN_WORK_PIXELS

    assert ORT_MIN_WORK_PIXELS == MIN_WORK_PIXELS


def test_the_eta_blends_the_prediction_with_the_observed_rate() -> None:
    assert eta_seconds(100.0, 0.0, 0.0) == 100.0
    assert eta_seconds(None, 0.0, 0.0) is None
    assert eta_seconds(None, 10.0, 0.25) == pytest.approx(30.0)  # the rate alone
    # 10% done after 20 s: the rate says 200 s in all, the prediction 100 s; weight 0.2
    assert eta_seconds(100.0, 20.0, 0.1) == pytest.approx(0.2 * 200 + 0.8 * 100 - 20)
    assert eta_seconds(100.0, 60.0, 0.5) == pytest.approx(60.0)  # half-way on: the rate
    assert eta_seconds(100.0, 150.0, 0.2) == pytest.approx(0.4 * 750 + 0.6 * 100 - 150)
    assert eta_seconds(100.0, 5.0, 1.0) == 0.0


def test_the_probe_measures_the_model_and_records_the_engines_facts() -> None:
    from saliency_audit.workers.engine.layers import _outputs_in_order
    from saliency_audit.workers.engine.methods.base import cam_layer_choice
    from saliency_audit.workers.engine.models.loader import load_model
    from saliency_audit.workers.engine.randomization import stages, units
    from saliency_audit.workers.engine.timing import measure_pass_prices

    model = load_model((ROOT / "examples/reference/shapes_small_resnet.onnx").read_bytes())
    found = measure_pass_prices(model, "cpu")
    module = model.module
    assert found.stages == {
        g: len(stages(units(module, g), "cascading")) for g in ("block", "module")
    }
    import torch

    x = torch.zeros(1, 3, 32, 32)
    layer = cam_layer_choice(module, None, x).name
    assert found.cam_layer == layer
    calls = dict(_outputs_in_order(module, x))
    assert found.channels[layer] == calls[layer][1] and len(calls[layer]) == 4
    assert found.forward_backward.at(16) > 0 and found.forward.at(64) > 0
    assert found.forward_ort is not None and found.export_s > 0  # CPU: ONNX Runtime runs
    assert found.lrp_passes >= 1.0
    assert found.scored_measures == ("spearman_abs", "spearman", "ssim")  # no HOG at 32 px
    assert PassPrices.from_dict(found.to_dict()) == found
