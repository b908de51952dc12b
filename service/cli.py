"""``saliency-audit``: the command line.

This module is imported by the API process too, so it never imports torch at module level:
commands that compute import the engine inside their handler.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .gate import add_gate_arguments, run_gate

EXIT_OK = 0
EXIT_ERROR = 2


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saliency-audit",
        description="Audit whether saliency methods depend on what an image classifier learned.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="compute saliency maps for a model and an image folder locally; write report.json",
        description=(
            "Compute every requested saliency method (plus the control_sobel and "
            "control_random controls) on the images, check an ONNX model's converted graph "
            "against ONNX Runtime, run the requested sanity checks, decide a PASS / FAIL / "
            "INCONCLUSIVE verdict per (method, test) with the policy, and write "
            "DIR/report.json and DIR/maps.npz."
        ),
    )
    run.add_argument("--model", required=True, type=Path, help="ONNX file, or weights with --arch")
    run.add_argument(
        "--arch",
        default=None,
        help="torchvision architecture name (e.g. resnet18); --model is then a .safetensors "
        "file or a state dict saved with torch.save",
    )
    run.add_argument("--images", required=True, type=Path, help="folder of images")
    run.add_argument(
        "--methods",
        type=_csv,
        default=None,
        help="comma-separated method names (default: all; see `saliency-audit methods`)",
    )
    run.add_argument(
        "--layer", default=None, help="module name for CAM methods (default: last conv)"
    )
    run.add_argument(
        "--layers",
        type=_csv,
        default=None,
        help="module names the `layers` analysis explains (default: the output of every block)",
    )
    run.add_argument(
        "--masks",
        type=Path,
        default=None,
        help="folder of ground-truth object masks (one per image, same file stem, nonzero = "
        "object): the `layers` analysis then scores localization (IoU, pointing game)",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    run.add_argument(
        "--input-spec",
        type=Path,
        default=None,
        help="JSON file overriding input spec fields (height, width, layout, mean, std, "
        "value_range, class_names, channels)",
    )
    run.add_argument(
        "--params",
        type=Path,
        default=None,
        help="JSON file of method parameters (ig_steps, noise_samples, noise_level, "
        "lrp_composite, ...)",
    )
    run.add_argument(
        "--tests",
        type=_csv,
        default=["cascading"],
        help="comma-separated tests (default: cascading; 'none' for maps only; 'all' for every "
        "sanity check; 'layers' for the per-layer heatmap analysis; see `saliency-audit "
        "methods`)",
    )
    run.add_argument(
        "--granularity",
        choices=("block", "module"),
        default="block",
        help="stages of the model randomization tests: one per child block of the model "
        "(default) or one per parameterized module",
    )
    run.add_argument(
        "--measures",
        type=_csv,
        default=None,
        help="similarity measures to score (default: all)",
    )
    run.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="verdict policy JSON file (default: the shipped policy; `saliency-audit policy` "
        'prints it); a file with "extends": "default" overrides entries of the default',
    )
    run.add_argument(
        "--train",
        type=Path,
        default=None,
        help="labeled training set for data_randomization: one sub-folder of images per class",
    )
    run.add_argument(
        "--random-label-model",
        type=Path,
        default=None,
        help="for data_randomization: the same architecture already trained on random labels "
        "(ONNX, or weights with --arch), compared with --model instead of training here",
    )
    run.add_argument(
        "--train-recipe",
        type=Path,
        default=None,
        help="JSON file overriding the data randomization training recipe (target_accuracy, "
        "max_epochs, max_seconds, batch_size, learning_rate)",
    )
    run.add_argument("--out", type=Path, default=Path("out"), help="output folder (default ./out)")
    run.add_argument("--quiet", action="store_true", help="no progress lines")

    sub.add_parser("methods", help="list the saliency methods, tests and similarity measures")
    sub.add_parser("policy", help="print the default verdict policy (JSON)")

    serve = sub.add_parser(
        "serve",
        help="run the HTTP API (with no configuration: embedded SQLite, artifact folder and a "
        "worker process that needs no broker server)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--threads", type=int, default=8, help="request threads (default 8)")
    worker_flag = serve.add_mutually_exclusive_group()
    worker_flag.add_argument(
        "--worker",
        dest="with_worker",
        action="store_true",
        default=None,
        help="start a worker process beside the API (the default in embedded mode)",
    )
    worker_flag.add_argument(
        "--no-worker", dest="with_worker", action="store_false", help="the API alone"
    )

    keys = sub.add_parser("keys", help="API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="create a key for a tenant (created if new); prints it")
    create.add_argument("--tenant", required=True)
    create.add_argument("--label", default=None)
    revoke = keys.add_parser("revoke", help="revoke a key by its prefix (sak_PREFIX_...)")
    revoke.add_argument("prefix")
    secret = keys.add_parser(
        "webhook-secret",
        help="print the tenant's webhook signing secret (created if it has none)",
    )
    secret.add_argument("--tenant", required=True)
    secret.add_argument("--rotate", action="store_true", help="replace it with a new one")

    database = sub.add_parser("db", help="database schema (Alembic migrations)")
    db_sub = database.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="migrate to a revision (default: head)")
    upgrade.add_argument("revision", nargs="?", default="head")
    downgrade = db_sub.add_parser("downgrade", help="migrate down to a revision (e.g. base)")
    downgrade.add_argument("revision")
    db_sub.add_parser("current", help="print the current revision")

    reconcile = sub.add_parser(
        "reconcile",
        help="re-enqueue audits whose broker message was lost or whose worker died",
    )
    reconcile.add_argument("--once", action="store_true", help="one pass, then exit")
    reconcile.add_argument(
        "--interval", type=float, default=None, help="seconds between passes (default: config)"
    )

    gate = sub.add_parser(
        "gate",
        help="release gate for CI: audit a model on a running service; exit 0 PASS, 1 FAIL, 2 "
        "error / timeout / INCONCLUSIVE",
        description=(
            "Upload a model and images to a saliency-audit service (or reuse what it already "
            "holds, found by sha256), run an audit with an idempotency key derived from the "
            "files and the request (a re-run attaches to the same audit), wait with a progress "
            "bar, print the verdict table and exit 0 when every --require-d method PASSes "
            "every test, 1 when one FAILs, 2 on an error, a timeout or an INCONCLUSIVE verdict "
            "(see --inconclusive)."
        ),
    )
    add_gate_arguments(gate)
    return parser


def _read_json(path: Path | None, what: str) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: cannot read {what} {path}: {exc}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"error: {what} {path} must hold a JSON object")
    return value


def cmd_run(args: argparse.Namespace) -> int:
    from workers.engine.errors import EngineError

    try:
        return _run(args)
    except EngineError as exc:
        print(f"error: {exc.message} ({exc.code})", file=sys.stderr)
        return EXIT_ERROR


def _run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    import numpy as np
    import torch

    from workers.engine.data_randomization import LabeledImages
    from workers.engine.images import (
        load_image_folder,
        load_labeled_folder,
        load_mask_folder,
        masks_tensor,
        preprocess,
    )
    from workers.engine.methods import METHODS
    from workers.engine.models.loader import load_model
    from workers.engine.runner import run_audit
    from workers.engine.spec import (
        ANALYSES,
        MEASURES,
        TESTS,
        AuditSpec,
        MethodParams,
        TrainRecipe,
    )

    try:
        model_bytes = args.model.read_bytes()
    except OSError as exc:
        print(f"error: cannot read model {args.model}: {exc.strerror}", file=sys.stderr)
        return EXIT_ERROR
    try:
        params = MethodParams(**_read_json(args.params, "method parameters"))
    except TypeError as exc:
        print(f"error: invalid method parameters: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        recipe = TrainRecipe(**_read_json(args.train_recipe, "training recipe"))
    except TypeError as exc:
        print(f"error: invalid training recipe: {exc}", file=sys.stderr)
        return EXIT_ERROR
    methods = args.methods or [n for n, info in METHODS.items() if not info.is_control]
    tests = args.tests
    if tests == ["none"]:
        tests = []
    elif tests == ["all"]:
        tests = [t for t in TESTS if t not in ANALYSES]
        if args.train is None and args.random_label_model is None:
            tests.remove("data_randomization")
    spec = AuditSpec(
        methods=tuple(methods),
        layer=args.layer,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        params=params,
        tests=tuple(tests),
        granularity=args.granularity,
        measures=tuple(args.measures or MEASURES),
        policy=_read_json(args.policy, "policy") if args.policy else None,
        training=recipe,
        layers=tuple(args.layers) if args.layers else None,
    )
    model = load_model(
        model_bytes,
        architecture=args.arch,
        input_spec_overrides=_read_json(args.input_spec, "input spec"),
    )
    print(
        format_input_spec(
            asdict(model.input_spec),
            model.input_spec_sources,
            model.output.to_dict() if model.output is not None else None,
        ),
        flush=True,
    )
    decoded = load_image_folder(args.images, model.input_spec.channels)
    images = preprocess(decoded, model.input_spec)
    masks = None
    if args.masks is not None:
        masks = masks_tensor(
            load_mask_folder(args.masks, [d.name for d in decoded]), model.input_spec
        )
    train = None
    if args.train is not None:
        train_images, labels, _ = load_labeled_folder(
            args.train, model.input_spec.channels, model.input_spec.class_names
        )
        train = LabeledImages(
            preprocess(train_images, model.input_spec), torch.tensor(labels, dtype=torch.int64)
        )
    random_label_model = None
    if args.random_label_model is not None:
        try:
            random_bytes = args.random_label_model.read_bytes()
        except OSError as exc:
            print(
                f"error: cannot read model {args.random_label_model}: {exc.strerror}",
                file=sys.stderr,
            )
            return EXIT_ERROR
        random_label_model = load_model(
            random_bytes,
            architecture=args.arch,
            input_spec_overrides=_read_json(args.input_spec, "input spec"),
        )

    last = [0.0]

    def progress(fraction: float, step: str) -> None:
        now = time.monotonic()
        if not args.quiet and (now - last[0] > 1.0 or fraction >= 1.0):
            print(f"[{fraction * 100:5.1f}%] {step}", file=sys.stderr, flush=True)
            last[0] = now

    result = run_audit(
        model,
        images,
        spec,
        image_names=[d.name for d in decoded],
        train=train,
        random_label_model=random_label_model,
        masks=masks,
        progress=progress,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "report.json"
    report.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    np.savez_compressed(args.out / "maps.npz", **result.maps)  # type: ignore[arg-type]
    print(format_summary(result.to_dict()))
    print(f"\nwrote {report} and {args.out / 'maps.npz'}")
    return EXIT_OK


def format_input_spec(
    spec: dict[str, Any], sources: Mapping[str, str], output: dict[str, Any] | None
) -> str:
    """The input spec an audit uses, each value with where it came from (graph, metadata,
    given or assumed), and the output it explains: printed before anything is computed, so a
    wrong guess is seen before it costs an audit."""

    def src(*names: str) -> str:
        found = list(dict.fromkeys(sources.get(n, "?") for n in names))
        return f"({', '.join(found)})"

    def values(key: str) -> str:
        return "[" + ", ".join(f"{v:g}" for v in spec[key]) + "]"

    lines = [
        "input spec used (where each value came from):",
        f"  size           {spec['height']}x{spec['width']} {src('height', 'width')}",
        f"  layout         {spec['layout']}, {spec['channels']} "
        f"{'channel' if spec['channels'] == 1 else 'channels'} {src('layout', 'channels')}",
        f"  channel order  {spec['channel_order']} {src('channel_order')}"
        if spec["channels"] == 3
        else "  channel order  - (one channel: grayscale)",
        f"  value range    {values('value_range')} {src('value_range')}",
        f"  mean           {values('mean')} {src('mean')}",
        f"  std            {values('std')} {src('std')}",
    ]
    if output is not None:
        shape = "[" + ", ".join("N" if d is None else str(d) for d in output["shape"] or []) + "]"
        explained = (
            f"; its {output['head_removed']} is left out: maps explain the pre-softmax scores "
            f"{output['scores']!r}"
            if output.get("head_removed")
            else ""
        )
        lines.append(f"  output         {output['name']!r} {shape}{explained} {src('output')}")
    return "\n".join(lines)


def format_summary(report: dict[str, Any]) -> str:
    """A plain-text table of the methods for the terminal."""
    lines = []
    fid = report.get("fidelity")
    if fid:
        relative = fid.get("max_rel_diff")
        lines.append(
            f"fidelity vs ONNX Runtime ({fid['provider']}): max |diff| {fid['max_abs_diff']:.2e}"
            + (f", relative {relative:.2e}" if relative is not None else "")
            + f" (atol {fid['atol']:.0e}"
            + (f", rtol {fid['rtol']:.0e}" if fid.get("rtol") is not None else "")
            + f"), argmax agreement {fid['argmax_agreement'] * 100:.1f}% "
            f"over {fid['n_images']} images"
        )
    spec = report["spec"]
    layer, why = spec.get("resolved_layer"), spec.get("layer_reason")
    lines.append(f"layer for CAM methods: {layer or 'none'}" + (f" ({why})" if why else ""))
    header = (
        f"{'method':<22}{'status':<16}{'time s':>8}{'mean|m|':>11}{'top10%':>8}{'ssim~sobel':>12}"
        f"{'conserved':>11}"
    )
    lines += [header, "-" * len(header)]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    unusual = []
    for name, m in report["methods"].items():
        stats = m.get("statistics") or {}
        ssim = (m.get("similarity_to_sobel") or {}).get("ssim") or {}
        conservation = m.get("conservation") or {}
        lines.append(
            f"{name:<22}{m['status']:<16}{fmt(m.get('family_time_s'), '.2f'):>8}"
            f"{fmt(stats.get('mean_abs'), '.3g'):>11}{fmt(stats.get('top10_mass'), '.2f'):>8}"
            f"{fmt(ssim.get('mean'), '.2f'):>12}{fmt(conservation.get('mean'), '.3f'):>11}"
        )
        if m["status"] != "ok" and m.get("reason"):
            unusual.append(f"  {name} ({m['status']}): {m['reason']}")
    if any((m.get("conservation") or {}) for m in report["methods"].values()):
        lines.append(
            "conserved: mean over images of the relevance a relevance method handed out over "
            "its start (LRP: input sum / target logit)"
        )
    if unusual:
        lines += ["not ok:", *unusual]
    if "layers" in (report.get("tests") or {}):
        lines += ["", format_layers(report["tests"]["layers"])]
    verdicts = report.get("verdicts") or []
    if verdicts:
        lines += ["", format_verdicts(report)]
    return "\n".join(lines)


LAYER_METRIC_TITLES = {
    "average_drop": "Average Drop % (lower is better)",
    "average_increase": "Average Increase % (higher is better)",
    "deletion_auc": "deletion AUC (lower is better)",
    "insertion_auc": "insertion AUC (higher is better)",
    "iou": "localization IoU (higher is better)",
    "pointing_game": "pointing game hits (higher is better)",
}


def format_layers(test: dict[str, Any]) -> str:
    """The per-layer analysis as one small table per metric: layers down, methods across."""
    details = test.get("details") or {}
    methods = details.get("methods") or []
    layers = [row["label"] for row in details.get("layers") or []]
    by_key = {(s["stage"], s["method"], s["measure"]): s for s in test["scores"]}
    beats = details.get("beats_random") or {}
    lines = ["per-layer analysis (mean over images; * = beats control_random at that layer)"]
    for metric in details.get("metrics") or []:
        lines += ["", LAYER_METRIC_TITLES.get(metric, metric)]
        header = f"{'layer':<14}" + "".join(f"{m:>16}" for m in methods)
        lines += [header, "-" * len(header)]
        for layer in layers:
            cells = []
            for method in methods:
                score = by_key.get((layer, method, metric))
                if score is None or score["mean"] is None:
                    cells.append(f"{'-':>16}")
                    continue
                mark = "*" if (beats.get(layer) or {}).get(method, {}).get(metric) else " "
                cells.append(f"{score['mean']:>15.3g}{mark}")
            lines.append(f"{layer:<14}" + "".join(cells))
    return "\n".join(lines)


def format_verdicts(report: dict[str, Any]) -> str:
    """The verdict table: one row per method, one column per test, then the reasons that make
    a verdict INCONCLUSIVE (a user's first question about one)."""
    verdicts = report.get("verdicts") or []
    tests = list(dict.fromkeys(v["test"] for v in verdicts))
    methods = list(dict.fromkeys(v["method"] for v in verdicts))
    by_key = {(v["method"], v["test"]): v for v in verdicts}
    policy = report.get("policy") or {}
    width = max(19, *(len(t) + 2 for t in tests))  # "INCONCLUSIVE -0.12" and a space
    lines = [f"verdicts (policy {policy.get('name')} {policy.get('version')})"]
    header = f"{'method':<22}" + "".join(f"{t:<{width}}" for t in tests)
    lines += [header, "-" * len(header)]
    for method in methods:
        cells = []
        for test in tests:
            v = by_key.get((method, test))
            if v is None:
                cells.append(f"{'-':<{width}}")
                continue
            mean = "" if v.get("mean") is None else f" {v['mean']:.2f}"
            cells.append(f"{v['verdict'] + mean:<{width}}")
        lines.append(f"{method:<22}" + "".join(cells))
    rules = []
    for test in tests:
        rule = (policy.get("tests") or {}).get(test)
        if rule:
            stage = rule.get("stage")
            if isinstance(stage, dict) and "area" in stage:
                start, end = stage["area"]
                where = f"averaged over the first {end - start:.0%} of the layers randomized"
            else:
                where = f"at {stage}"
            scaled = " (scaled by the controls)" if rule.get("scale") == "controls" else ""
            fail = rule.get("fail_threshold", rule["threshold"])
            other = "above" if rule["pass_when"] == "below" else "below"
            fails = f", FAIL when it is at or {other} {fail}" if fail != rule["threshold"] else ""
            rules.append(
                f"  {test}: {rule['measure']}{scaled} {where}, PASS when the 95% CI is "
                f"{rule['pass_when']} {rule['threshold']}{fails}"
            )
    if rules:
        lines += ["numbers are the deciding score's mean; rules:", *rules]
    recommended = (policy.get("recommended_images") or {}).get("images")
    audited = len(report.get("images") or [])
    if isinstance(recommended, int) and 0 < audited < recommended:
        lines.append(
            f"note: {audited} images audited; the policy was calibrated to decide from "
            f"{recommended} images (docs/policy.md), so expect more INCONCLUSIVE verdicts"
        )
    # one line per reason, with the (method, test) pairs it explains
    explained: dict[str, list[str]] = {}
    for v in verdicts:
        if v["verdict"] == "INCONCLUSIVE":
            reason = v["reason"].split(" (by the rule alone")[0]
            explained.setdefault(reason, []).append(f"{v['method']}/{v['test']}")
    if explained:
        lines.append("inconclusive because:")
        for reason, pairs in explained.items():
            shown = ", ".join(pairs[:4]) + (f" and {len(pairs) - 4} more" if len(pairs) > 4 else "")
            lines.append(f"  {shown}: {reason}")
    return "\n".join(lines)


def cmd_methods(args: argparse.Namespace) -> int:
    from workers.engine.methods import METHODS
    from workers.engine.sanity import TEST_INFO
    from workers.engine.spec import MEASURES

    print("methods:")
    for name, info in METHODS.items():
        kind = "control" if info.is_control else ("layer" if info.needs_conv_layer else "input")
        print(f"  {name:<22}{kind:<9}{info.reference}")
    print("tests (--tests):")
    for name, test in TEST_INFO.items():
        print(f"  {name:<22}{test.reference}")
    print("similarity measures (--measures): " + ", ".join(MEASURES))
    return EXIT_OK


def cmd_policy(args: argparse.Namespace) -> int:
    from workers.engine.policy import default_document

    print(json.dumps(default_document(), indent=2))
    return EXIT_OK


def _config() -> Any:
    from .config import Config, ConfigError

    try:
        return Config.from_env()
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .embedded import serve

    config = _config()
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return serve(config, args.host, args.port, args.with_worker, args.threads)


def cmd_keys(args: argparse.Namespace) -> int:
    from .auth import create_key, revoke_key
    from .db import Database

    config = _config()
    if config.embedded:
        # the embedded SQLite file may not exist yet: keys come before the first `serve`
        from . import db

        db.upgrade(config.resolved_database_url)
    database = Database.from_config(config)
    with database.session() as session:
        if args.keys_command == "create":
            key, tenant = create_key(session, args.tenant, args.label)
            print(key)
            print(
                f"(tenant {tenant.name}, id {tenant.id}; the key is shown only now)",
                file=sys.stderr,
            )
            return EXIT_OK
        if args.keys_command == "webhook-secret":
            from sqlalchemy import select

            from .models import Tenant
            from .webhooks import new_secret

            found = session.scalars(select(Tenant).where(Tenant.name == args.tenant)).first()
            if found is None:
                print(f"error: no tenant {args.tenant!r}", file=sys.stderr)
                return EXIT_ERROR
            if found.webhook_secret is None or args.rotate:
                found.webhook_secret = new_secret()
            print(found.webhook_secret)
            return EXIT_OK
        if not revoke_key(session, args.prefix):
            print(f"error: no active key with prefix {args.prefix!r}", file=sys.stderr)
            return EXIT_ERROR
    print(f"revoked {args.prefix}")
    return EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    from . import db

    url = _config().resolved_database_url
    if args.db_command == "upgrade":
        db.upgrade(url, args.revision)
    elif args.db_command == "downgrade":
        db.downgrade(url, args.revision)
    print(f"database at revision {db.current_revision(url) or 'base'}")
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace) -> int:
    import logging

    from .db import Database
    from .jobs import Enqueuer, broker_probe, reconcile

    config = _config()
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    database = Database.from_config(config)
    enqueue = Enqueuer(config)
    probe = broker_probe(config)
    interval = args.interval if args.interval is not None else config.reconcile_interval_s
    while True:
        report = reconcile(database, enqueue, probe)
        print(json.dumps(report.to_dict()), flush=True)
        if args.once:
            return EXIT_OK
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "run": cmd_run,
        "methods": cmd_methods,
        "policy": cmd_policy,
        "serve": cmd_serve,
        "keys": cmd_keys,
        "db": cmd_db,
        "reconcile": cmd_reconcile,
        "gate": run_gate,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
