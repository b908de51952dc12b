"""Choose and check the cascading verdict rule on the calibration scores (``collect.py``).

    .venv/bin/python examples/calibration/fit.py --scores docs/calibration            # tables
    .venv/bin/python examples/calibration/fit.py --scores docs/calibration --candidates

Ground truth is the paper's (Adebayo et al. 2018, cascading randomization): gradient and
Grad-CAM are sensitive to the learned weights (PASS), guided backprop and guided Grad-CAM are
not (FAIL); the controls must get FAIL (``control_sobel``) and PASS (``control_random``).

For a candidate rule (measure, span of the curve, control scaling) the thresholds are fitted on
a set of models: PASS below ``a + (b - a) / 3`` and FAIL at or above ``b - (b - a) / 3``, with
``a`` the highest mean of the sensitive methods and ``b`` the lowest mean of the insensitive
ones over those models at their largest image count (the middle third between the two groups
is left undecided). Every candidate is scored by leave-one-model-out: thresholds fitted without
a model decide that model's four methods, at every image count from 8 to 256 (the first n
images of its run, with the audit's bootstrap). The shipped rule is the candidate with the best
leave-one-model-out accuracy at the documented minimum image count, then the fewest verdict
changes between that count and 256 images.

Everything printed here is the source of the tables in docs/policy.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parents[1]))

from saliency_audit.workers.engine.policy import Rule, curve_area  # noqa: E402
from saliency_audit.workers.engine.stats import bootstrap_mean, key_seed  # noqa: E402

SENSITIVE = ("gradient", "gradcam")
INSENSITIVE = ("guided_backprop", "guided_gradcam")
EXPECTED = {m: "PASS" for m in SENSITIVE} | {m: "FAIL" for m in INSENSITIVE}
IMAGE_COUNTS = (8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Candidate:
    measure: str
    span: tuple[float, float]
    scale: bool

    @property
    def label(self) -> str:
        scaled = ", scaled by the controls" if self.scale else ""
        return f"{self.measure}, area {self.span[0]:g}-{self.span[1]:g}{scaled}"


CANDIDATES = [
    Candidate(measure, span, scale)
    for measure in ("ssim", "spearman_abs", "hog_pearson")
    for span in ((0.0, 0.25), (0.0, 0.5), (0.0, 1.0))
    for scale in (False, True)
]


def load(folder: Path, granularity: str = "block") -> dict[str, dict[str, Any]]:
    return {
        path.name.split(".")[0]: json.loads(gzip.open(path, "rt").read())
        for path in sorted(folder.glob(f"*.{granularity}.json.gz"))
    }


def per_image(doc: dict[str, Any], method: str, c: Candidate) -> np.ndarray | None:
    """The candidate's per-image value for one method of one model (all images)."""
    by_measure = doc["scores"].get(method, {})
    if c.measure not in by_measure:
        return None
    stages = np.array(
        [[np.nan if v is None else v for v in values] for values in by_measure[c.measure]]
    )
    if c.scale:
        random = doc["scores"]["control_random"][c.measure]
        sobel = doc["scores"]["control_sobel"][c.measure]
        low = np.array([np.nanmean([np.nan if v is None else v for v in s]) for s in random])
        high = np.array([np.nanmean([np.nan if v is None else v for v in s]) for s in sobel])
        stages = (stages - low[:, None]) / (high - low)[:, None]
    fractions = [s["fraction"] for s in doc["stages"]]
    return curve_area(list(zip(fractions, stages, strict=True)), *c.span)


@dataclass(frozen=True)
class Thresholds:
    pass_below: float
    fail_at: float


# share of the gap between the two groups left undecided (--zone)
SETTINGS = {"zone": 0.2}


def fit(docs: dict[str, dict[str, Any]], c: Candidate) -> Thresholds | None:
    sensitive, insensitive = [], []
    for doc in docs.values():
        for method in SENSITIVE + INSENSITIVE:
            values = per_image(doc, method, c)
            if values is None or doc["statuses"].get(method) != "ok":
                continue
            mean = float(np.nanmean(values))
            (sensitive if method in SENSITIVE else insensitive).append(mean)
    if not sensitive or not insensitive:
        return None
    a, b = max(sensitive), min(insensitive)
    if not a < b:
        return None
    zone = SETTINGS["zone"]
    return Thresholds(a + (b - a) * (1 - zone) / 2, b - (b - a) * (1 - zone) / 2)


def verdict(values: np.ndarray, t: Thresholds, seed_key: str) -> str:
    est = bootstrap_mean(values, key_seed(0, seed_key))
    if est.ci_high is None or est.ci_low is None:
        return "INCONCLUSIVE"
    if est.ci_high < t.pass_below:
        return "PASS"
    if est.ci_low >= t.fail_at:
        return "FAIL"
    return "INCONCLUSIVE"


def applicable(doc: dict[str, Any], method: str) -> bool:
    return doc["statuses"].get(method) == "ok"


def leave_one_out(
    docs: dict[str, dict[str, Any]], c: Candidate
) -> dict[str, dict[str, dict[int, str]]] | None:
    """model -> method -> n -> verdict, each model decided with thresholds fitted without it."""
    out: dict[str, dict[str, dict[int, str]]] = {}
    for held_out, doc in docs.items():
        t = fit({k: v for k, v in docs.items() if k != held_out}, c)
        if t is None:
            return None
        for method in SENSITIVE + INSENSITIVE:
            values = per_image(doc, method, c)
            if values is None or not applicable(doc, method):
                continue
            out.setdefault(held_out, {})[method] = {
                n: verdict(values[:n], t, f"{held_out}/{method}/{n}")
                for n in IMAGE_COUNTS
                if n <= doc["n_images"]
            }
    return out


def accuracy(results: dict[str, dict[str, dict[int, str]]], n: int) -> tuple[int, int]:
    right = total = 0
    for by_method in results.values():
        for method, by_n in by_method.items():
            if n in by_n:
                total += 1
                right += by_n[n] == EXPECTED[method]
    return right, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", type=Path, default=HERE.parents[1] / "docs" / "calibration")
    parser.add_argument("--candidates", action="store_true", help="compare every candidate")
    parser.add_argument("--measure", default="ssim")
    parser.add_argument("--upto", type=float, default=0.5)
    parser.add_argument("--scale", action="store_true")
    parser.add_argument(
        "--zone", type=float, default=SETTINGS["zone"], help="undecided share of the gap"
    )
    args = parser.parse_args(argv)
    SETTINGS["zone"] = args.zone
    docs = load(args.scores)
    if args.candidates:
        print("| rule | " + " | ".join(f"n={n}" for n in IMAGE_COUNTS) + " |")
        print("| --- |" + " --- |" * len(IMAGE_COUNTS))
        for c in CANDIDATES:
            results = leave_one_out(docs, c)
            if results is None:
                print(f"| {c.label} | groups overlap |")
                continue
            cells = []
            for n in IMAGE_COUNTS:
                right, total = accuracy(results, n)
                cells.append(f"{right}/{total}")
            print(f"| {c.label} | " + " | ".join(cells) + " |")
        return 0
    chosen = Candidate(args.measure, (0.0, args.upto), args.scale)
    report(docs, chosen, load(args.scores, "module"))
    return 0


def verdict_rows(
    docs: dict[str, dict[str, Any]], c: Candidate, thresholds: dict[str, Thresholds]
) -> dict[str, dict[str, dict[int, str]]]:
    """model -> method -> n -> verdict, each model with its own thresholds."""
    out: dict[str, dict[str, dict[int, str]]] = {}
    for name, doc in docs.items():
        for method in SENSITIVE + INSENSITIVE + ("control_sobel", "control_random"):
            values = per_image(doc, method, c)
            if values is None or not applicable(doc, method):
                continue
            out.setdefault(name, {})[method] = {
                n: verdict(values[:n], thresholds[name], f"{name}/{method}/{n}")
                for n in IMAGE_COUNTS
                if n <= doc["n_images"]
            }
    return out


def minimum_images(rows: dict[str, dict[str, dict[int, str]]]) -> int | None:
    """The smallest image count from which every model's four methods get the paper's verdict
    at every larger count its data has."""
    for n in IMAGE_COUNTS:
        if all(
            by_n[m] == EXPECTED[method]
            for by_method in rows.values()
            for method, by_n in by_method.items()
            if method in EXPECTED
            for m in by_n
            if m >= n
        ):
            return n
    return None


def report(
    docs: dict[str, dict[str, Any]], c: Candidate, modules: dict[str, dict[str, Any]]
) -> None:
    whole = fit(docs, c)
    assert whole is not None, "the sensitive and insensitive groups overlap"
    print(f"rule: {c.label}")
    print(
        f"thresholds fitted on every model: PASS below {whole.pass_below:.3f}, "
        f"FAIL at or above {whole.fail_at:.3f}\n"
    )
    lomo = {name: fit({k: v for k, v in docs.items() if k != name}, c) for name in docs}
    sections = [
        (
            "Each model decided with thresholds fitted on all the others (leave-one-model-out)",
            verdict_rows(docs, c, {k: t for k, t in lomo.items() if t is not None}),
        ),
        (
            "Each model decided with the shipped thresholds (fitted on every model)",
            verdict_rows(docs, c, dict.fromkeys(docs, whole)),
        ),
    ]
    for title, rows in sections:
        print(
            f"{title}; mean of the per-image value over all its images, then the verdict at "
            f"n = {', '.join(str(n) for n in IMAGE_COUNTS)} (P/F/I):\n"
        )
        methods = SENSITIVE + INSENSITIVE + ("control_sobel", "control_random")
        print("| model | images | " + " | ".join(methods) + " |")
        print("| --- | --- |" + " --- |" * len(methods))
        for name, doc in docs.items():
            cells = []
            for method in methods:
                values = per_image(doc, method, c)
                if values is None or not applicable(doc, method):
                    cells.append("n/a")
                    continue
                by_n = rows.get(name, {}).get(method, {})
                shown = "".join(by_n[n][0] for n in IMAGE_COUNTS if n in by_n)
                cells.append(f"{np.nanmean(values):.3f} {shown}")
            print(f"| {name} | {doc['n_images']} | " + " | ".join(cells) + " |")
        totals = []
        for n in IMAGE_COUNTS:
            right, total = accuracy(
                {k: {m: v for m, v in bm.items() if m in EXPECTED} for k, bm in rows.items()}, n
            )
            totals.append(f"n={n}: {right}/{total}")
        print("\npaper's verdict reached: " + ", ".join(totals))
        print(
            f"smallest n from which every model's four methods stay right: {minimum_images(rows)}\n"
        )
    if modules:
        print(
            "Granularity: the same models at module granularity (one stage per "
            "parameterized module), shipped thresholds, all images:\n"
        )
        print("| model | stages (block / module) | " + " | ".join(SENSITIVE + INSENSITIVE) + " |")
        print("| --- | --- |" + " --- |" * 4)
        for name, doc in modules.items():
            block = docs[name]
            cells = []
            for method in SENSITIVE + INSENSITIVE:
                a, b = per_image(block, method, c), per_image(doc, method, c)
                if a is None or b is None or not applicable(doc, method):
                    cells.append("n/a")
                    continue
                va = verdict(a, whole, f"{name}/{method}/block")
                vb = verdict(b, whole, f"{name}/{method}/module")
                cells.append(f"{np.nanmean(a):.3f} {va[0]} / {np.nanmean(b):.3f} {vb[0]}")
            print(
                f"| {name} | {len(block['stages'])} / {len(doc['stages'])} | "
                + " | ".join(cells)
                + " |"
            )


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["Rule"]
