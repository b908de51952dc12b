"""Measure what one model's passes cost on this worker: the prices of the cost model
(:class:`~saliency_audit.workers.engine.contract.cost.PassPrices`).

The prediction of an audit's wall time (``contract/cost.py``: :func:`predict`) counts its passes
from the spec; this module times one pass of each kind on the model itself, at two batch sizes
(a pass of r rows is priced ``fixed + per_row * r``, fitted through them), where the audit runs
it: forward + backward (the gradient families, Integrated Gradients, the noise family), forward
in PyTorch (predictions, Score-CAM's capture) and in ONNX Runtime on an export of the module
(Score-CAM's masked inputs on the CPU), the export and its check (paid per model state), one LRP
map set against a plain forward + backward (its rule hooks), and the scoring of one map against
the trained model's map per measure. It also records the facts the count needs: the model's
stages per granularity and the channels of its layers with a spatial output.

The worker measures an uploaded model when it inspects it (the API prices each submit with the
stored prices), and ``saliency-audit run`` measures before it starts: a few seconds for
ResNet-50 at 224 px on the 2-core CPU, well under a second for the 32-px reference models.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Collection

import torch
from torch import nn

from .contract.cost import Line, PassPrices
from .errors import stops_the_audit
from .layers import _outputs_in_order, _spatial
from .methods.base import cam_layer_choice
from .models.loader import LoadedModel
from .randomization import stages, units
from .runner import memory_format_for, resolve_device
from .similarity import MEASURES, MapTooSmallError, compare, prepare

# the batch sizes each kind of pass is timed at (rows): the ones the audit runs by default
# (forward + backward: the batch of 16 and the 32-row chunks of Integrated Gradients and the
# noise family; forward: the batch of 16 and Score-CAM's 64 masked rows); a line through the
# two prices other sizes
FB_ROWS, FW_ROWS = (16, 32), (16, 64)
SMALL_ROWS = 4  # the rows of the export check and of the warm-ups
# a measurement is repeated (at most REPEATS runs) until its runs add up to TIMED_S and there
# are at least MIN_RUNS of them (unless they add up to LONG_S first), and the fastest run is
# the price: a pass of a few milliseconds varies by tens of percent run to run, and on a
# machine shared with another process (an audit, a training run) some runs wait for a core
# and take 2-20x longer; the fastest is what the pass costs the worker when it has its cores,
# as it has them for an audit it runs alone
TIMED_S, LONG_S, MIN_RUNS, REPEATS = 0.3, 5.0, 3, 15
SCORED_MAPS = 16


def _seconds(run: Callable[[], object]) -> float:
    """The fastest of the timed runs of ``run`` (see :data:`TIMED_S`)."""
    times: list[float] = []
    while len(times) < REPEATS:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        total = sum(times)
        if total >= LONG_S or (total >= TIMED_S and len(times) >= MIN_RUNS):
            break
    return min(times)


def measure_pass_prices(
    model: LoadedModel,
    device: str = "auto",
    seed: int = 0,
    families: Collection[str] | None = None,
) -> PassPrices:
    """Time ``model``'s passes on ``device`` (see the module text). Leaves the module's weights
    as they were; runs on inputs drawn from ``seed`` (the prices do not depend on the values).

    ``families``: the method families of the one audit to predict (``saliency-audit run``),
    or None for any audit (a worker's inspection): without ``scorecam`` the ONNX Runtime
    forward is not timed (only Score-CAM's masked passes use it), without ``lrp`` the LRP map
    set is not (its price is then unused), which saves most of the probe on large inputs."""
    started = time.perf_counter()
    target_device = resolve_device(device)
    module = model.module.to(target_device).eval()
    spec = model.input_spec
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(FW_ROWS[1], spec.channels, spec.height, spec.width, generator=generator)
    x = x.to(target_device).contiguous(memory_format=memory_format_for(x))
    module.to(memory_format=memory_format_for(x))

    def rows(r: int) -> torch.Tensor:
        return x[:r]

    with torch.inference_mode():
        logits = module(rows(SMALL_ROWS)).float()
    targets = logits.argmax(dim=1)

    def forward_backward(r: int) -> Callable[[], object]:
        def run() -> object:
            leaf = rows(r).detach().clone().requires_grad_(True)
            score = module(leaf).gather(1, targets.repeat(r)[:r].view(-1, 1)).sum()
            return torch.autograd.grad(score, [leaf])

        return run

    def forward(call: Callable[[torch.Tensor], torch.Tensor], r: int) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return call(rows(r))

        return run

    forward_backward(SMALL_ROWS)()  # warm-up: first-call allocations and kernel selection
    fb = Line.through(*((r, _seconds(forward_backward(r))) for r in FB_ROWS))
    fw = Line.through(*((r, _seconds(forward(module, r))) for r in FW_ROWS))
    fw_ort, export_s = _onnx_runtime_prices(
        module, rows(SMALL_ROWS), logits, rows, forward=families is None or "scorecam" in families
    )
    r = FB_ROWS[0]
    lrp_passes = 1.0
    if families is None or "lrp" in families:
        lrp_passes = _lrp_passes(module, rows(r), targets.repeat(r)[:r], fb.at(r), target_device)
    score_s, scored = _score_seconds(spec.height, spec.width, generator)
    calls = _outputs_in_order(module, rows(1))
    channels = {name: shape[1] for name, shape in calls if _spatial(shape)}
    return PassPrices(
        device=target_device.type,
        threads=torch.get_num_threads(),
        height=spec.height,
        width=spec.width,
        forward_backward=fb,
        forward=fw,
        forward_ort=fw_ort,
        export_s=export_s,
        lrp_passes=lrp_passes,
        score_s=score_s,
        scored_measures=scored,
        stages={g: len(stages(units(module, g), "cascading")) for g in ("block", "module")},
        cam_layer=cam_layer_choice(module, None, rows(1)).name,
        channels=channels,
        measured_s=time.perf_counter() - started,
    )


def _onnx_runtime_prices(
    module: nn.Module,
    x: torch.Tensor,
    logits: torch.Tensor,
    rows: Callable[[int], torch.Tensor],
    forward: bool = True,
) -> tuple[Line | None, float]:
    """ONNX Runtime's forward line and the seconds of one export + check (what Score-CAM pays
    per model state), or (None, 0) where the export does not run (a GPU, an unexportable
    graph): the masked passes are then priced as PyTorch forwards."""
    from .methods._ort import _export_and_check, fixed_batch

    if x.device.type != "cpu":
        return None, 0.0
    t0 = time.perf_counter()
    try:
        run, _ = _export_and_check(module, x, logits, fixed_batch(module))
    except Exception as exc:  # priced without it, as the audit would run without it
        if stops_the_audit(exc):
            raise
        return None, 0.0
    export_s = time.perf_counter() - t0
    if run is None:
        return None, 0.0
    if not forward:  # the export's cost still counts (an ONNX model's fidelity check)
        return None, export_s
    run(rows(SMALL_ROWS))  # warm-up

    def timed(r: int) -> float:
        return _seconds(lambda: run(rows(r)))

    return Line.through(*((r, timed(r)) for r in FW_ROWS)), export_s


def _lrp_passes(
    module: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    plain_s: float,
    device: torch.device,
) -> float:
    """One LRP map set's time in plain forward + backward passes of the same rows (the rule
    hooks' overhead), measured with the engine's own LRP on ``x``; 1 where LRP does not run on
    this model (it is then not applicable and costs nothing measurable)."""
    from .contract.spec import AuditSpec
    from .maps import MapInputs

    inputs = MapInputs(module, x, targets, ["lrp"], AuditSpec(methods=("lrp",)), None, device)
    try:
        dataclasses.replace(inputs, images=x[:1], targets=targets[:1]).compute()  # warm-up
        seconds = _seconds(inputs.compute)
    except Exception as exc:
        if stops_the_audit(exc):
            raise
        return 1.0
    return max(1.0, seconds / plain_s) if plain_s > 0 else 1.0


def _score_seconds(
    height: int, width: int, generator: torch.Generator
) -> tuple[float, tuple[str, ...]]:
    """Seconds to score one map against its reference with one measure (the mean over the
    measures that apply at this size), the trained maps prepared once as the audit does."""
    a = torch.rand(SCORED_MAPS, height, width, generator=generator)
    b = torch.rand(SCORED_MAPS, height, width, generator=generator)
    times, scored = [], []
    for measure in MEASURES:
        try:
            reference = prepare(measure, a)
        except MapTooSmallError:
            continue
        t0 = time.perf_counter()
        compare(reference, prepare(measure, b))
        times.append((time.perf_counter() - t0) / SCORED_MAPS)
        scored.append(measure)
    return (statistics.mean(times) if times else 0.0), tuple(scored)
