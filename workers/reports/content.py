"""What an audit report says, as a plain structure both renderers lay out.

:func:`build_content` turns a ``report.json`` document into a :class:`ReportContent`: a cover
(the model, data and run, and the verdict table method x test) and a list of sections made of
a few kinds of blocks (paragraphs, tables, code, similarity curves, picture grids). The PDF
(:mod:`.pdf`) and HTML (:mod:`.html`) renderers only lay these blocks out, so both documents
say the same things in the same order; nothing here knows about pages or markup.

What the sections show follows the papers the tests come from: per sanity test the similarity
of each method's maps to the trained model's maps against the stage, with 95% bootstrap bands
(Adebayo et al. 2018, Figure 4), and the maps themselves, methods down and stages across
(their Figure 2); for the ``layers`` analysis the maps at each layer drawn over the image and
the faithfulness scores per layer (Lee et al. 2021, Relevance-CAM, section 4). A piece the
report does not have (a test that did not run, no pictures, no layers analysis) becomes a
sentence saying so. Pure: no I/O, no torch; pictures are referenced by sha256.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .text import scorecam_channels_text

# ---------------------------------------------------------------------------------- blocks

Tone = Literal["pass", "fail", "inconclusive", "better", "muted", "plain"]
"""How a table cell is coloured: a verdict, a score that beats the random control, or a
missing value."""

VERDICT_TONES: dict[str, Tone] = {"PASS": "pass", "FAIL": "fail", "INCONCLUSIVE": "inconclusive"}

# cell backgrounds, shared so that the PDF and the HTML colour a verdict alike
TONE_COLOURS: dict[Tone, str] = {
    "pass": "#b7e1bd",  # green
    "fail": "#f4b4ae",  # red
    "inconclusive": "#fbd89a",  # amber
    "better": "#dcefdc",
    "muted": "#f2f2f2",
}
HEADER_COLOUR = "#e4e8ef"

# the ``test`` and ``stage`` the service files the trained model's own heatmaps under
MODEL_TEST = "model"
TRAINED_STAGE = "trained"
LAYERS_TEST = "layers"
CONTROL_RANDOM = "control_random"

GRID_IMAGES = 2  # images per heatmap grid (the paper's Figure 2 shows a few inputs)
MISSING = "–"  # a value the report does not have


@dataclass(frozen=True)
class Paragraph:
    """Running text; ``kind`` "missing" marks a sentence that stands in for absent content."""

    text: str
    kind: Literal["body", "note", "missing"] = "body"


@dataclass(frozen=True)
class Cell:
    """A table cell: its main text, an optional second (smaller) line and a tone."""

    text: str
    detail: str | None = None
    tone: Tone = "plain"


@dataclass(frozen=True)
class Table:
    """Rows of cells under a header (an all-empty header: a table of facts, no header row).
    ``column_weights`` share the page width between the columns where a renderer fixes it
    (missing weights are 1)."""

    header: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    caption: str | None = None
    column_weights: tuple[float, ...] = ()
    title: str | None = None
    small: bool = False


@dataclass(frozen=True)
class Code:
    """Verbatim text (JSON), kept whole so it can be copied back into a run."""

    text: str
    caption: str | None = None


@dataclass(frozen=True)
class Definitions:
    """Terms and their definitions."""

    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Series:
    """One method's curve on one measure: mean and 95% interval per stage (None = undefined)."""

    method: str
    is_control: bool
    mean: tuple[float | None, ...]
    ci_low: tuple[float | None, ...]
    ci_high: tuple[float | None, ...]


@dataclass(frozen=True)
class Panel:
    """One measure's curves; ``threshold`` is the policy's line when this measure decides."""

    measure: str
    series: tuple[Series, ...]
    threshold: float | None = None


@dataclass(frozen=True)
class CurveFigure:
    """Similarity against stage, one panel per measure (Adebayo et al. 2018, Figure 4).
    ``key`` is unique within a report (figure ids and the SVG hash salt derive from it)."""

    key: str
    stages: tuple[str, ...]
    panels: tuple[Panel, ...]
    caption: str
    x_label: str


@dataclass(frozen=True)
class Picture:
    sha256: str
    alt: str


@dataclass(frozen=True)
class PictureGrid:
    """Maps of one image: rows (methods) x columns (stages or layers); None = no picture."""

    title: str
    row_labels: tuple[str, ...]
    column_labels: tuple[str, ...]
    cells: tuple[tuple[Picture | None, ...], ...]
    caption: str


Block = Paragraph | Table | Code | Definitions | CurveFigure | PictureGrid


@dataclass(frozen=True)
class Section:
    """A titled run of blocks; ``level`` 1 is a chapter, 2 a subsection."""

    anchor: str
    title: str
    blocks: tuple[Block, ...]
    level: int = 1


@dataclass(frozen=True)
class ReportContent:
    title: str
    subtitle: str
    cover: tuple[Block, ...]
    sections: tuple[Section, ...]

    def blocks(self) -> Iterator[Block]:
        yield from self.cover
        for section in self.sections:
            yield from section.blocks

    def pictures(self) -> list[Picture]:
        """Every picture the report shows, in reading order (a picture shown twice counts
        twice)."""
        return [
            cell
            for block in self.blocks()
            if isinstance(block, PictureGrid)
            for row in block.cells
            for cell in row
            if cell is not None
        ]

    def figures(self) -> list[CurveFigure]:
        return [block for block in self.blocks() if isinstance(block, CurveFigure)]


# ------------------------------------------------------------------------------ definitions

MEASURE_TITLES: dict[str, str] = {
    "spearman_abs": "Spearman rank correlation (ABS)",
    "spearman": "Spearman rank correlation (signed)",
    "ssim": "SSIM",
    "hog_pearson": "Pearson correlation of HOG",
    "hog_spearman": "Spearman rank correlation of HOG",
    "entropy_rise": "relative entropy rise",
}

# The engine's similarity module needs torch, which this package must not import; these
# sentences state the parameters it uses (tests/reports checks them against its constants).
MEASURE_DEFINITIONS: dict[str, str] = {
    "spearman_abs": (
        "Spearman rank correlation over pixels of the absolute maps |a| and |b| (average ranks "
        "for ties, as scipy.stats.spearmanr): do the same pixels matter, whatever their sign? "
        "Adebayo et al. 2018, 'rank correlation (ABS)'. Undefined for a constant map."
    ),
    "spearman": (
        "Spearman rank correlation over pixels of the signed maps (Adebayo et al. 2018, "
        "'diverging'); a map against its negation scores -1. Undefined for a constant map."
    ),
    "ssim": (
        "Mean structural similarity (Wang et al. 2004) of the two maps, each min-max "
        "normalized to [0, 1], as skimage.metrics.structural_similarity with data_range 1: a "
        "7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance, averaged over the windows "
        "that lie inside the map."
    ),
    "hog_pearson": (
        "Pearson correlation of the histograms of oriented gradients (Dalal and Triggs 2005) "
        "of the [0, 1]-normalized maps, as skimage.feature.hog with 9 unsigned orientation "
        "bins, 16x16-pixel cells, 3x3-cell blocks and L2-Hys block normalization; needs maps "
        "of at least 48 pixels a side. Undefined for a constant map."
    ),
    "hog_spearman": (
        "Spearman rank correlation of the same HOG features: what the sanity-check notebooks "
        "of Adebayo et al. computed ('Rank Correlation of HOG')."
    ),
    "entropy_rise": (
        "eMPRT (Hedstrom et al. 2023): (H_random - H_trained) / H_trained per image, H the "
        "Shannon entropy of the histogram of the map's values in equal-width bins over its "
        "[min, max] (Quantus discrete_entropy); a map that depends on the model grows more "
        "complex when the model is randomized."
    ),
}

COMMON_MEASURE_NOTE = (
    "Every similarity compares the map of a changed model (or class) with the trained model's "
    "map of the same image and target, channels reduced first (summed, as in the paper, "
    "unless the spec's map_reduction says otherwise). Each score is reduced over images to "
    "a mean with a seeded bootstrap 95% interval and n, the images where it is defined."
)

LAYER_METRIC_TITLES: dict[str, str] = {
    "average_drop": "Average Drop % (lower is better)",
    "average_increase": "Average Increase % (higher is better)",
    "deletion_auc": "Deletion AUC (lower is better)",
    "insertion_auc": "Insertion AUC (higher is better)",
    "iou": "Localization IoU (higher is better)",
    "pointing_game": "Pointing game hits (higher is better)",
}


# ---------------------------------------------------------------------------------- helpers


def number(value: Any, digits: int = 3) -> str:
    """A score for reading: ``digits`` decimals, or a dash where the report has none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return f"{float(value):.{digits}f}"


def significant(value: Any) -> str:
    """A metric on any scale (a percentage, an AUC in [0, 1]) with 3 significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return f"{float(value):.3g}"


def interval(low: Any, high: Any, fmt: Any = number) -> str:
    if low is None or high is None:
        return "[no interval]"
    return f"[{fmt(low)}, {fmt(high)}]"


def anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _plain(value: Any) -> str:
    """A details or spec value as one line of text."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _stage_text(stage: Any) -> str:
    if isinstance(stage, dict):
        return ", ".join(f"{k} {v}" for k, v in stage.items())
    return str(stage).replace("_", " ")


def stage_plan_sentence(plan: Mapping[str, Any]) -> str:
    """Which stages of a test got maps, and why (the report's ``stage_plan``), in words."""
    computed = list(plan.get("computed") or [])
    total = plan.get("total")
    if len(computed) == total:
        which = f"Maps at every stage ({total})"
    else:
        which = f"Maps at {len(computed)} of {total} stages ({', '.join(map(str, computed))})"
    return f"{which}: {plan.get('why')}."


def rule_sentence(test: str, rule: Mapping[str, Any]) -> str:
    """The policy's rule for one test in words (the CLI's rule line, spelled out)."""
    interval_word = (
        "the whole 95% interval lies"
        if rule.get("interval", "beyond") == "beyond"
        else "the mean lies"
    )
    stage = rule.get("stage")
    scaled = " scaled by the controls" if rule.get("scale") == "controls" else ""
    if isinstance(stage, dict) and "area" in stage:
        start, end = stage["area"]
        where = (
            f"{rule.get('measure')}{scaled}, averaged per image over the randomization curve "
            f"from {start:.0%} to {end:.0%} of the layers randomized"
        )
    else:
        where = f"{rule.get('measure')}{scaled} at the {_stage_text(stage)} stage"
    fail = rule.get("fail_threshold", rule.get("threshold"))
    if fail != rule.get("threshold"):
        other = "above" if rule.get("pass_when") == "below" else "below"
        fail_text = (
            f"FAIL when it lies at or {other} {fail}, INCONCLUSIVE when it reaches between the "
            "two thresholds"
        )
    else:
        fail_text = "FAIL when it lies on the other side, INCONCLUSIVE when it straddles it"
    return (
        f"{test}: decided by {where}; PASS when {interval_word} {rule.get('pass_when')} "
        f"{rule.get('threshold')}, {fail_text} or a control gets the wrong verdict."
    )


class _Report:
    """Read access to the parts of ``report.json`` that several sections use."""

    def __init__(self, report: Mapping[str, Any]) -> None:
        self.report = report
        self.spec: Mapping[str, Any] = report.get("spec") or {}
        self.model: Mapping[str, Any] = report.get("model") or {}
        self.policy: Mapping[str, Any] = report.get("policy") or {}
        self.tests: Mapping[str, Any] = report.get("tests") or {}
        self.verdicts: list[Mapping[str, Any]] = list(report.get("verdicts") or [])
        self.methods: Mapping[str, Any] = report.get("methods") or {}
        self.images: list[Mapping[str, Any]] = list(report.get("images") or [])
        self.artifacts: list[Mapping[str, Any]] = list(report.get("artifacts") or [])
        self._pictures: dict[tuple[str, ...], str] = {}
        for a in self.artifacts:
            key = tuple(str(a.get(k)) for k in ("kind", "test", "stage", "method", "image"))
            # the first listing wins: the service lists each picture once per key anyway
            self._pictures.setdefault(key, str(a["sha256"]))

    def is_control(self, method: str) -> bool:
        info = self.methods.get(method) or {}
        return bool(info.get("is_control", method.startswith("control_")))

    def picture(self, kind: str, test: str, stage: str, method: str, image: str) -> str | None:
        return self._pictures.get((kind, test, stage, method, image))

    def images_with(self, kind: str, test: str) -> list[str]:
        """Image names (in the audit's order) that have pictures of ``kind`` for ``test``."""
        have = {
            a.get("image")
            for a in self.artifacts
            if a.get("kind") == kind and a.get("test") == test
        }
        return [str(i["name"]) for i in self.images if i.get("name") in have]

    def image_caption(self, name: str) -> str:
        for record in self.images:
            if record.get("name") == name:
                target = record.get("target_name") or record.get("target")
                return f"{name} (target class {target}, p = {number(record.get('probability'))})"
        return name

    def method_order(self) -> list[str]:
        """Methods in the spec's order, then any others the report mentions."""
        names = list(self.spec.get("methods") or [])
        names += [m for m in self.methods if m not in names]
        names += [v["method"] for v in self.verdicts if v["method"] not in names]
        return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------ cover


def _cover(r: _Report) -> tuple[Block, ...]:
    model, spec, env = r.model, r.spec, r.report.get("environment") or {}
    rows: list[tuple[str, str]] = [
        ("model sha256", str(model.get("sha256", MISSING))),
        (
            "model",
            ", ".join(
                part
                for part in (
                    f"source {model.get('source', MISSING)}",
                    f"architecture {model['architecture']}" if model.get("architecture") else "",
                    f"opset {model['opset']}" if model.get("opset") else "",
                    f"{model.get('num_classes', MISSING)} classes",
                )
                if part
            ),
        ),
    ]
    input_spec = model.get("input_spec") or {}
    if input_spec:
        sources = model.get("input_spec_sources") or {}

        def said(field: str) -> str:  # where the value came from: graph, metadata, given...
            return f" ({sources[field]})" if field in sources else ""

        rows.append(
            (
                "input",
                f"{input_spec.get('channels')} x {input_spec.get('height')} x "
                f"{input_spec.get('width')} ({input_spec.get('layout')}){said('height')}, "
                f"resized {input_spec.get('interpolation', 'bilinear')}"
                f"{said('interpolation')}, "
                f"{input_spec.get('channel_order', 'RGB')}{said('channel_order')}, values "
                f"{input_spec.get('value_range')}{said('value_range')}, mean "
                f"{input_spec.get('mean')}{said('mean')}, std {input_spec.get('std')}"
                f"{said('std')}",
            )
        )
        output = model.get("output") or {}
        if output.get("head_removed"):
            rows.append(
                (
                    "output",
                    f"{output.get('name')}: its {output.get('head_removed')} head is left out, "
                    "saliency explains the pre-softmax scores",
                )
            )
    dataset = r.report.get("dataset")
    if dataset:
        rows.append(
            (
                "dataset",
                f"{dataset.get('name') or dataset.get('id')}: {dataset.get('n_images')} images, "
                f"sha256 {dataset.get('sha256')}",
            )
        )
    rows.append(("images audited", str(len(r.images))))
    if r.report.get("audit_id"):
        rows.append(("audit", str(r.report["audit_id"])))
    # report.json carries no timestamp (it is a pure function of the run), so neither can
    # the documents rendered from it
    rows.append(("date", str(r.report.get("created_at") or "not recorded in report.json")))
    rows += [
        ("seed", str(spec.get("seed", MISSING))),
        ("device", f"{spec.get('device', MISSING)} (ran on {env.get('device', MISSING)})"),
        ("tests", ", ".join(spec.get("tests") or []) or "none"),
        ("CAM layer", str(spec.get("resolved_layer") or spec.get("layer") or MISSING)),
    ]
    if "scorecam" in (spec.get("methods") or ()):
        rows.append(("Score-CAM channels", scorecam_channels_text(spec.get("params") or {})))
    fidelity = r.report.get("fidelity")
    if fidelity:
        rows.append(
            (
                "ONNX fidelity",
                f"max |logit difference| {significant(fidelity.get('max_abs_diff'))} (tolerance "
                f"{fidelity.get('atol')}), argmax agreement {fidelity.get('argmax_agreement')} "
                f"on {fidelity.get('n_images')} images: "
                f"{'passed' if fidelity.get('passed', True) else 'FAILED'}",
            )
        )
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("device", "device_name"))
    if versions:
        rows.append(("versions", versions))
    facts = Table(
        header=("", ""),
        rows=tuple((Cell(k), Cell(v)) for k, v in rows),
        column_weights=(1.0, 3.3),
        small=True,
    )
    return (facts, *_verdict_blocks(r))


def _verdict_blocks(r: _Report) -> list[Block]:
    if not r.verdicts:
        return [
            Paragraph(
                "No verdicts: this audit ran no sanity check (the layers analysis decides no "
                "verdict).",
                "missing",
            )
        ]
    tests = list(dict.fromkeys(v["test"] for v in r.verdicts))
    methods = [m for m in r.method_order() if any(v["method"] == m for v in r.verdicts)]
    by_key = {(v["method"], v["test"]): v for v in r.verdicts}
    header = ["method"]
    for test in tests:
        first = next(v for v in r.verdicts if v["test"] == test)
        header.append(f"{test} ({first.get('measure')} at {first.get('stage')})")
    rows = []
    for method in methods:
        cells = [Cell(method + (" (control)" if r.is_control(method) else ""))]
        for test in tests:
            v = by_key.get((method, test))
            if v is None:
                cells.append(Cell(MISSING, tone="muted"))
                continue
            cells.append(
                Cell(
                    v["verdict"],
                    detail=f"{number(v.get('mean'))} {interval(v.get('ci_low'), v.get('ci_high'))}",
                    tone=VERDICT_TONES.get(v["verdict"], "plain"),
                )
            )
        rows.append(tuple(cells))
    policy = r.policy
    adaptive = r.report.get("adaptive")
    interval_words = (
        "its anytime-valid 95% confidence sequence (an adaptive audit: "
        f"{adaptive.get('reason', MISSING)})"
        if adaptive
        else "its 95% bootstrap interval over images"
    )
    blocks: list[Block] = [
        Table(
            header=tuple(header),
            rows=tuple(rows),
            caption=(
                f"Verdicts (policy {policy.get('name', MISSING)} {policy.get('version', '')}). "
                f"Each cell: the verdict, then the deciding score's mean and {interval_words}. "
                "PASS: the maps changed when the model (or data, or class) did; FAIL: they "
                "did not."
            ),
            column_weights=(1.1,),
        )
    ]
    inconclusive = [v for v in r.verdicts if v["verdict"] == "INCONCLUSIVE"]
    if inconclusive:
        blocks.append(
            Definitions(tuple((f"{v['method']}, {v['test']}", v["reason"]) for v in inconclusive))
        )
        blocks.insert(1, Paragraph("Why a verdict is INCONCLUSIVE:", "note"))
    else:
        blocks.append(Paragraph("No verdict is INCONCLUSIVE.", "note"))
    return blocks


# ----------------------------------------------------------------------------- sanity tests


def _test_section(r: _Report, name: str, test: Mapping[str, Any], number_: int) -> Section:
    title = f"{number_}. Sanity check: {name}"
    blocks: list[Block] = [
        Paragraph(str(test.get("description", ""))),
        Paragraph(f"Reference: {test.get('reference', MISSING)}", "note"),
    ]
    rule = (r.policy.get("tests") or {}).get(name)
    if rule:
        blocks.append(Paragraph("Policy rule: " + rule_sentence(name, rule)))
        if rule.get("why"):
            blocks.append(Paragraph(f"Why this rule: {rule['why']}", "note"))
    else:
        blocks.append(Paragraph(f"The policy has no rule for {name}.", "missing"))
    if test.get("status") != "ok":
        blocks.append(Paragraph(f"Not run: {test.get('reason') or 'no reason given'}.", "missing"))
        return Section(anchor(title), title, tuple(blocks))

    stages = sorted(test.get("stages") or [], key=lambda s: s["index"])
    plan = test.get("stage_plan")
    computed = set(plan["computed"]) if plan else {s["index"] for s in stages}
    # the curves and the grids show the stages that got maps, never a point no one measured
    stage_names = [str(s["name"]) for s in stages if s["index"] in computed]
    if plan:
        blocks.append(Paragraph(stage_plan_sentence(plan)))
    if stages:
        blocks.append(
            Table(
                header=("stage", "unit", "maps", "randomized at this stage"),
                rows=tuple(
                    (
                        Cell(str(s["index"])),
                        Cell(str(s["name"])),
                        Cell("computed")
                        if s["index"] in computed
                        else Cell("skipped", tone="muted"),
                        Cell(", ".join(s.get("randomized") or []) or MISSING),
                    )
                    for s in stages
                ),
                caption=f"Stages of {name}, in the order the test ran them"
                + (f" ({test['granularity']} granularity)" if test.get("granularity") else "")
                + "; a skipped stage was randomized on the way to the next one, without maps.",
                column_weights=(0.35, 1.0, 0.6, 4.0),
                small=True,
            )
        )
    figure = _curves(r, name, test, stage_names, rule)
    blocks.append(
        figure
        if figure is not None
        else Paragraph(f"{name} recorded no scores, so there are no curves.", "missing")
    )
    details = test.get("details") or {}
    if details:
        blocks.append(
            Table(
                header=("detail", "value"),
                rows=tuple((Cell(k), Cell(_plain(v))) for k, v in details.items()),
                caption=f"How {name} was run.",
                column_weights=(1.0, 3.3),
                small=True,
            )
        )
    # the grids last: each fills a page, so the text above stays beside its figure
    blocks += _stage_grids(r, name, stage_names)
    return Section(anchor(title), title, tuple(blocks))


def _curves(
    r: _Report,
    name: str,
    test: Mapping[str, Any],
    stage_names: Sequence[str],
    rule: Mapping[str, Any] | None,
) -> CurveFigure | None:
    scores = test.get("scores") or []
    if not scores:
        return None
    if not stage_names:
        stage_names = list(
            dict.fromkeys(s["stage"] for s in sorted(scores, key=lambda s: s["stage_index"]))
        )
    position = {stage: i for i, stage in enumerate(stage_names)}
    measures = list(dict.fromkeys(s["measure"] for s in scores))
    methods = [m for m in r.method_order() if any(s["method"] == m for s in scores)]
    table: dict[tuple[str, str], list[Mapping[str, Any] | None]] = {}
    for s in scores:
        row = table.setdefault((s["method"], s["measure"]), [None] * len(stage_names))
        if s["stage"] in position:
            row[position[s["stage"]]] = s
    panels = []
    for measure in measures:
        series = []
        for method in methods:
            points = table.get((method, measure))
            if points is None:
                continue
            series.append(
                Series(
                    method=method,
                    is_control=r.is_control(method),
                    mean=tuple(p.get("mean") if p else None for p in points),
                    ci_low=tuple(p.get("ci_low") if p else None for p in points),
                    ci_high=tuple(p.get("ci_high") if p else None for p in points),
                )
            )
        threshold = rule.get("threshold") if rule and rule.get("measure") == measure else None
        panels.append(Panel(measure=measure, series=tuple(series), threshold=threshold))
    return CurveFigure(
        key=f"curves-{anchor(name)}",
        stages=tuple(stage_names),
        panels=tuple(panels),
        caption=(
            f"{name}: similarity of each method's maps to the trained model's maps at each "
            "stage that got maps, left to right in the order the test ran them (mean over "
            "images, shaded: "
            "95% bootstrap interval; dashed: controls; "
            "dotted: the policy's threshold on the deciding measure). Compare Adebayo et al. "
            "2018, Figure 4."
        ),
        x_label="stage",
    )


def _stage_grids(r: _Report, name: str, stage_names: Sequence[str]) -> list[Block]:
    images = r.images_with("heatmap_png", name)[:GRID_IMAGES]
    if not images:
        return [
            Paragraph(
                f"No heatmaps of {name} in this report (report.json from the command line "
                "lists no pictures; the service renders them).",
                "missing",
            )
        ]
    columns = [TRAINED_STAGE, *stage_names]
    blocks: list[Block] = []
    for image in images:
        rows, cells = [], []
        for method in r.method_order():
            row: list[Picture | None] = []
            for column in columns:
                test, stage = (
                    (MODEL_TEST, TRAINED_STAGE) if column == TRAINED_STAGE else (name, column)
                )
                sha = r.picture("heatmap_png", test, stage, method, image)
                row.append(Picture(sha, f"{method} at {column}, {image}") if sha else None)
            if any(row):
                rows.append(method)
                cells.append(tuple(row))
        if rows:
            blocks.append(
                PictureGrid(
                    title=f"{name}: maps of {r.image_caption(image)}",
                    row_labels=tuple(rows),
                    column_labels=tuple(columns),
                    cells=tuple(cells),
                    caption=(
                        "Rows: methods; columns: the trained model, then each stage of the "
                        "test (compare Adebayo et al. 2018, Figure 2). Each map is scaled by "
                        "its own largest |value|: blue-white-red for signed maps, "
                        "black-red-yellow for non-negative ones."
                    ),
                )
            )
    return blocks


# --------------------------------------------------------------------------- layers analysis


def _layers_section(r: _Report, number_: int) -> Section:
    title = f"{number_}. Per-layer analysis (Relevance-CAM)"
    test = r.tests.get(LAYERS_TEST)
    if test is None:
        return Section(
            anchor(title),
            title,
            (
                Paragraph(
                    "The layers analysis was not run for this audit (run it with --tests "
                    'layers, or "layers" in the audit\'s tests).',
                    "missing",
                ),
            ),
        )
    blocks: list[Block] = [
        Paragraph(str(test.get("description", ""))),
        Paragraph(f"Reference: {test.get('reference', MISSING)}", "note"),
    ]
    if test.get("status") != "ok":
        blocks.append(Paragraph(f"Not run: {test.get('reason') or 'no reason given'}.", "missing"))
        return Section(anchor(title), title, tuple(blocks))
    details = test.get("details") or {}
    layers = [row["label"] for row in details.get("layers") or []]
    modules = {row["label"]: row.get("module") for row in details.get("layers") or []}
    methods = list(details.get("methods") or [])
    blocks.append(
        Paragraph(
            "Layers (shallow to deep): "
            + ", ".join(
                label
                if modules.get(label) in (None, label)
                else f"{label} (module {modules[label]})"
                for label in layers
            )
            + f". Localization: {details.get('localization', MISSING)}."
        )
    )
    images = r.images_with("overlay_png", LAYERS_TEST)[:GRID_IMAGES]
    if not images:
        blocks.append(
            Paragraph(
                "No per-layer overlays in this report (report.json from the command line lists "
                "no pictures; the service renders them).",
                "missing",
            )
        )
    for image in images:
        rows, cells = [], []
        for method in methods:
            row = []
            for layer in layers:
                sha = r.picture("overlay_png", LAYERS_TEST, layer, method, image)
                row.append(Picture(sha, f"{method} at {layer}, {image}") if sha else None)
            if any(row):
                rows.append(method)
                cells.append(tuple(row))
        if rows:
            blocks.append(
                PictureGrid(
                    title=f"Per-layer maps over {r.image_caption(image)}",
                    row_labels=tuple(rows),
                    column_labels=tuple(layers),
                    cells=tuple(cells),
                    caption=(
                        "Rows: methods; columns: the layer each map is taken at, shallow to "
                        "deep (compare Lee et al. 2021's layer-by-layer figures). The map is "
                        "blended over the image, more opaque where |value| is larger."
                    ),
                )
            )
    not_applicable = details.get("not_applicable") or {}
    if not_applicable:
        blocks.append(
            Definitions(
                tuple(
                    (f"{method} at {layer}", reason)
                    for layer, by_method in not_applicable.items()
                    for method, reason in by_method.items()
                )
            )
        )
    by_key = {(s["stage"], s["method"], s["measure"]): s for s in test.get("scores") or []}
    beats = details.get("beats_random") or {}
    metrics = list(details.get("metrics") or [])
    if not metrics:
        blocks.append(Paragraph("The analysis recorded no metrics.", "missing"))
    for metric in metrics:
        rows_: list[tuple[Cell, ...]] = []
        for layer in layers:
            cells_ = [Cell(layer)]
            for method in methods:
                s = by_key.get((layer, method, metric))
                if s is None or s.get("mean") is None:
                    cells_.append(Cell(MISSING, tone="muted"))
                    continue
                better = bool((beats.get(layer) or {}).get(method, {}).get(metric))
                cells_.append(
                    Cell(
                        significant(s["mean"]) + (" *" if better else ""),
                        detail=interval(s.get("ci_low"), s.get("ci_high"), significant),
                        tone="better" if better else "plain",
                    )
                )
            rows_.append(tuple(cells_))
        blocks.append(
            Table(
                header=("layer", *methods),
                rows=tuple(rows_),
                title=LAYER_METRIC_TITLES.get(metric, metric),
                caption=(
                    f"Mean over images [95% bootstrap interval]; * and shading: beats "
                    f"{CONTROL_RANDOM} at that layer."
                ),
                column_weights=(0.9,),
                small=True,
            )
        )
    return Section(anchor(title), title, tuple(blocks))


# ---------------------------------------------------------------------------- other parts


def _methods_section(r: _Report, number_: int) -> Section:
    title = f"{number_}. Methods"
    rows = []
    for name in r.method_order():
        m = r.methods.get(name)
        if m is None:
            continue
        status = m.get("status", MISSING)
        if m.get("reason"):
            status += f": {m['reason']}"
        sobel = (m.get("similarity_to_sobel") or {}).get("ssim") or {}
        rows.append(
            (
                Cell(name + (" (control)" if m.get("is_control") else "")),
                Cell(str(m.get("reference", MISSING))),
                Cell(str(m.get("layer") or MISSING)),
                Cell(status, tone="plain" if m.get("status") == "ok" else "muted"),
                Cell(number(sobel.get("mean"))),
            )
        )
    if not rows:
        return Section(
            anchor(title), title, (Paragraph("The report lists no methods.", "missing"),)
        )
    return Section(
        anchor(title),
        title,
        (
            Table(
                header=("method", "reference", "layer", "status", "SSIM to Sobel"),
                rows=tuple(rows),
                caption=(
                    "Every method audited. SSIM to Sobel: mean similarity of the trained "
                    "model's map to the edge-detector control's map (Adebayo et al. 2018: "
                    "methods that act like edge detectors score high)."
                ),
                column_weights=(1.2, 2.4, 1.1, 1.0, 0.8),
                small=True,
            ),
        ),
    )


def _appendix(r: _Report) -> list[Section]:
    sections: list[Section] = []
    requested = list(r.spec.get("measures") or [])
    scored = {
        s.get("measure")
        for name, t in r.tests.items()
        if name != LAYERS_TEST
        for s in t.get("scores") or []
    }
    used = [m for m in [*requested, *sorted(m for m in scored if m)] if m in scored]
    used = list(dict.fromkeys(used))
    blocks: list[Block] = [Paragraph(COMMON_MEASURE_NOTE)]
    if used:
        blocks.append(
            Definitions(
                tuple(
                    (f"{m}: {MEASURE_TITLES.get(m, m)}", MEASURE_DEFINITIONS.get(m, m))
                    for m in used
                )
            )
        )
    else:
        blocks.append(Paragraph("No similarity was scored in this audit.", "missing"))
    unscored = [m for m in requested if m not in scored]
    if unscored and scored:
        blocks.append(
            Paragraph(
                f"Requested but not scored: {', '.join(unscored)} (a measure the map size does "
                "not allow is left out; HOG needs maps of at least 48 pixels a side).",
                "note",
            )
        )
    sections.append(Section("appendix-measures", "A.1 Similarity measures", tuple(blocks), level=2))
    layers = r.tests.get(LAYERS_TEST) or {}
    definitions = (layers.get("details") or {}).get("definitions") or {}
    sections.append(
        Section(
            "appendix-metrics",
            "A.2 Faithfulness and localization metrics",
            (Definitions(tuple((k, str(v)) for k, v in definitions.items())),)
            if definitions
            else (Paragraph("No layers analysis, so no faithfulness metrics.", "missing"),),
            level=2,
        )
    )
    sections.append(_policy_section(r))
    sections.append(_reproduction_section(r))
    return sections


def _policy_section(r: _Report) -> Section:
    policy = r.policy
    if not policy:
        return Section(
            "appendix-policy",
            "A.3 Verdict policy",
            (Paragraph("The report carries no policy document.", "missing"),),
            level=2,
        )
    rules = policy.get("tests") or {}
    controls = policy.get("controls") or {}
    blocks: list[Block] = [
        Paragraph(
            f'Policy "{policy.get("name", MISSING)}", version {policy.get("version", MISSING)} '
            f"(format {policy.get('format', MISSING)})."
        ),
        Paragraph(str(policy.get("description", ""))),
        Table(
            header=("test", "measure", "stage", "threshold", "PASS when", "interval", "controls"),
            rows=tuple(
                (
                    Cell(test),
                    Cell(str(rule.get("measure"))),
                    Cell(_stage_text(rule.get("stage"))),
                    Cell(str(rule.get("threshold"))),
                    Cell(str(rule.get("pass_when"))),
                    Cell(str(rule.get("interval", "beyond"))),
                    Cell(", ".join(f"{c} {v}" for c, v in (controls.get(test) or {}).items())),
                )
                for test, rule in rules.items()
            ),
            caption="Rules per test, and the verdict each control must get for the test to "
            "decide (otherwise every verdict of that test is INCONCLUSIVE).",
            column_weights=(1.5, 1.25, 1.1, 0.8, 0.7, 0.7, 2.2),
            small=True,
        ),
        Definitions(tuple((test, str(rule.get("why", ""))) for test, rule in rules.items())),
    ]
    return Section("appendix-policy", "A.3 Verdict policy", tuple(blocks), level=2)


def _reproduction_section(r: _Report) -> Section:
    report = r.report
    env = report.get("environment") or {}
    blocks: list[Block] = [
        Paragraph(
            "Same model, images, spec, seed and device give the same numbers. The model "
            f"audited has sha256 {r.model.get('sha256', MISSING)}"
            + (
                f"; the images are dataset {report['dataset'].get('sha256')}"
                if report.get("dataset")
                else ""
            )
            + ". The full spec of this run:"
        ),
        Code(json.dumps(r.spec, indent=2, sort_keys=True, default=str), caption="spec"),
        Table(
            header=("package", "version"),
            rows=tuple((Cell(k), Cell(str(v))) for k, v in env.items()),
            caption="Environment.",
            column_weights=(1.0, 1.0),
            small=True,
        ),
    ]
    timings = report.get("timings_s") or {}
    if timings:
        blocks.append(
            Paragraph(
                "Timings: " + ", ".join(f"{k} {float(v):.1f} s" for k, v in timings.items()),
                "note",
            )
        )
    class_names = list((r.model.get("input_spec") or {}).get("class_names") or [])

    def labelled(index: Any) -> str:
        known = isinstance(index, int) and 0 <= index < len(class_names)
        return f"{index} {class_names[index]}" if known else str(index)

    if r.images:
        blocks.append(
            Table(
                header=("image", "target", "predicted", "p(target)"),
                rows=tuple(
                    (
                        Cell(str(i.get("name"))),
                        Cell(f"{i.get('target')} {i.get('target_name') or ''}".strip()),
                        Cell(labelled(i.get("predicted"))),
                        Cell(number(i.get("probability"))),
                    )
                    for i in r.images
                ),
                caption="The images audited, in order, with the class each map explains.",
                column_weights=(2.0,),
                small=True,
            )
        )
    return Section("appendix-reproduce", "A.4 Reproducing this audit", tuple(blocks), level=2)


# ----------------------------------------------------------------------------------- entry


def build_content(report: Mapping[str, Any]) -> ReportContent:
    """The report's content from a ``report.json`` document (as the CLI writes it, or as the
    service stores it with ``artifacts``)."""
    r = _Report(report)
    sections: list[Section] = []
    counter = 1
    sanity = [(name, t) for name, t in r.tests.items() if name != LAYERS_TEST]
    for name, test in sanity:
        sections.append(_test_section(r, name, test, counter))
        counter += 1
    requested = [t for t in r.spec.get("tests") or [] if t not in r.tests and t != LAYERS_TEST]
    if not sanity:
        title = f"{counter}. Sanity checks"
        sections.append(
            Section(
                anchor(title),
                title,
                (Paragraph("No sanity check was run in this audit.", "missing"),),
            )
        )
        counter += 1
    elif requested:
        sections[-1] = Section(
            sections[-1].anchor,
            sections[-1].title,
            (
                *sections[-1].blocks,
                Paragraph(
                    f"Requested but absent from the report: {', '.join(requested)}.", "missing"
                ),
            ),
        )
    sections.append(_layers_section(r, counter))
    sections.append(_methods_section(r, counter + 1))
    sections.append(Section("appendix", "Appendix", (), level=1))
    sections += _appendix(r)
    model = str(r.model.get("sha256", ""))[:12]
    return ReportContent(
        title="Saliency audit report",
        subtitle=(
            f"Do these saliency methods depend on what model {model or MISSING} learned? "
            "Sanity checks after Adebayo et al. 2018, per-layer analysis after Lee et al. 2021."
        ),
        cover=_cover(r),
        sections=tuple(sections),
    )
