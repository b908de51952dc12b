"""Coverage of the adaptive audit's intervals under optional stopping, by simulation.

    .venv/bin/python examples/calibration/sequential_coverage.py      # about 10 min

(its output is committed as docs/calibration/sequential_coverage.md)

An adaptive audit (``AuditSpec.adaptive``) looks after every round of images and stops at the
first look where every verdict is decided. This simulates many such audits on populations of
per-image values shaped like the real ones, with the audit's own functions: the images in a
random order, a look after every ``--round`` images up to ``--images``, the shipped cascading
rule deciding each look (:func:`saliency_audit.workers.engine.policy.interval_verdicts`) on the
confidence
sequence (:func:`saliency_audit.workers.engine.sequential.confidence_path`), stop at the first
decided look.
Counted per population: audits whose interval at the stop misses the population mean, and
audits whose verdict is wrong (PASS while the mean is not below the PASS threshold, FAIL while
it is below the FAIL threshold). Both must stay at or below 5%. For contrast, the same with a
fixed-n 95% interval recomputed at every look (mean +- 1.96 sd / sqrt(n), the normal
approximation of the bootstrap a fixed-n audit uses): peeking breaks it.

Populations: the per-image values of the shipped rule (SSIM over the first quarter of the
curve, scaled by the controls) of calibration models (``docs/calibration``), resampled; the same
shifted so that their mean sits on a threshold (where any verdict is wrong, the hardest case);
and synthetic skewed and two-point (bimodal) shapes on a threshold.

``--joint`` also runs whole audits through the audit's decision code itself
(:func:`saliency_audit.workers.engine.policy.decide` with ``looks`` and
:func:`saliency_audit.workers.engine.policy.pending_verdicts`): images of a calibration model
resampled with
all their per-stage scores (methods and controls together, so the controls' scaling is
recomputed at every look as in an audit), stop when every verdict is decided.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parents[1]))

from examples.calibration import fit  # noqa: E402
from saliency_audit.workers.engine.policy import (  # noqa: E402
    SIMILARITY_BOUNDS,
    Rule,
    decide,
    interval_verdicts,
    load_policy,
    pending_verdicts,
)
from saliency_audit.workers.engine.result import Score, StageInfo, TestResult  # noqa: E402
from saliency_audit.workers.engine.sequential import confidence_path, round_looks  # noqa: E402

SHIPPED = fit.Candidate("ssim", (0.0, 0.25), True)
SCORES = HERE.parents[1] / "docs" / "calibration"
ALPHA = 0.05


@dataclass(frozen=True)
class Population:
    name: str
    values: np.ndarray  # the population: audits draw from it with replacement

    @property
    def mean(self) -> float:
        return float(self.values.mean())


@dataclass(frozen=True)
class Outcome:
    audits: int
    missed: int  # final interval excludes the population mean
    wrong: int  # PASS or FAIL contradicting the population mean
    decided: int
    mean_images: float  # images used, averaged over audits

    def allowed(self, alpha: float = ALPHA, p: float = 1e-3) -> int:
        """The most misses a 1 - alpha procedure may show in these audits before it is rejected
        at level p (binomial): the margin that keeps a seeded test from being flaky."""
        return int(stats.binom.ppf(1 - p, self.audits, alpha))


def cascading_rule() -> Rule:
    return load_policy().rules["cascading"]


@functools.cache
def calibration_docs() -> dict[str, dict[str, Any]]:
    return fit.load(SCORES)


def calibration_values(model: str, method: str) -> np.ndarray:
    values = fit.per_image(calibration_docs()[model], method, SHIPPED)
    assert values is not None
    return values[np.isfinite(values)]


def shifted(values: np.ndarray, mean: float) -> np.ndarray:
    """``values`` moved so that their mean is ``mean``, staying within the similarity bounds."""
    low, high = SIMILARITY_BOUNDS
    out = values + (mean - values.mean())
    assert out.min() >= low and out.max() <= high, "the shift leaves the bounds"
    return out


# (model, method): the calibration shapes simulated. Bimodal and wide (the MobileNet's guided
# Grad-CAM, sd 0.34 over [0, 1]), near the thresholds (the digits ResNet's guided Grad-CAM,
# EfficientNet-Lite2's gradient), strongly skewed (the ResNet-18's guided Grad-CAM, skew -2.8;
# the MobileNet's guided backprop, skew -6 against the upper bound), widest (the digits CNN's
# gradient, sd 0.30).
CALIBRATION_SHAPES = (
    ("shapes64_mobilenet_v2", "guided_gradcam"),
    ("digits_small_resnet", "guided_gradcam"),
    ("efficientnet_lite2", "gradient"),
    ("shapes64_resnet18", "guided_gradcam"),
    ("shapes64_mobilenet_v2", "guided_backprop"),
    ("digits_small_cnn", "gradient"),
)


def populations(rule: Rule, *, seed: int = 0) -> list[Population]:
    """The simulated populations (see the module docstring)."""
    out = [
        Population(f"{model} {method}", calibration_values(model, method))
        for model, method in CALIBRATION_SHAPES
    ]
    on_threshold = [
        ("shapes64_mobilenet_v2", "guided_gradcam", rule.threshold),
        ("shapes_small_resnet", "gradient", rule.fail_bound),
        ("shapes64_resnet18", "guided_gradcam", rule.threshold),
    ]
    for model, method, mean in on_threshold:
        values = shifted(calibration_values(model, method), mean)
        out.append(Population(f"{model} {method}, mean moved to {mean}", values))
    rng = np.random.default_rng(seed)
    # left-skewed on [-1, 1] with its mean on the PASS threshold: -1 + 2 Beta(a, 1)
    a = (1 + rule.threshold) / (1 - rule.threshold)
    skewed = -1 + 2 * rng.beta(a, 1.0, size=20_000)
    out.append(Population(f"skewed -1 + 2 Beta({a:.2f}, 1), mean near {rule.threshold}", skewed))
    # two points, 1 and -0.2, with the mean on the FAIL threshold: the largest spread there
    p = (rule.fail_bound + 0.2) / 1.2
    two_point = np.where(np.arange(10_000) < round(p * 10_000), 1.0, -0.2)
    out.append(Population(f"two points (1, -0.2), mean {two_point.mean():.3f}", two_point))
    return out


def simulate(
    population: Population,
    rule: Rule,
    *,
    images: int,
    round_images: int,
    audits: int,
    seed: int,
    interval: str = "sequence",
) -> Outcome:
    """``audits`` adaptive audits on ``population``: draws in random order, a look after every
    round, the first decided look ends an audit (see the module docstring)."""
    rng = np.random.default_rng(seed)
    draws = rng.choice(population.values, size=(audits, images), replace=True)
    looks = round_looks(images, round_images)
    if interval == "sequence":
        lows, highs = confidence_path(draws, SIMILARITY_BOUNDS, looks)
    else:  # the fixed-n interval recomputed at every look
        lows, highs = np.empty((audits, len(looks))), np.empty((audits, len(looks)))
        for k, n in enumerate(looks):
            mean = draws[:, :n].mean(axis=1)
            radius = 1.96 * draws[:, :n].std(axis=1, ddof=1) / np.sqrt(n)
            lows[:, k], highs[:, k] = mean - radius, mean + radius
    passes, fails = interval_verdicts(lows, highs, rule)
    decided = passes | fails
    stop = np.where(decided.any(axis=1), decided.argmax(axis=1), len(looks) - 1)
    rows = np.arange(audits)
    low, high = lows[rows, stop], highs[rows, stop]
    passed, failed = passes[rows, stop], fails[rows, stop]
    truly_pass, truly_fail = interval_verdicts(population.mean, population.mean, rule)
    missed = (population.mean < low) | (population.mean > high)
    wrong = (passed & ~truly_pass) | (failed & ~truly_fail)
    return Outcome(
        audits=audits,
        missed=int(missed.sum()),
        wrong=int(wrong.sum()),
        decided=int((passed | failed).sum()),
        mean_images=float(np.asarray(looks)[stop].mean()),
    )


# --- whole audits through the audit's decision code ---------------------------------------


def model_rows(model: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A calibration model's document and, per method, its (stages, images) SSIM values."""
    doc = calibration_docs()[model]
    rows = {
        method: np.array([[np.nan if v is None else v for v in s] for s in by["ssim"]])
        for method, by in doc["scores"].items()
        if doc["statuses"].get(method) == "ok"
    }
    return doc, rows


def as_test(doc: dict[str, Any], rows: dict[str, np.ndarray], idx: np.ndarray) -> TestResult:
    """The cascading test an audit of the images ``idx`` would hold (values only)."""
    modules = doc["parameterized_modules"]
    stages = [
        StageInfo(i + 1, s["name"], tuple(f"m{j}" for j in range(round(s["fraction"] * modules))))
        for i, s in enumerate(doc["stages"])
    ]
    scores = []
    for method, values in rows.items():
        for i, stage in enumerate(stages):
            v = values[i, idx]
            scores.append(
                Score(
                    method,
                    "cascading",
                    stage.name,
                    stage.index,
                    "ssim",
                    float(np.nanmean(v)),
                    None,
                    None,
                    int(np.isfinite(v).sum()),
                    int((~np.isfinite(v)).sum()),
                    tuple(float(x) for x in v),
                )
            )
    return TestResult("cascading", "", "", stages=stages, scores=scores)


def true_means(doc: dict[str, Any], rows: dict[str, np.ndarray]) -> dict[str, float]:
    """Per method, the population mean of the rule's per-image value (every image of the model,
    controls' scaling over all of them)."""
    return {m: float(np.nanmean(fit.per_image(doc, m, SHIPPED))) for m in rows}  # type: ignore[arg-type]


def joint_audits(
    model: str, *, images: int, round_images: int, audits: int, seed: int
) -> dict[str, Outcome]:
    """Whole adaptive audits of one calibration model's images through ``decide``: per method,
    the audits whose interval at the stop misses its population mean, or whose verdict is
    wrong."""
    policy = load_policy()
    rule = policy.rules["cascading"]
    doc, rows = model_rows(model)
    truth = true_means(doc, rows)
    methods = {m: (m.startswith("control_"), None) for m in rows}
    looks = round_looks(images, round_images)
    rng = np.random.default_rng(seed)
    missed = dict.fromkeys(rows, 0)
    wrong = dict.fromkeys(rows, 0)
    decided = dict.fromkeys(rows, 0)
    used = []
    for _ in range(audits):
        idx = rng.integers(0, doc["n_images"], size=images)
        for k, n in enumerate(looks):
            verdicts = decide(
                policy, {"cascading": as_test(doc, rows, idx[:n])}, methods, 0, looks=looks[: k + 1]
            )
            if not pending_verdicts(policy, verdicts):
                break
        used.append(n)
        for v in verdicts:
            mu = truth[v.method]
            assert v.ci_low is not None and v.ci_high is not None
            # 1e-9: the mean of a control that is 1 on every image, computed two ways
            missed[v.method] += not v.ci_low - 1e-9 <= mu <= v.ci_high + 1e-9
            truly_pass, truly_fail = interval_verdicts(mu, mu, rule)
            wrong[v.method] += (v.verdict == "PASS" and not truly_pass) or (
                v.verdict == "FAIL" and not truly_fail
            )
            decided[v.method] += v.verdict != "INCONCLUSIVE"
    return {m: Outcome(audits, missed[m], wrong[m], decided[m], float(np.mean(used))) for m in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audits", type=int, default=4000)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--round", type=int, default=32)
    parser.add_argument("--joint", type=int, default=200, help="audits per model through decide")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rule = cascading_rule()
    started = time.perf_counter()
    print(
        f"{args.audits} simulated adaptive audits per population: up to {args.images} images, "
        f"a look every {args.round}, the shipped cascading rule (PASS below {rule.threshold}, "
        f"FAIL from {rule.fail_bound}), stop at the first decided look. Misses: the interval at "
        "the stop excludes the population mean; wrong: a PASS or FAIL the mean contradicts. "
        "Confidence sequence (the adaptive audit) vs a fixed-n 95% interval recomputed at every "
        "look.\n"
    )
    print(
        "| population | mean | sd | sequence: misses | wrong | decided | images used "
        "| fixed-n at every look: misses | wrong |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, pop in enumerate(populations(rule, seed=args.seed)):
        common = dict(images=args.images, round_images=args.round, audits=args.audits)
        seq = simulate(pop, rule, seed=args.seed + i, **common)  # type: ignore[arg-type]
        naive = simulate(pop, rule, seed=args.seed + i, interval="fixed", **common)  # type: ignore[arg-type]
        print(
            f"| {pop.name} | {pop.mean:.3f} | {pop.values.std():.3f} "
            f"| {seq.missed / seq.audits:.2%} | {seq.wrong / seq.audits:.2%} "
            f"| {seq.decided / seq.audits:.1%} | {seq.mean_images:.0f} "
            f"| {naive.missed / naive.audits:.2%} | {naive.wrong / naive.audits:.2%} |"
        )
    if args.joint:
        print(
            f"\nWhole audits through the audit's decide() and pending_verdicts(): "
            f"{args.joint} per model, images resampled with all their scores (the controls' "
            "scaling recomputed at every look), stop when every verdict is decided. Per method: "
            "misses / wrong / decided, and the images used (mean over audits).\n"
        )
        methods = fit.SENSITIVE + fit.INSENSITIVE + ("control_sobel", "control_random")
        print("| model | images used | " + " | ".join(methods) + " |")
        print("| --- | --- |" + " --- |" * len(methods))
        for j, model in enumerate(calibration_docs()):
            outcomes = joint_audits(
                model,
                images=args.images,
                round_images=args.round,
                audits=args.joint,
                seed=args.seed + 100 + j,
            )
            cells = [
                f"{o.missed}/{o.wrong}/{o.decided}" if (o := outcomes.get(m)) else "n/a"
                for m in methods
            ]
            used = next(iter(outcomes.values())).mean_images
            print(f"| {model} | {used:.0f} | " + " | ".join(cells) + " |")
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
