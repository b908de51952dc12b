"""Does Score-CAM's channel selection change the cascading verdict? (issue 19, item 3)

    .venv/bin/python bench/scorecam_channels.py --images 256 --ks 32,16 \
        --out bench/scorecam_channels.json
    .venv/bin/python examples/calibration/train_families.py --out /tmp/calib --families resnet18
    .venv/bin/python bench/scorecam_channels.py --models /tmp/calib --only shapes64_resnet18 \
        --images 32 --ks 64,32,16 --out bench/scorecam_channels.json

For each calibration model (docs/policy.md; the four bundled reference models always, the 64-px
models of ``train_families.py`` that exist in ``--models``) it runs the audit the verdict is
decided from: cascading randomization from the logits down at block granularity, seed 0, the
default policy, Score-CAM and the two controls (the rule scales by them), SSIM (the rule's
measure), on the first ``--images`` of the images ``examples/calibration/collect.py`` audits
(fresh shapes, held-out digits). It runs once with every channel
(``params.scorecam_channels = None``) and once per k of ``--ks``, same images, seed and random
weights, and reports per model and k: the cascading verdict, the rule's statistic (SSIM over
the first 25% of the modules randomized, scaled by the controls) with its 95% bootstrap
interval, whether the top-k statistic lies inside the full audit's interval, and the audit's
wall time against the full audit's (one run each, alternating with nothing else: the machine
is shared, so a ratio is only as steady as its load). A k at or above the CAM layer's width
keeps every channel, gives the full map exactly (tests/engine/test_scorecam_channels.py) and is
not run again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parent))

from examples.calibration.collect import REFERENCE, digits_images, shapes_images  # noqa: E402
from saliency_audit.workers.engine.images import DecodedImage, preprocess  # noqa: E402
from saliency_audit.workers.engine.methods import cam_layer_choice  # noqa: E402
from saliency_audit.workers.engine.methods.base import get_module  # noqa: E402
from saliency_audit.workers.engine.models.base import LoadedModel  # noqa: E402
from saliency_audit.workers.engine.models.loader import load_model  # noqa: E402
from saliency_audit.workers.engine.policy import _decide_one, evidence, load_policy, stage_fractions  # noqa: E402
from saliency_audit.workers.engine.result import TestResult  # noqa: E402
from saliency_audit.workers.engine.runner import run_audit  # noqa: E402
from saliency_audit.workers.engine.sanity import make_score  # noqa: E402
from saliency_audit.workers.engine.spec import AuditSpec, MethodParams  # noqa: E402


def calibration_models(models_dir: Path | None, n: int) -> dict[str, tuple[bytes, list[Any]]]:
    """name -> (ONNX bytes, decoded images): the reference models, then the 64-px ones found."""
    out: dict[str, tuple[bytes, list[DecodedImage]]] = {}
    for name in ("shapes_small_cnn", "shapes_small_resnet"):
        out[name] = ((REFERENCE / f"{name}.onnx").read_bytes(), shapes_images(n, 32))
    for name in ("digits_small_cnn", "digits_small_resnet"):
        out[name] = ((REFERENCE / f"{name}.onnx").read_bytes(), digits_images(n))
    if models_dir is not None:
        from examples.calibration.train_families import FAMILIES

        for family, (_, dataset, _, _) in FAMILIES.items():
            path = models_dir / f"{family}.onnx"
            if path.exists():
                images = shapes_images(n, 64) if dataset == "shapes" else digits_images(n, 64)
                out[f"{dataset}64_{family}"] = (path.read_bytes(), images)
    return out


def layer_width(model: LoadedModel, x: torch.Tensor) -> tuple[str, int]:
    """The default CAM layer and its channel count."""
    name = cam_layer_choice(model.module, None, x[:1]).name
    assert name is not None, "a calibration model without a CAM layer"
    seen: list[int] = []
    handle = get_module(model.module, name).register_forward_hook(
        lambda _m, _i, o: seen.append(int(o.shape[1]))
    )
    try:
        with torch.inference_mode():
            model.module.eval()(x[:1])
    finally:
        handle.remove()
    return name, seen[0]


def audit(model: LoadedModel, x: torch.Tensor, names: list[str], k: int | None) -> dict[str, Any]:
    spec = AuditSpec(
        methods=("scorecam",),
        tests=("cascading",),
        measures=("ssim",),
        batch_size=32,
        seed=0,
        params=MethodParams(scorecam_channels=k),
    )
    t0 = time.perf_counter()
    result = run_audit(model, x, spec, image_names=names)
    seconds = time.perf_counter() - t0
    (v,) = [v for v in result.verdicts if v.method == "scorecam" and v.test == "cascading"]
    test = result.tests["cascading"]
    ev = rule_statistic(test, spec, len(names))
    if v.mean is not None:  # the re-made scores are the audit's own
        assert abs(v.mean - ev["mean"]) < 1e-9 and v.verdict == ev["verdict"], (v, ev)
    return {
        "k": k,
        "verdict": v.verdict,
        "reason": v.reason,
        "rule_verdict": ev["verdict"],
        **{key: ev[key] for key in ("mean", "ci_low", "ci_high", "n", "stage")},
        "by_images": {n: rule_statistic(test, spec, n) for n in IMAGE_COUNTS if n < len(names)},
        "map_problems": [p.describe() for p in test.map_problems if p.method == "scorecam"],
        "seconds": round(seconds, 2),
    }


IMAGE_COUNTS = (32, 64, 128)  # besides all images: the rule on the first n of them


def rule_statistic(test: TestResult, spec: AuditSpec, n: int) -> dict[str, Any]:
    """Score-CAM's cascading statistic and the rule's verdict on the first ``n`` images, as the
    policy computes them from the scores: exactly an audit of those n images (a module's random
    weights depend only on the seed and its name, and every score is re-made from its first n
    values with the audit's bootstrap seed). Computed also where the audit withholds its
    verdict (a trained map that is all zero makes it INCONCLUSIVE); images without a defined
    similarity drop out of the bootstrap, as they do in the audit."""
    rule = load_policy(spec.policy).rules["cascading"]
    scores = [
        make_score(
            np.array([np.nan if v is None else v for v in s.values[:n]], dtype=np.float64),
            method=s.method,
            test=s.test,
            stage=s.stage,
            stage_index=s.stage_index,
            measure=s.measure,
            seed=spec.seed,
        )
        for s in test.scores
    ]
    controls = {
        c: [s for s in scores if s.method == c] for c in ("control_random", "control_sobel")
    }
    ev = evidence(
        [s for s in scores if s.method == "scorecam"],
        rule,
        spec.seed,
        fractions=stage_fractions(test),
        controls=controls,
    )
    assert ev is not None
    return {
        "verdict": _decide_one(ev, rule)[0],
        "mean": ev.mean,
        "ci_low": ev.ci_low,
        "ci_high": ev.ci_high,
        "n": ev.n,
        "stage": ev.stage,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--ks", default="64,32,16", help="channel counts to compare with all")
    parser.add_argument("--models", type=Path, default=None, help="train_families.py's --out")
    parser.add_argument("--only", default=None, help="comma-separated model names")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the rows (merged)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    rows: list[dict[str, Any]] = []
    for name, (data, decoded) in calibration_models(args.models, args.images).items():
        if args.only and name not in args.only.split(","):
            continue
        model = load_model(data)
        x = preprocess(decoded, model.input_spec)
        layer, width = layer_width(model, x)
        names = [d.name for d in decoded]
        full = audit(model, x, names, None)
        row: dict[str, Any] = {
            "model": name,
            "layer": layer,
            "channels": width,
            "images": int(x.shape[0]),
            "input": list(x.shape[-2:]),
            "torch_threads": torch.get_num_threads(),
            "full": full,
            "top_k": [],
        }
        for k in ks:
            if k >= width:
                row["top_k"].append({"k": k, "same_as_full": True})
                continue
            top = audit(model, x, names, k)
            top["within_full_interval"] = bool(full["ci_low"] <= top["mean"] <= full["ci_high"])
            top["verdict_changed"] = top["verdict"] != full["verdict"]
            top["rule_verdict_changed"] = top["rule_verdict"] != full["rule_verdict"]
            top["time_ratio"] = round(top["seconds"] / full["seconds"], 3)
            for n, at_n in top["by_images"].items():
                reference = full["by_images"][n]
                at_n["within_full_interval"] = bool(
                    reference["ci_low"] <= at_n["mean"] <= reference["ci_high"]
                )
            row["top_k"].append(top)
        rows.append(row)
        print(table([row]), flush=True)
    if args.out is not None:
        # one file for every run: a model's rows replace those of an earlier run
        kept = json.loads(args.out.read_text()) if args.out.exists() else []
        done = {r["model"] for r in rows}
        rows = [r for r in kept if r["model"] not in done] + rows
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print("\n" + table(rows))
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table bench/RESULTS.md shows."""

    def stat(r: dict[str, Any]) -> str:
        return f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] (n={r['n']})"

    def letters(r: dict[str, Any]) -> str:
        by_n = [r["by_images"][n]["verdict"] for n in sorted(r["by_images"], key=int)]
        return "".join(v[0] for v in [*by_n, r["rule_verdict"]])

    def inside(r: dict[str, Any]) -> str:
        by_n = [r["by_images"][n]["within_full_interval"] for n in sorted(r["by_images"], key=int)]
        return "".join("y" if b else "n" for b in [*by_n, r["within_full_interval"]])

    def said(r: dict[str, Any]) -> str:
        """The audit's verdict, and the rule's alone where the audit withheld it."""
        if r["verdict"] == r["rule_verdict"]:
            return r["verdict"]
        return f"{r['verdict']} (rule alone: {r['rule_verdict']})"

    lines = [
        "| model (CAM layer, channels) | images | k | cascading verdict full / top-k | "
        "statistic full "
        "[95% CI] | statistic top-k [95% CI] | top-k inside full's CI | wall time top-k / "
        "full (s) | rule's verdict at n = 32, 64, 128, all: full / top-k (inside full's CI) |",
        "| --- | ---: | ---: | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        full = row["full"]
        for top in row["top_k"]:
            head = f"| {row['model']} ({row['layer']}, {row['channels']}) | {row['images']} "
            if top.get("same_as_full"):
                lines.append(
                    head + f"| {top['k']} | k >= channels: every channel, the full map "
                    f"exactly | {stat(full)} | = full | yes | - | - |"
                )
                continue
            lines.append(
                head + f"| {top['k']} | {said(full)} / {said(top)} | {stat(full)} | "
                f"{stat(top)} | {'yes' if top['within_full_interval'] else 'NO'} | "
                f"{top['time_ratio']:.2f} ({top['seconds']:.0f} / {full['seconds']:.0f}) | "
                f"{letters(full)} / {letters(top)} ({inside(top)}) |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
