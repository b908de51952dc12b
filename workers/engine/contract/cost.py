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
        return sum(rows * per_row[k] for (k, _), rows in self.rows.items())

    def total_rows(self) -> dict[str, float]:
        totals = {FB: 0.0, FW: 0.0}
        for (kind, _), rows in self.rows.items():
            totals[kind] += rows
        return totals


def map_set_passes(
    count: PassCount,
    spec: AuditSpec,
    families: Mapping[str, str],
    images: float,
    states: float,
    scorecam_rows: float | None = None,
) -> None:
    """Add the passes of the spec's methods on ``images`` images for ``states`` model states.

    ``families`` maps a method to its family (the catalogue's). ``scorecam_rows``: Score-CAM's
    masked rows over all states when they were counted (the bench), else the upper bound.
    """
    b, p = spec.batch_size, spec.params
    wanted = [families.get(m, m) for m in spec.methods]
    one_pass = sum(1 for f in ONE_PASS_FAMILIES if f in wanted)
    per_method = sum(1 for f in wanted if f in PER_METHOD_FAMILIES)
    if one_pass + per_method:
        count.add(FB, b, (one_pass + per_method) * images * states)
    if "integrated_gradients" in wanted:
        count.add(FB, ROWS_PER_PASS, p.ig_steps * images * states)
    if "noise" in wanted:
        count.add(FB, ROWS_PER_PASS, p.noise_samples * images * states)
    if "scorecam" in wanted:
        count.add(FW, b, images * states)  # the capture of the layer's activation
        channels = min(SCORECAM_CHANNELS, p.scorecam_channels or SCORECAM_CHANNELS)
        masked = channels * images * states if scorecam_rows is None else scorecam_rows
        count.add(FW, p.scorecam_batch, masked)


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
    map_set_passes(count, spec, families, images, states, scorecam_rows)
    count.add(FW, spec.batch_size, images * (2 if onnx else 1))  # predictions (+ fidelity)
    if "data_randomization" in spec.tests and train_images:
        recipe = spec.training
        count.add(FB, recipe.batch_size, 2 * recipe.max_epochs * train_images)
    if "layers" in spec.tests:
        explained = layers or (len(spec.layers) if spec.layers else stages)
        map_set_passes(count, spec, families, images, explained)
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
