"""Similarity-against-stage figures of the reports, drawn with matplotlib.

One panel per measure, one line per method (the mean over images) with a shaded 95% bootstrap
band, controls dashed, stages on the x axis in the order the test ran them: the layout of
Adebayo et al. 2018, Figure 4. :func:`curves_png` feeds the PDF, :func:`curves_svg` the HTML.

Both are deterministic: a fixed figure size and dpi, the bundled DejaVu Sans font, no date or
software version in the metadata, and ``svg.hashsalt`` set from the figure's key so that the
ids inside the SVG are the same on every run and differ between the figures of one page.
Matplotlib's object API is used (no pyplot), so nothing global changes and no display is
touched.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")  # never a display, whatever the process imported before

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from .content import MEASURE_TITLES, CurveFigure

WIDTH_IN = 7.5  # fits an A4 page between 2 cm margins at full width
PANEL_HEIGHT_IN = 2.5
LEGEND_ROW_HEIGHT_IN = 0.24
PNG_DPI = 150
MAX_COLUMNS = 3
LEGEND_COLUMNS = 5

# 20 distinct colours (matplotlib's tab20, dark shades first) so that 15 methods stay apart
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip


def _value(v: float | None) -> float:
    return math.nan if v is None else float(v)


@contextmanager
def _style(key: str) -> Iterator[None]:
    with matplotlib.rc_context(
        {
            "font.family": "DejaVu Sans",
            "font.size": 7.5,
            "axes.titlesize": 8.5,
            "axes.labelsize": 7.5,
            "xtick.labelsize": 7,
            "ytick.labelsize": 7,
            "legend.fontsize": 7,
            "svg.hashsalt": key,
            "text.parse_math": False,  # a "$" in a stage or method name is not TeX
            "svg.fonttype": "path",  # glyphs as paths: the page looks the same without fonts
            "axes.grid": True,
            "grid.alpha": 0.3,
        }
    ):
        yield


def _draw(figure: CurveFigure) -> Figure:
    methods: list[str] = []
    for panel in figure.panels:
        methods += [s.method for s in panel.series if s.method not in methods]
    colour = {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(methods)}
    controls = {s.method for p in figure.panels for s in p.series if s.is_control}
    count = max(1, len(figure.panels))
    columns = min(MAX_COLUMNS, count)
    rows = math.ceil(count / columns)
    # the legend lists every method and the threshold line, LEGEND_COLUMNS to a row
    legend_rows = math.ceil((len(methods) + 1) / LEGEND_COLUMNS)
    height = rows * PANEL_HEIGHT_IN + legend_rows * LEGEND_ROW_HEIGHT_IN + 0.3
    fig = Figure(figsize=(WIDTH_IN, height), dpi=PNG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    x = list(range(len(figure.stages)))
    long_labels = len(figure.stages) > 4 or any(len(s) > 8 for s in figure.stages)
    has_threshold = False
    for index, panel in enumerate(figure.panels):
        ax: Axes = fig.add_subplot(rows, columns, index + 1)
        for series in panel.series:
            mean = [_value(v) for v in series.mean]
            low = [_value(v) for v in series.ci_low]
            high = [_value(v) for v in series.ci_high]
            style = "--" if series.is_control else "-"
            ax.plot(
                x,
                mean,
                linestyle=style,
                marker="o",
                markersize=2.5,
                linewidth=1.1,
                color=colour[series.method],
            )
            ax.fill_between(x, low, high, color=colour[series.method], alpha=0.14, linewidth=0)
        if panel.threshold is not None:
            has_threshold = True
            ax.axhline(panel.threshold, color="black", linestyle=":", linewidth=1.0)
        ax.set_title(MEASURE_TITLES.get(panel.measure, panel.measure))
        ax.set_xticks(x)
        ax.set_xticklabels(
            figure.stages,
            rotation=40 if long_labels else 0,
            ha="right" if long_labels else "center",
        )
        if len(x) == 1:
            ax.set_xlim(-0.5, 0.5)
        if index >= count - columns:  # the bottom row
            ax.set_xlabel(figure.x_label)
        if index % columns == 0:
            ax.set_ylabel("similarity to trained" if panel.measure != "entropy_rise" else "rise")
    handles = [
        Line2D(
            [], [], color=colour[m], linestyle="--" if m in controls else "-", marker="o",
            markersize=2.5, linewidth=1.1,
        )
        for m in methods
    ]  # fmt: skip
    labels = list(methods)
    if has_threshold:
        handles.append(Line2D([], [], color="black", linestyle=":", linewidth=1.0))
        labels.append("policy threshold")
    fig.legend(handles, labels, loc="outside lower center", ncol=LEGEND_COLUMNS, frameon=False)
    return fig


def curves_png(figure: CurveFigure) -> bytes:
    """The figure as a PNG (for the PDF), at :data:`PNG_DPI`."""
    with _style(figure.key):
        fig = _draw(figure)
        canvas = fig.canvas
        assert isinstance(canvas, FigureCanvasAgg)
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
    # opaque RGB: an alpha channel would become a second image (a soft mask) in the PDF
    out = io.BytesIO()
    Image.fromarray(rgba[..., :3].copy(), mode="RGB").save(out, format="PNG", compress_level=6)
    return out.getvalue()


def curves_svg(figure: CurveFigure) -> str:
    """The figure as an ``<svg>`` element for inlining in HTML (no XML prolog or doctype)."""
    with _style(figure.key):
        fig = _draw(figure)
        out = io.StringIO()
        fig.savefig(
            out,
            format="svg",
            metadata={"Date": None, "Creator": None, "Format": None, "Type": None},
        )
    text = out.getvalue()
    return text[text.index("<svg") :]
