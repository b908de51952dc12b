"""``saliency-audit run`` and ``saliency-audit gate --local``: audits on this machine, without
the service.

The local twin of the worker's audit task (:mod:`saliency_audit.workers.tasks`): it loads the model
and the
images from files instead of the database and the artifact store, calls the same engine entry
point (:func:`saliency_audit.workers.engine.api.audit`, the Python API), and writes ``report.json``
and
``maps.npz`` to a folder instead of rows and artifacts (``run``), or hands the report to the
release gate's decision (:func:`audit_for_gate`). torch and the engine are imported inside the
functions, so the command line that dispatches to them stays light.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saliency_audit.workers.reports.text import (
    ProgressClock,
    format_duration,
    format_input_spec,
    format_summary,
)

if TYPE_CHECKING:
    from saliency_audit.service.gate import Audited, GateInputs

EXIT_OK = 0
EXIT_ERROR = 2


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


def run_local(args: argparse.Namespace) -> int:
    """``saliency-audit run``: the exit code (0, or 2 with the error on stderr)."""
    from saliency_audit.workers.engine.errors import EngineError

    try:
        return _run(args)
    except EngineError as exc:
        print(f"error: {exc.message} ({exc.code})", file=sys.stderr)
        return EXIT_ERROR


def load_model_file(
    path: Path, architecture: str | None, input_spec_overrides: dict[str, Any]
) -> Any:
    """The :class:`~saliency_audit.workers.engine.models.base.LoadedModel` of an ONNX file or of
    weights with
    ``architecture``; an unreadable file is a ``ModelLoadError``."""
    from saliency_audit.workers.engine.errors import ModelLoadError
    from saliency_audit.workers.engine.models.loader import load_model

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read model {path}: {exc.strerror}") from None
    return load_model(data, architecture=architecture, input_spec_overrides=input_spec_overrides)


def input_spec_text(model: Any) -> str:
    """The input spec block printed before an audit (``run`` and ``gate --local``)."""
    from dataclasses import asdict

    return format_input_spec(
        asdict(model.input_spec),
        model.input_spec_sources,
        model.output.to_dict() if model.output is not None else None,
    )


def training_set(path: Path, model: Any) -> Any:
    """``--train``: a folder with one sub-folder of images per class, as
    :class:`~saliency_audit.workers.engine.data_randomization.LabeledImages` in the model's
    input."""
    import torch

    from saliency_audit.workers.engine.data_randomization import LabeledImages
    from saliency_audit.workers.engine.images import load_labeled_folder, preprocess

    images, labels, _ = load_labeled_folder(
        path, model.input_spec.channels, model.input_spec.class_names
    )
    return LabeledImages(
        preprocess(images, model.input_spec), torch.tensor(labels, dtype=torch.int64)
    )


def _run(args: argparse.Namespace) -> int:
    from saliency_audit.workers.engine.api import adaptive_rounds, audit, read_images
    from saliency_audit.workers.engine.images import load_mask_folder, masks_tensor
    from saliency_audit.workers.engine.methods import METHODS
    from saliency_audit.workers.engine.methods.plugins import is_plugin
    from saliency_audit.workers.engine.spec import (
        MEASURES,
        AuditSpec,
        MethodParams,
        TrainRecipe,
        expand_tests,
    )

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
    plugins = _register_method_plugins(getattr(args, "method_plugins", None) or [])
    methods = (
        args.methods
        or [n for n, info in METHODS.items() if not info.is_control and not is_plugin(info)]
        + plugins
    )
    tests = expand_tests(
        args.tests, training=args.train is not None or args.random_label_model is not None
    )
    # options added later are read with defaults (a Namespace built by an older caller works)
    round_images = getattr(args, "adaptive", None)
    max_images = getattr(args, "max_images", None)
    if max_images is not None and round_images is None:
        print("error: --max-images needs --adaptive", file=sys.stderr)
        return EXIT_ERROR
    adaptive = None
    if round_images is not None:
        adaptive = adaptive_rounds({"round_images": round_images, "max_images": max_images})
    spec = AuditSpec(
        methods=tuple(methods),
        layer=args.layer,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        params=params,
        tests=tuple(tests),
        granularity=args.granularity,
        stages=getattr(args, "stages", "rule"),
        measures=tuple(args.measures or MEASURES),
        policy=_read_json(args.policy, "policy") if args.policy else None,
        training=recipe,
        layers=tuple(args.layers) if args.layers else None,
        adaptive=adaptive,
    )
    overrides = _read_json(args.input_spec, "input spec")
    model = load_model_file(args.model, args.arch, overrides)
    # options added later are read with defaults, so a Namespace built by other callers of
    # run_local (older option sets) keeps working
    as_json: bool = getattr(args, "json", False)
    report_formats: list[str] = getattr(args, "report", None) or []
    # with --json, stdout carries report.json alone: what is said on the way goes to stderr
    say = sys.stderr if as_json else sys.stdout
    print(input_spec_text(model), file=say, flush=True)
    read = read_images(args.images, model.input_spec)
    if read.note:
        print(f"note: {read.note}", file=say, flush=True)
        model.notes.append(read.note)
    masks = None
    if args.masks is not None:
        masks = masks_tensor(load_mask_folder(args.masks, read.names), model.input_spec)
    train = training_set(args.train, model) if args.train is not None else None
    random_label_model = None
    if args.random_label_model is not None:
        random_label_model = load_model_file(args.random_label_model, args.arch, overrides)

    predicted = predicted_wall_time(
        model, spec, int(read.tensor.shape[0]), len(train.labels) if train is not None else 0
    )
    print(predicted.text, file=say, flush=True)
    last = [0.0]
    clock = ProgressClock(time.monotonic(), predicted.seconds)

    def progress(fraction: float, step: str) -> None:
        now = time.monotonic()
        timing = clock.text(fraction, now)  # every reading counts for the rate
        if not args.quiet and (now - last[0] > 1.0 or fraction >= 1.0):
            print(f"[{fraction * 100:5.1f}%] {step} ({timing})", file=sys.stderr, flush=True)
            last[0] = now

    result = audit(
        model,
        read.tensor,
        spec=spec,
        image_names=read.names,
        train=train,
        random_label_model=random_label_model,
        masks=masks,
        progress=progress,
    )
    report = result.write(args.out)
    document = result.to_dict()
    written = [report, args.out / "maps.npz"]
    if report_formats:
        written += write_reports(document, result, read.decoded, args.out, report_formats)
    if as_json:
        print(json.dumps(document, indent=2, allow_nan=False))
    else:
        print(format_summary(document))
    print(
        f"\nwrote {', '.join(str(p) for p in written[:-1])} and {written[-1]}",
        file=say,
    )
    return EXIT_OK


@dataclass(frozen=True)
class Predicted:
    """An audit's predicted wall time (None where the passes could not be timed) and the line
    that says it."""

    seconds: float | None
    text: str


def predicted_wall_time(model: Any, spec: Any, images: int, train_images: int = 0) -> Predicted:
    """Time the model's passes here (workers/engine/timing.py) and predict the audit's wall time
    from its spec (the cost model the service prices its submits with)."""
    from saliency_audit.workers.engine.catalogue import catalogue
    from saliency_audit.workers.engine.contract.cost import families_of, predict
    from saliency_audit.workers.engine.errors import stops_the_audit
    from saliency_audit.workers.engine.policy import rule_stages
    from saliency_audit.workers.engine.timing import measure_pass_prices

    try:
        families = families_of(catalogue()["methods"])
        wanted = {families.get(m, m) for m in spec.methods}
        prices = measure_pass_prices(model, spec.device, spec.seed, wanted)
    except Exception as exc:  # the audit says what is wrong with the model; no prediction
        if stops_the_audit(exc):
            raise
        return Predicted(None, f"predicted wall time: none (the passes could not be timed: {exc})")
    found = predict(
        spec,
        families,
        prices,
        images=images,
        onnx=model.onnx_bytes is not None,
        train_images=train_images,
        rule_stages=rule_stages(spec.policy),
    )
    return Predicted(
        found.seconds,
        f"predicted wall time: about {format_duration(found.seconds)} (this model's passes "
        f"timed here on {prices.device}, {prices.threads} threads, in {prices.measured_s:.1f} s)",
    )


class GateDeadline(Exception):
    """``gate --local`` ran past ``--timeout``: raised from the progress callback, and
    declared with :func:`~saliency_audit.workers.engine.errors.stop_audit_on` so that the engine's
    per-method
    error isolation ends the audit instead of reporting one method as failed."""


PROGRESS_EVERY_S = 1.0  # at most one progress line a second in a CI log


def audit_for_gate(
    args: argparse.Namespace,
    inputs: GateInputs,
    note: Callable[[str], None],
    deadline: float,
) -> Audited:
    """``saliency-audit gate --local``: the audit a service would run for the gate's request
    (the same spec: seed 0, batch 16, device auto, every measure, the default or given policy),
    run here with the engine call ``saliency-audit run`` makes. Errors are the gate's
    (:class:`~saliency_audit.service.gate.GateError`, exit 2), with the engine's error code."""
    from saliency_audit.service.gate import Audited, GateError, Progress, image_set_archive

    try:
        import torch  # noqa: F401  (the engine's first import; absent without the extra)
    except ImportError:
        raise GateError(
            "engine_not_installed",
            "gate --local runs the audit in this process and needs the engine: install "
            "saliency-audit with its worker extra ('saliency-audit[worker] @ <source>'), or "
            "gate on a service with --server",
        ) from None
    from saliency_audit.workers.engine.api import audit, read_images
    from saliency_audit.workers.engine.errors import EngineError, stop_audit_on
    from saliency_audit.workers.engine.methods.plugins import load_entry_point_explainers
    from saliency_audit.workers.engine.spec import AuditSpec, expand_tests

    assert inputs.images is not None  # --dataset-id is refused with --local
    stop_audit_on(GateDeadline)
    progress = Progress(sys.stderr, quiet=args.quiet)
    last = [0.0]

    def on_progress(fraction: float, step: str) -> None:
        now = time.monotonic()
        if now > deadline:
            raise GateDeadline(f"{fraction * 100:.0f}%, {step}")
        if now - last[0] >= PROGRESS_EVERY_S or fraction >= 1.0:
            progress.update({"state": "running", "progress": fraction, "step": step})
            last[0] = now

    try:
        load_entry_point_explainers()  # the explainers a service's workers would have
        tests = expand_tests(list(dict.fromkeys(args.tests)), training=args.train is not None)
        spec = AuditSpec(
            methods=tuple(dict.fromkeys(args.methods)),
            tests=tuple(tests),
            device="auto",
            policy=inputs.policy,
        )
        model = load_model_file(args.model, args.arch, {})
        note(input_spec_text(model))
        read = read_images(inputs.images, model.input_spec)
        if read.note:
            model.notes.append(read.note)  # noted by the gate when it listed the images
        train = training_set(args.train, model) if args.train is not None else None
        predicted = predicted_wall_time(
            model, spec, int(read.tensor.shape[0]), len(train.labels) if train else 0
        )
        note(predicted.text)
        progress.predicted(predicted.seconds)
        result = audit(
            model,
            read.tensor,
            spec=spec,
            image_names=read.names,
            train=train,
            progress=on_progress,
        )
        if time.monotonic() > deadline:  # finished, but later than the gate was told to wait
            raise GateDeadline("100%, after the last step")
    except GateDeadline as stopped:
        raise GateError(
            "timeout",
            f"the audit did not finish within --timeout {args.timeout:g} s (stopped at "
            f"{stopped}); with --local nothing goes on after the gate: raise --timeout, audit "
            "fewer methods or images, or gate on a service",
        ) from None
    except EngineError as exc:
        raise GateError(exc.code, exc.message) from None
    finally:
        progress.close()
    return Audited(
        report=json.loads(json.dumps(result.to_dict())),
        model_sha256=inputs.model_sha256,
        dataset_sha256=hashlib.sha256(image_set_archive(inputs.images)).hexdigest(),
        skipped=tuple(inputs.images.skipped),
    )


def write_reports(
    document: dict[str, Any], result: Any, images: list[Any], out: Path, formats: list[str]
) -> list[Path]:
    """``out/report.pdf`` and / or ``out/report.html``, rendered by the functions the worker
    renders the service's reports with, from the report and its heatmaps."""
    from saliency_audit.workers.reports.heatmaps import report_pictures
    from saliency_audit.workers.reports.html import render_html
    from saliency_audit.workers.reports.pdf import render_pdf

    artifacts, pngs = report_pictures(result, images)
    with_pictures = {**document, "artifacts": artifacts}
    written = []
    for kind in formats:
        path = out / f"report.{kind}"
        if kind == "pdf":
            path.write_bytes(render_pdf(with_pictures, pngs.__getitem__))
        else:
            path.write_text(render_html(with_pictures, pngs.__getitem__), encoding="utf-8")
        written.append(path)
    return written


def _register_method_plugins(targets: list[str]) -> list[str]:
    """``--method-plugin module:callable[=name]``: import and register each explainer (code
    the person running the audit chose; the service never imports code a request names).
    Returns the registered names, in order."""
    from saliency_audit.workers.engine.methods.plugins import load_explainer, register_explainer

    names = []
    for target in targets:
        name, explainer = load_explainer(target)
        register_explainer(name, explainer, reference=target.partition("=")[0], replace=True)
        names.append(name)
    return names
