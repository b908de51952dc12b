"""Reports as plain text for a terminal: the input spec an audit uses, the methods' table,
the per-layer analysis and the verdict table.

``saliency-audit run`` prints them after a local audit and ``saliency-audit gate`` prints the
verdict table of a service's report: both read the same report document (``report.json``), so
the two commands show an audit the same way. Pure string formatting: no torch, no numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from saliency_audit.workers.engine.contract.cost import eta_seconds


def format_input_spec(
    spec: dict[str, Any], sources: Mapping[str, str], output: dict[str, Any] | None
) -> str:
    """The input spec an audit uses, each value with where it came from (graph,
    pretrained_cfg, metadata, given or assumed), and the output it explains: printed before
    anything is computed, so a wrong guess is seen before it costs an audit."""

    def src(*names: str) -> str:
        found = list(dict.fromkeys(sources.get(n, "?") for n in names))
        return f"({', '.join(found)})"

    def values(key: str) -> str:
        return "[" + ", ".join(f"{v:g}" for v in spec[key]) + "]"

    lines = [
        "input spec used (where each value came from):",
        f"  size           {spec['height']}x{spec['width']} {src('height', 'width')}",
        f"  resize         {spec.get('interpolation', 'bilinear')} {src('interpolation')}",
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


def scorecam_channels_text(params: Mapping[str, Any]) -> str:
    """Score-CAM's channel selection (``spec.params.scorecam_channels``) in words; a report
    written before the parameter existed ran every channel."""
    k = params.get("scorecam_channels")
    if k is None:
        return "every channel of the CAM layer"
    return (
        f"each image's {k} channels of largest spatial variance (Faster Score-CAM; every "
        f"channel when the layer has at most {k})"
    )


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
    if "scorecam" in report["methods"]:
        lines.append(f"Score-CAM channels: {scorecam_channels_text(spec.get('params') or {})}")
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
    images = report.get("images") or []
    if images:
        lines += ["", format_explained(images)]
    if "layers" in (report.get("tests") or {}):
        lines += ["", format_layers(report["tests"]["layers"])]
    verdicts = report.get("verdicts") or []
    if verdicts:
        lines += ["", format_verdicts(report)]
    return "\n".join(lines)


EXPLAINED_ROWS = 16  # images listed by name; the rest are counted per class


def class_label(index: int, name: str | None) -> str:
    """``3 (triangle)``, or ``3`` when the model names no classes."""
    return f"{index} ({name})" if name else str(index)


def explained_classes(images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How many images explain each class: ``[{"class": 3, "name": "triangle", "images":
    10}, ...]`` by class index (``name`` None when the model names no classes)."""
    counts: dict[int, dict[str, Any]] = {}
    for image in images:
        index = int(image["target"])
        entry = counts.setdefault(
            index, {"class": index, "name": image.get("target_name"), "images": 0}
        )
        entry["images"] += 1
    return [counts[index] for index in sorted(counts)]


def format_class_counts(images: list[dict[str, Any]]) -> str:
    """``0 (circle) x11, 1 (ring) x11``: :func:`explained_classes` on one line."""
    return ", ".join(
        f"{class_label(c['class'], c['name'])} x{c['images']}" for c in explained_classes(images)
    )


def format_images_audited(report: dict[str, Any]) -> str:
    """``64 images audited; explained classes: 0 (circle) x11, ...``: what a verdict was
    decided on (the release gate prints it above the verdict table)."""
    images = report.get("images") or []
    return f"{len(images)} images audited; explained classes: {format_class_counts(images)}"


def few_images_note(report: dict[str, Any]) -> str | None:
    """The warning for an audit of fewer images than the policy's ``recommended_images``
    (None when there are enough, or the policy recommends no number)."""
    recommended = ((report.get("policy") or {}).get("recommended_images") or {}).get("images")
    audited = len(report.get("images") or [])
    if isinstance(recommended, int) and 0 < audited < recommended:
        return (
            f"note: {audited} images audited; the policy was calibrated to decide from "
            f"{recommended} images (docs/policy.md), so expect more INCONCLUSIVE verdicts"
        )
    return None


def format_explained(images: list[dict[str, Any]]) -> str:
    """The class each map explains (the target: index and name when known) per image, with
    the model's prediction and the target's probability, then how many images explain each
    class: a map explains one class, and which one is the first thing to check."""
    width = max(12, *(len(str(i.get("name"))) + 2 for i in images[:EXPLAINED_ROWS]))
    header = f"{'image':<{width}}{'explained class':<24}{'predicted':>10}{'p(class)':>10}"
    lines = ["explained class per image (the maps explain this class's score)", header]
    lines.append("-" * len(header))
    for image in images[:EXPLAINED_ROWS]:
        target = class_label(int(image["target"]), image.get("target_name"))
        probability = image.get("probability")
        lines.append(
            f"{image.get('name')!s:<{width}}{target:<24}{image.get('predicted')!s:>10}"
            f"{'-' if probability is None else format(probability, '.3f'):>10}"
        )
    if len(images) > EXPLAINED_ROWS:
        lines.append(f"... and {len(images) - EXPLAINED_ROWS} more images")
    lines.append("explained classes: " + format_class_counts(images))
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
    adaptive = report.get("adaptive")  # an adaptive audit decides on a confidence sequence
    interval = "95% confidence sequence" if adaptive else "95% CI"
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
                f"  {test}: {rule['measure']}{scaled} {where}, PASS when the {interval} is "
                f"{rule['pass_when']} {rule['threshold']}{fails}"
            )
    if rules:
        lines += ["numbers are the deciding score's mean; rules:", *rules]
    lines += format_stage_plans(report)
    if adaptive:
        lines.append(
            f"adaptive: {adaptive['reason']}; rounds of {adaptive['round_images']} images in a "
            "seeded random order, verdicts on an anytime-valid 95% confidence sequence"
        )
    decided = adaptive is not None and adaptive["stopped"] == "decided"
    few = few_images_note(report)
    if few and not decided:
        lines.append(few)
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


def format_stage_plans(report: dict[str, Any]) -> list[str]:
    """One line per model randomization test that skipped stages: which got maps, and why."""
    lines = []
    for name, test in (report.get("tests") or {}).items():
        plan = test.get("stage_plan")
        if not plan or len(plan["computed"]) == plan["total"]:
            continue
        computed = ", ".join(str(i) for i in plan["computed"])
        lines.append(f"  {name}: maps at stages {computed} of {plan['total']}: {plan['why']}")
    if lines:
        lines.insert(0, "stages with maps (--stages all for every stage):")
    return lines


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressClock:
    """Elapsed time and an ETA for progress lines (``saliency-audit run`` and ``gate``).

    The ETA extrapolates the rate observed since the first progress reading, so attaching to
    an audit already half done does not count the first half as if it took no time."""

    def __init__(self, now: float, predicted_s: float | None = None) -> None:
        self.started = now
        self.predicted_s = predicted_s  # the cost model's prediction of the whole audit
        self.first: tuple[float, float] | None = None  # (time, fraction) of the first reading

    def text(self, fraction: float, now: float, eta_s: float | None = None) -> str:
        """``elapsed 0:12, ETA 0:30`` (``ETA -`` until there is a rate to extrapolate). With a
        prediction (an audit this process runs from its start), the ETA blends it with the
        observed rate (contract ``eta_seconds``); ``eta_s`` (the service's, for an audit it
        runs) is shown as given."""
        if self.first is None:
            self.first = (now, fraction)
        since, start = self.first
        eta = "-"
        if fraction >= 1.0:
            eta = "0:00"
        elif eta_s is not None:  # a service's ETA for its audit
            eta = format_duration(eta_s)
        elif self.predicted_s is not None:
            left = eta_seconds(self.predicted_s, now - self.started, fraction)
            eta = "-" if left is None else format_duration(left)
        elif fraction > start and now > since:
            eta = format_duration((now - since) * (1.0 - fraction) / (fraction - start))
        return f"elapsed {format_duration(now - self.started)}, ETA {eta}"
