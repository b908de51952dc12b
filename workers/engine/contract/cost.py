"""What an audit costs before it runs: the passes it needs, counted from its spec, times a
per-pass price.

Torch-free: the API prices every audit at submit (and refuses one above the tenant's budget),
and ``bench/efficiency.py`` divides an audit's wall time by the same count. The count is the
one the efficiency bench established (bench/RESULTS.md, "Efficiency of a full audit"), per
model state (the trained model and each randomized stage):

* forward + backward at ``batch_size`` rows, one row per image: the gradient family, the guided
  family, and each of LRP and Relevance-CAM (Zennit runs them separately);
* forward + backward at :data:`ROWS_PER_PASS` rows: ``ig_steps`` path points and
  ``noise_samples`` noisy copies per image (the noise family shares one set of samples);
* forward at ``batch_size`` rows: Score-CAM's capture of its layer; forward at
  ``scorecam_batch`` rows: one masked pass per live (image, channel);
* forward, once per audit: the predictions (and the PyTorch side of an ONNX fidelity check).

The tests multiply the model states: one per planned stage for the model randomization tests
(:func:`planned_stages`: the stages the policy's rule reads, or every stage with
``stages: "all"``), one for eMPRT (the fully randomized model), one for the random-logit test,
``2 x smprt_samples`` for sMPRT (noise-averaged maps of two models), two for the data
randomization test plus its training (two models, at most
``max_epochs`` epochs over the training images), and per explained layer of the ``layers``
analysis one map set and ``2 x faithfulness_steps`` forward passes (deletion and insertion).
What the submit cannot know is bounded from above: Score-CAM's live channels are taken as
:data:`SCORECAM_CHANNELS` per image (or ``scorecam_channels`` when fewer are selected),
training as running all ``max_epochs``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .spec import AuditSpec
from .stage_plan import planned_count

FB, FW = "forward+backward", "forward"
# the same passes where they cost differently: LRP's rule hooks (priced at a measured multiple
# of a plain forward + backward) and Score-CAM's masked forwards (ONNX Runtime where it runs)
FB_LRP, FW_MASKED = f"{FB} (LRP rules)", f"{FW} (masked)"
# rows per forward/backward of Integrated Gradients' path points and the noise family's noisy
# copies: both fold their samples into the batch axis this many rows at a time
ROWS_PER_PASS = 32
# Score-CAM's masked passes per image when the live channels are unknown: the channel count of
# a ResNet's last block (512), the usual Score-CAM layer
SCORECAM_CHANNELS = 512
# a forward pass costs about a third of a forward + backward (bench/RESULTS.md: resnet18 at
# 224 px, 64-row forward passes vs 32-row forward + backward passes on the 2-core CPU)
FORWARD_SHARE = 1 / 3
# the families of the catalogue whose maps cost passes, and how (controls cost none)
ONE_PASS_FAMILIES = ("gradient", "guided")
PER_METHOD_FAMILIES = ("lrp",)


@dataclass
class PassCount:
    """Rows run per (kind, rows per pass): a pass of r rows counts r / rows_per_pass."""

    rows: dict[tuple[str, int], float] = field(default_factory=dict)

    def add(self, kind: str, rows_per_pass: int, rows: float) -> None:
        key = (kind, rows_per_pass)
        self.rows[key] = self.rows.get(key, 0.0) + rows

    def passes(self) -> dict[str, float]:
        return {f"{k} @{r}": v / r for (k, r), v in sorted(self.rows.items())}

    def cost(self, pass_time: Mapping[tuple[str, int], float]) -> float:
        """Seconds, given the time of one pass of each (kind, rows per pass)."""
        return sum(rows / r * pass_time[(k, r)] for (k, r), rows in self.rows.items())

    def row_cost(self, fb_s_per_row: float, fw_s_per_row: float) -> float:
        """Seconds, given the time of one row of each kind (batching is priced as free)."""
        per_row = {FB: fb_s_per_row, FW: fw_s_per_row}
        return sum(rows * per_row[base_kind(k)] for (k, _), rows in self.rows.items())

    def total_rows(self) -> dict[str, float]:
        totals = {FB: 0.0, FW: 0.0}
        for (kind, _), rows in self.rows.items():
            totals[base_kind(kind)] += rows
        return totals


def base_kind(kind: str) -> str:
    """FB or FW: what a pass of ``kind`` runs."""
    return FB if kind.startswith(FB) else FW


def map_set_passes(
    count: PassCount,
    spec: AuditSpec,
    families: Mapping[str, str],
    images: float,
    states: float,
    scorecam_rows: float | None = None,
    cam_channels: int | None = None,
) -> None:
    """Add the passes of the spec's methods on ``images`` images for ``states`` model states.

    ``families`` maps a method to its family (the catalogue's). ``scorecam_rows``: Score-CAM's
    masked rows over all states when they were counted (the bench), else the upper bound:
    every channel of the CAM layer (``cam_channels`` when the worker measured the model, else
    :data:`SCORECAM_CHANNELS`).
    """
    b, p = spec.batch_size, spec.params
    wanted = [families.get(m, m) for m in spec.methods]
    one_pass = sum(1 for f in ONE_PASS_FAMILIES if f in wanted)
    per_method = sum(1 for f in wanted if f in PER_METHOD_FAMILIES)
    if one_pass:
        count.add(FB, b, one_pass * images * states)
    if per_method:
        count.add(FB_LRP, b, per_method * images * states)
    if "integrated_gradients" in wanted:
        count.add(FB, ROWS_PER_PASS, p.ig_steps * images * states)
    if "noise" in wanted:
        count.add(FB, ROWS_PER_PASS, p.noise_samples * images * states)
    if "scorecam" in wanted:
        count.add(FW, b, images * states)  # the capture of the layer's activation
        layer = cam_channels or SCORECAM_CHANNELS
        channels = min(layer, p.scorecam_channels or layer)
        masked = channels * images * states if scorecam_rows is None else scorecam_rows
        count.add(FW_MASKED, p.scorecam_batch, masked)


MODEL_RANDOMIZATION = ("cascading", "cascading_bottom_up", "independent")


def planned_stages(
    spec: AuditSpec, stages: int, rule_stages: Mapping[str, object] | None
) -> dict[str, int]:
    """Per model randomization test of the spec, the stages that get maps
    (:mod:`.stage_plan`), given ``rule_stages``: the stage selector of the policy's rule per
    test (``{t: r.stage for t, r in load_policy(spec.policy).rules.items()}``). None counts
    every stage (an upper bound)."""
    return {
        test: stages
        if rule_stages is None
        else planned_count(stages, rule_stages.get(test), spec.stages)
        for test in spec.tests
        if test in MODEL_RANDOMIZATION
    }


def model_states(
    spec: AuditSpec, stages: int, rule_stages: Mapping[str, object] | None = None
) -> float:
    """Map sets over the images the tests need, the trained model's included."""
    states = 1.0
    planned = planned_stages(spec, stages, rule_stages)
    for test in spec.tests:
        if test in planned:
            states += planned[test]
        elif test == "emprt":
            states += 1  # the fully randomized model
        elif test == "random_logit":
            states += 1
        elif test == "smprt":
            states += 2 * spec.params.smprt_samples
        elif test == "data_randomization":
            states += 2
    return states


def audit_passes(
    spec: AuditSpec,
    families: Mapping[str, str],
    *,
    images: int,
    stages: int,
    onnx: bool,
    train_images: int = 0,
    layers: int = 0,
    scorecam_rows: float | None = None,
    rule_stages: Mapping[str, object] | None = None,
    cam_channels: int | None = None,
) -> PassCount:
    """Every pass an audit of ``images`` images needs, from its spec (see the module text).

    ``stages``: the model's randomization stages at the spec's granularity; ``layers``: the
    layers the ``layers`` analysis explains (0: the spec's ``layers``, else ``stages``);
    ``rule_stages``: the policy's stage selector per test (:func:`planned_stages`). An
    adaptive audit is priced at its worst case: every image it may use (``max_images``).
    """
    if spec.adaptive is not None and spec.adaptive.max_images is not None:
        images = min(images, spec.adaptive.max_images)
    count = PassCount()
    states = model_states(spec, stages, rule_stages)
    map_set_passes(count, spec, families, images, states, scorecam_rows, cam_channels)
    count.add(FW, spec.batch_size, images * (2 if onnx else 1))  # predictions (+ fidelity)
    if "data_randomization" in spec.tests and train_images:
        recipe = spec.training
        count.add(FB, recipe.batch_size, 2 * recipe.max_epochs * train_images)
    if "layers" in spec.tests:
        explained = layers or (len(spec.layers) if spec.layers else stages)
        map_set_passes(count, spec, families, images, explained, cam_channels=cam_channels)
        steps = 2 * spec.params.faithfulness_steps
        count.add(FW, spec.batch_size, steps * images * explained)
    return count


def stages_of(tensors: int, granularity: str) -> int:
    """The randomization stages of a model that holds ``tensors`` parameter tensors.

    The upload check counts tensors, not modules: a parameterized module holds a weight and
    usually a bias, so about half as many modules; a block (a child of the model's root) holds
    several modules, taken as at most 8 blocks (a ResNet has 6 children with parameters).
    """
    modules = max(1, math.ceil(tensors / 2))
    return modules if granularity == "module" else min(modules, 8)


@dataclass(frozen=True)
class CostEstimate:
    """An audit's estimated worker seconds and the passes they come from."""

    seconds: float
    forward_backward_rows: float
    forward_rows: float
    megapixels: float

    def to_dict(self) -> dict[str, float]:
        return {
            "estimated_cost_s": round(self.seconds, 1),
            "forward_backward_rows": self.forward_backward_rows,
            "forward_rows": self.forward_rows,
            "megapixels_per_row": round(self.megapixels, 4),
        }


def estimate(
    spec: AuditSpec,
    families: Mapping[str, str],
    *,
    images: int,
    stages: int,
    height: int,
    width: int,
    fb_s_per_row_megapixel: float,
    onnx: bool = True,
    train_images: int = 0,
    rule_stages: Mapping[str, object] | None = None,
) -> CostEstimate:
    """The audit's cost: its rows of each kind times the per-row price for its input size.

    A forward + backward row costs ``fb_s_per_row_megapixel`` per megapixel of input, a
    forward row :data:`FORWARD_SHARE` of that.
    """
    megapixels = height * width / 1e6
    count = audit_passes(
        spec,
        families,
        images=images,
        stages=stages,
        onnx=onnx,
        train_images=train_images,
        rule_stages=rule_stages,
    )
    fb = fb_s_per_row_megapixel * megapixels
    totals = count.total_rows()
    return CostEstimate(
        seconds=count.row_cost(fb, fb * FORWARD_SHARE),
        forward_backward_rows=totals[FB],
        forward_rows=totals[FW],
        megapixels=megapixels,
    )


def families_of(methods: Iterable[dict[str, object]]) -> dict[str, str]:
    """Method name -> family, from the catalogue's method entries."""
    return {str(m["name"]): str(m["family"]) for m in methods}


# ------------------------------------------------------------------ measured prediction


@dataclass(frozen=True)
class Line:
    """The time of one pass of ``rows`` rows: ``fixed + per_row * rows`` seconds (fitted to
    two measured batch sizes)."""

    fixed: float
    per_row: float

    def at(self, rows: float) -> float:
        return max(0.0, self.fixed) + max(0.0, self.per_row) * rows

    @classmethod
    def through(cls, small: tuple[int, float], large: tuple[int, float]) -> Line:
        (r1, t1), (r2, t2) = small, large
        per_row = max(0.0, (t2 - t1) / (r2 - r1))
        return cls(fixed=max(0.0, t1 - per_row * r1), per_row=per_row)

    def to_dict(self) -> dict[str, float]:
        return {"fixed_s": self.fixed, "per_row_s": self.per_row}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Line:
        return cls(fixed=float(d["fixed_s"]), per_row=float(d["per_row_s"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class PassPrices:
    """One model's pass times on one worker, measured by ``workers/engine/timing.py`` (the
    worker's inspection of an upload, or ``saliency-audit run`` before it starts), and the
    model facts the count needs: its stages per granularity and the channels of its layers
    with a spatial output (Score-CAM masks one input per channel)."""

    device: str
    threads: int
    height: int
    width: int
    forward_backward: Line
    forward: Line
    # ONNX Runtime's forward on an export of the module (CPU only; None where it does not run)
    forward_ort: Line | None
    # exporting the module and checking the export: once per model state Score-CAM runs in
    export_s: float
    # LRP's rule hooks: one LRP map set costs this many plain forward + backward passes
    lrp_passes: float
    # scoring one (map, measure) against the trained model's map, per state: the mean over
    # the measures that apply at this input size (HOG needs 48 px), listed
    score_s: float
    scored_measures: tuple[str, ...]
    stages: dict[str, int]
    cam_layer: str | None
    channels: dict[str, int]
    measured_s: float

    def to_dict(self) -> dict[str, object]:
        return {
            "device": self.device,
            "threads": self.threads,
            "height": self.height,
            "width": self.width,
            "forward_backward": self.forward_backward.to_dict(),
            "forward": self.forward.to_dict(),
            "forward_ort": self.forward_ort.to_dict() if self.forward_ort else None,
            "export_s": self.export_s,
            "lrp_passes": self.lrp_passes,
            "score_s": self.score_s,
            "scored_measures": list(self.scored_measures),
            "stages": dict(self.stages),
            "cam_layer": self.cam_layer,
            "channels": dict(self.channels),
            "measured_s": self.measured_s,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> PassPrices:
        ort = d.get("forward_ort")
        return cls(
            device=str(d["device"]),
            threads=int(d["threads"]),  # type: ignore[call-overload]
            height=int(d["height"]),  # type: ignore[call-overload]
            width=int(d["width"]),  # type: ignore[call-overload]
            forward_backward=Line.from_dict(d["forward_backward"]),  # type: ignore[arg-type]
            forward=Line.from_dict(d["forward"]),  # type: ignore[arg-type]
            forward_ort=Line.from_dict(ort) if isinstance(ort, Mapping) else None,
            export_s=float(d["export_s"]),  # type: ignore[arg-type]
            lrp_passes=float(d["lrp_passes"]),  # type: ignore[arg-type]
            score_s=float(d["score_s"]),  # type: ignore[arg-type]
            scored_measures=tuple(str(m) for m in d.get("scored_measures") or ()),  # type: ignore[attr-defined]
            stages={str(k): int(v) for k, v in dict(d["stages"]).items()},  # type: ignore[call-overload]
            cam_layer=None if d.get("cam_layer") is None else str(d["cam_layer"]),
            channels={str(k): int(v) for k, v in dict(d.get("channels") or {}).items()},  # type: ignore[call-overload]
            measured_s=float(d.get("measured_s") or 0.0),  # type: ignore[arg-type]
        )


# Score-CAM's masked passes of a batch run in ONNX Runtime on the CPU when they are at least
# this many (row x pixel) units (methods/_ort.py MIN_WORK_PIXELS; the contract stays
# torch-free, so the value is repeated here and a test keeps the two equal)
ORT_MIN_WORK_PIXELS = 1 << 24


@dataclass(frozen=True)
class Prediction:
    """An audit's predicted wall time on the worker that measured ``prices``, by part."""

    seconds: float
    parts: dict[str, float]
    basis: str

    def to_dict(self) -> dict[str, object]:
        return {
            "predicted_s": round(self.seconds, 1),
            "parts_s": {k: round(v, 2) for k, v in self.parts.items()},
            "basis": self.basis,
        }


def predict(
    spec: AuditSpec,
    families: Mapping[str, str],
    prices: PassPrices,
    *,
    images: int,
    onnx: bool,
    train_images: int = 0,
    rule_stages: Mapping[str, object] | None = None,
) -> Prediction:
    """The audit's wall time: every pass of :func:`audit_passes` at its measured price, plus
    what is paid per model state (scoring each map against the trained model's, Score-CAM's
    export to ONNX Runtime). ``rule_stages`` as for :func:`planned_stages`."""
    stages = prices.stages.get(spec.granularity) or max(prices.stages.values(), default=1)
    layer = spec.layer or prices.cam_layer
    cam_channels = prices.channels.get(layer) if layer else None
    count = audit_passes(
        spec,
        families,
        images=images,
        stages=stages,
        onnx=onnx,
        train_images=train_images,
        rule_stages=rule_stages,
        cam_channels=cam_channels,
    )
    if spec.adaptive is not None and spec.adaptive.max_images is not None:
        images = min(images, spec.adaptive.max_images)
    cpu = prices.device == "cpu"
    ort = prices.forward_ort if cpu else None
    masked_per_batch = min(spec.batch_size, images) * (
        min(cam_channels or SCORECAM_CHANNELS, spec.params.scorecam_channels or 1 << 30)
    )
    if masked_per_batch * prices.height * prices.width < ORT_MIN_WORK_PIXELS:
        ort = None  # the masked passes run in PyTorch
    parts: dict[str, float] = {}
    for (kind, rows_per_pass), rows in count.rows.items():
        passes = rows / rows_per_pass
        if kind == FW_MASKED and ort is not None:
            seconds, part = passes * ort.at(rows_per_pass), "scorecam masked (ONNX Runtime)"
        elif base_kind(kind) == FB:
            seconds = passes * prices.forward_backward.at(rows_per_pass)
            if kind == FB_LRP:
                seconds *= prices.lrp_passes
            part = kind
        else:
            seconds, part = passes * prices.forward.at(rows_per_pass), kind
        parts[part] = parts.get(part, 0.0) + seconds
    states = model_states(spec, stages, rule_stages)
    wanted = [families.get(m, m) for m in spec.methods]
    if "scorecam" in wanted and ort is not None:
        parts["scorecam export"] = states * prices.export_s
    if onnx and cpu:
        parts["fidelity export"] = prices.export_s
    measures = sum(1 for m in spec.measures if m in prices.scored_measures)
    scored = len(spec.methods) + 1  # + control_random; control_sobel's maps never change
    parts["scoring"] = prices.score_s * measures * images * scored * max(0.0, states - 1)
    seconds = sum(parts.values())
    return Prediction(
        seconds=seconds,
        parts=parts,
        basis=f"pass times measured on {prices.device} ({prices.threads} threads)",
    )


def eta_seconds(predicted_s: float | None, elapsed_s: float, fraction: float) -> float | None:
    """Seconds left of an audit ``fraction`` done after ``elapsed_s``: the prediction's total
    early on, the observed rate's extrapolation as the audit advances (weight ``min(1, 2 x
    fraction)`` on the observed rate, so from half-way on the rate alone). None without a
    prediction before any progress."""
    fraction = min(max(fraction, 0.0), 1.0)
    if fraction >= 1.0:
        return 0.0
    observed = elapsed_s / fraction if fraction > 0 else None
    if predicted_s is None:
        return None if observed is None else max(0.0, observed - elapsed_s)
    if observed is None:
        return max(0.0, predicted_s - elapsed_s)
    weight = min(1.0, 2.0 * fraction)
    total = weight * observed + (1.0 - weight) * predicted_s
    return max(0.0, total - elapsed_s)
