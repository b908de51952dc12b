"""Do the calibration models decide the same when only the planned stages get maps?

    .venv/bin/python examples/calibration/planned.py --scores docs/calibration --points 8 4 3 2

The committed calibration scores (``collect.py``) hold every stage of each model's cascade. For
the shipped cascading rule this recomputes its statistic from the stages a stage plan computes
(:mod:`saliency_audit.workers.engine.contract.stage_plan`, with ``--points`` points at most in
the rule's span): the controls' scaling at the planned stages only, the skipped stages of the
span interpolated as the engine does (:func:`~saliency_audit.workers.engine.policy.fill_skipped`),
then the verdict with the shipped thresholds at every image count of ``fit.py``, against the
verdict from every stage. No model runs. The default plan (8 points) computes every stage of
each model's span here, so its areas are the full ones exactly; fewer points show how much room
the default leaves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parents[1]))

from examples.calibration import fit  # noqa: E402
from saliency_audit.workers.engine.contract.stage_plan import (  # noqa: E402
    DEFAULT_POINTS,
    StagePlan,
    plan_stages,
)
from saliency_audit.workers.engine.policy import (  # noqa: E402
    curve_area,
    fill_skipped,
    load_policy,
)

METHODS = (*fit.SENSITIVE, *fit.INSENSITIVE, "control_sobel", "control_random")


def _stages(doc: dict[str, Any], method: str, measure: str) -> np.ndarray:
    """(stages, images) of one method's per-image values, NaN where undefined."""
    values = doc["scores"][method][measure]
    return np.array([[np.nan if v is None else v for v in stage] for stage in values])


def planned_per_image(
    doc: dict[str, Any], method: str, points: int = DEFAULT_POINTS
) -> tuple[np.ndarray, StagePlan] | None:
    """The shipped cascading rule's per-image value from the stages its plan computes."""
    rule = load_policy().rules["cascading"]
    if rule.measure not in doc["scores"].get(method, {}):
        return None
    fractions = [float(s["fraction"]) for s in doc["stages"]]
    plan = plan_stages(fractions, rule.stage, points=points)
    rows = [i - 1 for i in plan.computed]
    values = _stages(doc, method, rule.measure)[rows]
    if rule.scale == "controls":
        low = np.nanmean(_stages(doc, "control_random", rule.measure)[rows], axis=1)
        high = np.nanmean(_stages(doc, "control_sobel", rule.measure)[rows], axis=1)
        values = (values - low[:, None]) / (high - low)[:, None]
    measured = [(fractions[i], values[k]) for k, i in enumerate(rows)]
    start, end = (float(v) for v in rule.stage["area"])  # type: ignore[index]
    return curve_area(fill_skipped(measured, fractions), start, end), plan


def full_per_image(doc: dict[str, Any], method: str) -> np.ndarray | None:
    rule = load_policy().rules["cascading"]
    start, end = (float(v) for v in rule.stage["area"])  # type: ignore[index]
    return fit.per_image(doc, method, fit.Candidate(rule.measure, (start, end), True))


def compare(docs: dict[str, dict[str, Any]], points: int) -> list[dict[str, Any]]:
    """Per (model file, method): the full and planned means, the largest per-image change and
    the verdicts at each image count with the shipped thresholds, both ways."""
    rule = load_policy().rules["cascading"]
    shipped = fit.Thresholds(rule.threshold, rule.fail_bound)
    rows = []
    for name, doc in docs.items():
        for method in METHODS:
            if doc["statuses"].get(method) != "ok":
                continue
            full = full_per_image(doc, method)
            found = planned_per_image(doc, method, points)
            if full is None or found is None:
                continue
            planned, plan = found
            counts = [n for n in fit.IMAGE_COUNTS if n <= doc["n_images"]]
            key = f"{doc['model']}/{method}"  # fit.py's bootstrap keys: the same intervals
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "stages": plan.total,
                    "computed": plan.computed,
                    "thinned": plan.points is not None,
                    "full_mean": float(np.nanmean(full)),
                    "planned_mean": float(np.nanmean(planned)),
                    "max_change": float(np.nanmax(np.abs(planned - full))),
                    "full": "".join(
                        fit.verdict(full[:n], shipped, f"{key}/{n}")[0] for n in counts
                    ),
                    "planned": "".join(
                        fit.verdict(planned[:n], shipped, f"{key}/{n}")[0] for n in counts
                    ),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", type=Path, default=HERE.parents[1] / "docs" / "calibration")
    parser.add_argument("--points", type=int, nargs="+", default=[DEFAULT_POINTS])
    args = parser.parse_args(argv)
    docs = {
        f"{name}.{granularity}": doc
        for granularity in ("block", "module")
        for name, doc in fit.load(args.scores, granularity).items()
    }
    for points in args.points:
        rows = compare(docs, points)
        changed = [r for r in rows if r["full"] != r["planned"]]
        thinned = sorted({r["model"] for r in rows if r["thinned"]})
        print(f"## at most {points} points in the span\n")
        print("| model | stages | computed | method | full | planned | max per-image change |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(
                f"| {r['model']} | {r['stages']} | {len(r['computed'])} | {r['method']} | "
                f"{r['full_mean']:.3f} {r['full']} | {r['planned_mean']:.3f} {r['planned']} | "
                f"{r['max_change']:.3f} |"
            )
        largest = max(abs(r["planned_mean"] - r["full_mean"]) for r in rows)
        print(
            f"\n{len(rows)} (model, method) pairs; spans thinned: {', '.join(thinned) or 'none'}; "
            f"largest change of a mean: {largest:.4f}; verdict strings changed: {len(changed)}"
        )
        for r in changed:
            print(f"  {r['model']} {r['method']}: {r['full']} -> {r['planned']}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
