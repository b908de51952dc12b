"""Run every sanity check on the four reference models and tabulate the scores the default
verdict policy is calibrated on (docs/policy.md).

    .venv/bin/python examples/reference/calibrate_policy.py --out /tmp/calibration
    .venv/bin/python examples/reference/calibrate_policy.py --out /tmp/calibration --tables-only

For each model (shapes and digits; small CNN and small ResNet) it audits the 64 bundled test
images with every method and every test (data randomization on digits, trained here on the
training split written by ``export_training_set.py``), writes ``<model>/report.json``, and then
prints, per test, the mean of every measure at every stage selector the policy can use, per
method, so that thresholds can be read off and checked against the paper's findings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(HERE.parents[1]))

import torch  # noqa: E402

from examples.reference.export_training_set import export_training_set  # noqa: E402
from saliency_audit.workers.engine.data_randomization import LabeledImages  # noqa: E402
from saliency_audit.workers.engine.images import load_image_folder, load_labeled_folder, preprocess  # noqa: E402
from saliency_audit.workers.engine.methods import METHODS  # noqa: E402
from saliency_audit.workers.engine.models.loader import load_model  # noqa: E402
from saliency_audit.workers.engine.policy import Rule, decide, evidence, load_policy  # noqa: E402
from saliency_audit.workers.engine.result import AuditResult  # noqa: E402
from saliency_audit.workers.engine.runner import run_audit  # noqa: E402
from saliency_audit.workers.engine.spec import MEASURES, TESTS, AuditSpec  # noqa: E402

MODELS = ("shapes_small_cnn", "shapes_small_resnet", "digits_small_cnn", "digits_small_resnet")
SELECTORS: tuple[str | dict[str, Any], ...] = (
    "first",
    {"fraction": 0.5},
    "last",
    "mean_over_stages",
)


def audit(name: str, out: Path, seed: int) -> dict[str, Any]:
    dataset = name.split("_")[0]
    model = load_model((HERE / f"{name}.onnx").read_bytes())
    decoded = load_image_folder(HERE / f"{dataset}_images", model.input_spec.channels)
    images = preprocess(decoded, model.input_spec)
    tests = [t for t in TESTS if t != "data_randomization" or dataset == "digits"]
    train = None
    if dataset == "digits":
        folder = out / "digits_train"
        if not folder.exists():
            export_training_set("digits", folder)
        train_images, labels, _ = load_labeled_folder(
            folder, model.input_spec.channels, model.input_spec.class_names
        )
        train = LabeledImages(
            preprocess(train_images, model.input_spec), torch.tensor(labels, dtype=torch.int64)
        )
    spec = AuditSpec(
        methods=tuple(n for n, i in METHODS.items() if not i.is_control),
        tests=tuple(tests),
        stages="all",  # the tables show every stage
        seed=seed,
        batch_size=64,
    )
    t0 = time.perf_counter()
    result = run_audit(model, images, spec, image_names=[d.name for d in decoded], train=train)
    print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    report = result.to_dict()
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def tables(reports: dict[str, dict[str, Any]]) -> str:
    """Markdown: per test and measure, rows = methods, columns = model x stage selector."""
    lines: list[str] = []
    parsed = {name: AuditResult.from_dict(r) for name, r in reports.items()}
    tests = [t for t in TESTS if any(t in p.tests for p in parsed.values())]
    for test in tests:
        measures = ["entropy_rise"] if test == "emprt" else list(MEASURES)
        staged = test in ("cascading", "cascading_bottom_up", "independent")
        selectors = SELECTORS if staged else ("last",)
        for measure in measures:
            lines += ["", f"### {test}: {measure}", ""]
            cols = [
                (name, sel) for name in parsed if test in parsed[name].tests for sel in selectors
            ]
            short = {m: m.replace("_small_", " ").replace("resnet", "rn") for m in parsed}
            head = (
                "| method | "
                + " | ".join(f"{short[n]} {s if isinstance(s, str) else 'half'}" for n, s in cols)
                + " |"
            )
            lines += [head, "|---" * (len(cols) + 1) + "|"]
            methods = list(next(iter(parsed.values())).methods)
            for method in methods:
                cells = []
                for name, sel in cols:
                    result = parsed[name].tests[test]
                    rule = Rule(measure, sel, 0.0, "below")
                    ev = evidence([s for s in result.scores if s.method == method], rule, 0)
                    cells.append("-" if ev is None or ev.mean is None else f"{ev.mean:.2f}")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_tables(reports: dict[str, dict[str, Any]], policy_file: Path | None) -> str:
    """Markdown: per test, each method's verdict under the policy with its deciding numbers."""
    document = json.loads(policy_file.read_text()) if policy_file else None
    policy = load_policy(document)
    lines = [f"## Verdicts under {policy.name} {policy.version}"]
    parsed = {name: AuditResult.from_dict(r) for name, r in reports.items()}
    decided = {}
    for name, result in parsed.items():
        methods = {
            m: (r.is_control, r.reason if r.status != "ok" else None)
            for m, r in result.methods.items()
        }
        decided[name] = {
            (v.method, v.test): v
            for v in decide(policy, result.tests, methods, result.spec["seed"])
        }
    for test in TESTS:
        names = [n for n in parsed if test in parsed[n].tests]
        if not names:
            continue
        rule = policy.rules[test]
        lines += [
            "",
            f"### {test}: {rule.measure} at {rule.stage}, PASS when the 95% CI is "
            f"{rule.pass_when} {rule.threshold}",
            "",
        ]
        lines += ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for method in next(iter(parsed.values())).methods:
            cells = []
            for name in names:
                v = decided[name][(method, test)]
                if v.mean is None:
                    cells.append(v.verdict)
                else:
                    cells.append(f"{v.verdict} {v.mean:.2f} [{v.ci_low:.2f}, {v.ci_high:.2f}]")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tables-only", action="store_true", help="re-read saved reports")
    parser.add_argument("--policy", type=Path, default=None, help="default: the shipped one")
    args = parser.parse_args(argv)
    reports = {}
    for name in args.models.split(","):
        path = args.out / name / "report.json"
        if args.tables_only:
            reports[name] = json.loads(path.read_text())
        else:
            reports[name] = audit(name, args.out, args.seed)
    print(verdict_tables(reports, args.policy))
    print()
    print(tables(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
