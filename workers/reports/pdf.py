"""The PDF report: :func:`render_pdf` lays :mod:`.content` out on A4 pages with ReportLab.

A cover page (the model, the run and the verdict table, PASS green / FAIL red / INCONCLUSIVE
amber), then one chapter per sanity test, the per-layer analysis, the methods and the
appendix, each chapter on a new page, with "page N of M" in the footer and PDF bookmarks per
section. Text is set in DejaVu Sans (shipped with matplotlib), so any character a report
holds (a Greek letter in a reference, an en dash) prints instead of a missing-glyph box.

The same report gives the same bytes: ``invariant=1`` fixes ReportLab's creation date and
document id, the figures are deterministic (:mod:`.figures`) and no date comes from the clock.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import matplotlib
from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import cm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    Flowable,
    Image,
    KeepTogether,
    PageBreak,
    Paragraph,
    Preformatted,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from . import content as c
from .figures import curves_png

PictureSource = Callable[[str], bytes]

PAGE_WIDTH, PAGE_HEIGHT = A4
MARGIN = 1.7 * cm
FRAME_WIDTH = PAGE_WIDTH - 2 * MARGIN
# the frame of SimpleDocTemplate, less its 6 pt padding on each side
FRAME_HEIGHT = PAGE_HEIGHT - 2 * MARGIN - 12
GRID_LABEL_WIDTH = 2.9 * cm
GRID_MAX_CELL = 2.3 * cm
GRID_MAX_COLUMNS = 10  # wider grids (module granularity) are cut into several tables
WIDE_CELL = 5.5 * cm  # a table cell at least this wide holds its detail on its first line
CODE_LINE_CHARS = 100  # DejaVu Sans Mono at 7 pt: 4.2 pt a character, the frame holds ~115

FONT, FONT_BOLD, FONT_MONO = "DejaVuSans", "DejaVuSans-Bold", "DejaVuSansMono"

TONE_BACKGROUND: dict[str, colors.Color] = {
    tone: colors.HexColor(hex_colour) for tone, hex_colour in c.TONE_COLOURS.items()
}
HEADER_BACKGROUND = colors.HexColor(c.HEADER_COLOUR)
RULE_COLOUR = colors.HexColor("#9aa3b0")


@cache
def _register_fonts() -> None:
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    for name, file in (
        (FONT, "DejaVuSans.ttf"),
        (FONT_BOLD, "DejaVuSans-Bold.ttf"),
        (FONT_MONO, "DejaVuSansMono.ttf"),
    ):
        pdfmetrics.registerFont(TTFont(name, str(folder / file)))
    pdfmetrics.registerFontFamily(
        FONT, normal=FONT, bold=FONT_BOLD, italic=FONT, boldItalic=FONT_BOLD
    )


@cache
def _styles() -> dict[str, ParagraphStyle]:
    _register_fonts()
    body = ParagraphStyle("body", fontName=FONT, fontSize=9, leading=12, spaceAfter=4)
    grey = colors.HexColor("#444444")
    settings: dict[str, dict[str, Any]] = {
        "title": {"fontName": FONT_BOLD, "fontSize": 22, "leading": 27},
        "subtitle": {"fontSize": 10.5, "leading": 14, "spaceAfter": 10},
        "h1": {"fontName": FONT_BOLD, "fontSize": 15, "leading": 19, "spaceAfter": 6},
        "h2": {"fontName": FONT_BOLD, "fontSize": 11.5, "leading": 15, "spaceBefore": 8},
        "h3": {"fontName": FONT_BOLD, "fontSize": 9.5, "leading": 12, "spaceBefore": 6},
        "note": {"fontSize": 8, "leading": 10.5, "textColor": grey},
        "missing": {"textColor": colors.HexColor("#8a5a00")},
        "caption": {"fontSize": 7.5, "leading": 9.5, "textColor": grey, "spaceAfter": 8},
        "cell": {"fontSize": 8, "leading": 9.8, "spaceAfter": 0},
        "cell_small": {"fontSize": 7, "leading": 8.5, "spaceAfter": 0},
        "head": {"fontName": FONT_BOLD, "fontSize": 7.5, "leading": 9, "spaceAfter": 0},
        "grid_label": {"fontSize": 6.5, "leading": 7.8, "spaceAfter": 0},
        "grid_column": {"fontSize": 6.5, "leading": 7.8, "spaceAfter": 0, "alignment": TA_CENTER},
        "definition": {
            "fontSize": 8,
            "leading": 10.5,
            "leftIndent": 10,
            "firstLineIndent": -10,
            "spaceAfter": 3,
        },
        "code": {
            "fontName": FONT_MONO,
            "fontSize": 7,
            "leading": 8.6,
            "backColor": colors.HexColor("#f6f6f6"),
            "borderPadding": 4,
            "spaceBefore": 4,
            "spaceAfter": 8,
        },
    }
    styles = {name: ParagraphStyle(name, parent=body, **kw) for name, kw in settings.items()}
    return {"body": body, **styles}


def _text(value: str) -> str:
    """Plain text as ReportLab paragraph markup (which is XML-like)."""
    return escape(value)


class _Heading(Paragraph):
    """A section title that becomes a PDF bookmark where it lands."""

    def __init__(self, text: str, style: ParagraphStyle, key: str, level: int) -> None:
        super().__init__(_text(text), style)
        self.bookmark = (key, text, level)


class _Doc(SimpleDocTemplate):
    def afterFlowable(self, flowable: Flowable) -> None:
        mark = getattr(flowable, "bookmark", None)
        if mark is not None:
            key, title, level = mark
            self.canv.bookmarkPage(key)
            self.canv.addOutlineEntry(title, key, level=level)


class _NumberedCanvas(Canvas):
    """Holds every page until the end so that the footer can say "page N of M"."""

    def __init__(self, *args: Any, footer: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._footer = footer
        self._pages: list[dict[str, Any]] = []

    def showPage(self) -> None:
        self._pages.append(dict(self.__dict__))
        self._startPage()

    def save(self) -> None:
        total = len(self._pages)
        for number, page in enumerate(self._pages, start=1):
            self.__dict__.update(page)
            self.setFont(FONT, 7.5)
            self.setFillColor(colors.HexColor("#555555"))
            self.drawString(MARGIN, MARGIN * 0.55, self._footer)
            self.drawRightString(PAGE_WIDTH - MARGIN, MARGIN * 0.55, f"page {number} of {total}")
            super().showPage()
        super().save()


def _cell(cell: c.Cell, small: bool, width: float) -> Paragraph:
    styles = _styles()
    markup = _text(cell.text)
    if cell.tone in ("pass", "fail", "inconclusive"):
        markup = f"<b>{markup}</b>"
    if cell.detail:
        # a wide column keeps the detail on the same line: the cover's verdict table of a
        # full audit then fits on the cover page
        size = 6.3 if small else 6.8
        joint = "&nbsp;&nbsp;" if width >= WIDE_CELL else "<br/>"
        markup += f"{joint}<font size={size}>{_text(cell.detail)}</font>"
    return Paragraph(markup, styles["cell_small" if small else "cell"])


def _table(block: c.Table) -> list[Flowable]:
    styles = _styles()
    columns = (
        max(len(block.header), *(len(r) for r in block.rows)) if block.rows else len(block.header)
    )
    weights = [*block.column_weights[:columns], *[1.0] * (columns - len(block.column_weights))]
    widths = [FRAME_WIDTH * w / sum(weights) for w in weights]
    has_header = any(block.header)
    data: list[list[Any]] = []
    if has_header:
        data.append([Paragraph(_text(h), styles["head"]) for h in block.header])
    data += [
        [_cell(cell, block.small, width) for cell, width in zip(row, widths, strict=False)]
        for row in block.rows
    ]
    if not data:
        return []
    commands: list[tuple[Any, ...]] = [
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("LINEBELOW", (0, 0), (-1, -1), 0.25, RULE_COLOUR),
        ("TOPPADDING", (0, 0), (-1, -1), 2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2.5),
        ("LEFTPADDING", (0, 0), (-1, -1), 3),
        ("RIGHTPADDING", (0, 0), (-1, -1), 3),
    ]
    if has_header:
        commands += [("BACKGROUND", (0, 0), (-1, 0), HEADER_BACKGROUND)]
    offset = 1 if has_header else 0
    for r, row in enumerate(block.rows):
        for col, cell in enumerate(row):
            if cell.tone in TONE_BACKGROUND:
                commands.append(
                    ("BACKGROUND", (col, r + offset), (col, r + offset), TONE_BACKGROUND[cell.tone])
                )
    table = Table(data, colWidths=widths, repeatRows=offset, hAlign="LEFT")
    table.setStyle(TableStyle(commands))
    out: list[Flowable] = [table]
    if block.caption:
        out.append(Paragraph(_text(block.caption), styles["caption"]))
    if block.title:
        # a titled table is small (one metric): title and table stay on one page
        return [KeepTogether([Paragraph(_text(block.title), styles["h3"]), *out])]
    return out


def _picture(picture: c.Picture | None, fetch: PictureSource, side: float) -> Flowable:
    styles = _styles()
    if picture is None:
        return Paragraph(c.MISSING, styles["grid_label"])
    try:
        data = fetch(picture.sha256)
    except (LookupError, OSError):
        # a picture gone from storage should not cost the whole report
        return Paragraph("image unavailable", styles["grid_label"])
    return Image(io.BytesIO(data), width=side, height=side)


def _grid(block: c.PictureGrid, fetch: PictureSource) -> list[Flowable]:
    styles = _styles()
    out: list[Flowable] = []
    count = len(block.column_labels)
    for start in range(0, count, GRID_MAX_COLUMNS):
        stop = min(count, start + GRID_MAX_COLUMNS)
        columns = stop - start
        by_width = (FRAME_WIDTH - GRID_LABEL_WIDTH) / columns
        # the whole grid of one image on one page: title, column labels and caption take ~3 cm
        by_height = (FRAME_HEIGHT - 3.2 * cm) / max(1, len(block.row_labels))
        side = min(GRID_MAX_CELL, by_width, by_height)
        data: list[list[Any]] = [
            [Paragraph("", styles["grid_label"])]
            + [
                Paragraph(_text(label), styles["grid_column"])
                for label in block.column_labels[start:stop]
            ]
        ]
        for label, row in zip(block.row_labels, block.cells, strict=True):
            data.append(
                [Paragraph(_text(label), styles["grid_label"])]
                + [_picture(p, fetch, side - 2) for p in row[start:stop]]
            )
        table = Table(data, colWidths=[GRID_LABEL_WIDTH] + [side] * columns, hAlign="LEFT")
        table.setStyle(
            TableStyle(
                [
                    ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
                    ("VALIGN", (0, 0), (-1, 0), "BOTTOM"),
                    ("ALIGN", (1, 0), (-1, -1), "CENTER"),
                    ("LEFTPADDING", (0, 0), (-1, -1), 1),
                    ("RIGHTPADDING", (0, 0), (-1, -1), 1),
                    ("TOPPADDING", (0, 0), (-1, -1), 1),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), 1),
                ]
            )
        )
        part = "" if count <= GRID_MAX_COLUMNS else f" (columns {start + 1}-{stop} of {count})"
        out.append(
            KeepTogether(
                [
                    Paragraph(_text(block.title + part), styles["h3"]),
                    table,
                    Paragraph(_text(block.caption), styles["caption"]),
                ]
            )
        )
    return out


def _figure(block: c.CurveFigure) -> list[Flowable]:
    styles = _styles()
    png = curves_png(block)
    image = Image(io.BytesIO(png))
    width, height = image.imageWidth, image.imageHeight
    scale = min(FRAME_WIDTH / width, (FRAME_HEIGHT - 3 * cm) / height)
    figure = Image(io.BytesIO(png), width=width * scale, height=height * scale)
    return [KeepTogether([figure, Paragraph(_text(block.caption), styles["caption"])])]


def _code(block: c.Code) -> list[Flowable]:
    lines = []
    for line in block.text.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        lines += textwrap.wrap(
            line,
            CODE_LINE_CHARS,
            subsequent_indent=" " * (indent + 4),
            break_long_words=True,
            drop_whitespace=False,
        ) or [""]
    return [Preformatted("\n".join(lines), _styles()["code"])]


def _block(block: c.Block, fetch: PictureSource) -> list[Flowable]:
    styles = _styles()
    if isinstance(block, c.Paragraph):
        return [Paragraph(_text(block.text), styles[block.kind])]
    if isinstance(block, c.Table):
        return _table(block)
    if isinstance(block, c.Code):
        return _code(block)
    if isinstance(block, c.Definitions):
        return [
            Paragraph(f"<b>{_text(term)}</b>: {_text(text)}", styles["definition"])
            for term, text in block.items
        ]
    if isinstance(block, c.CurveFigure):
        return _figure(block)
    return _grid(block, fetch)


def render_pdf(report: dict[str, Any], picture: PictureSource) -> bytes:
    """The PDF report of ``report`` (a ``report.json`` document); ``picture(sha256)`` returns
    the PNG bytes of an artifact the report lists."""
    content = c.build_content(report)
    styles = _styles()
    story: list[Flowable] = [
        _Heading(content.title, styles["title"], "cover", 0),
        Paragraph(_text(content.subtitle), styles["subtitle"]),
    ]
    for block in content.cover:
        story += _block(block, picture)
    for section in content.sections:
        if section.level == 1:
            story.append(PageBreak())
        story.append(
            _Heading(
                section.title,
                styles["h1" if section.level == 1 else "h2"],
                section.anchor,
                section.level - 1,
            )
        )
        for block in section.blocks:
            story += _block(block, picture)
        story.append(Spacer(1, 4))
    out = io.BytesIO()
    model = str((report.get("model") or {}).get("sha256", ""))
    doc = _Doc(
        out,
        pagesize=A4,
        leftMargin=MARGIN,
        rightMargin=MARGIN,
        topMargin=MARGIN,
        bottomMargin=MARGIN,
        title=content.title,
        author="saliency-audit",
        subject=f"saliency audit of model {model}",
        creator="saliency-audit",
        invariant=1,
    )
    footer = f"saliency-audit report, model {model[:16]}" + (
        f", audit {report['audit_id']}" if report.get("audit_id") else ""
    )
    doc.build(story, canvasmaker=partial(_NumberedCanvas, footer=footer))
    return out.getvalue()
