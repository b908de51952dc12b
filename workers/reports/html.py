"""The HTML report: :func:`render_html` writes :mod:`.content` as one self-contained page.

Everything the page needs is inside it: the CSS in a ``<style>`` element, the heatmaps as
``data:image/png;base64`` URIs, the figures as inline SVG (:mod:`.figures`), and no script, so
it opens from a file, an e-mail attachment or behind a strict Content-Security-Policy alike.
Every piece of text from the report is escaped with :func:`html.escape` (module names and
image names come from the user's files). The same report gives the same page.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from html import escape
from typing import Any

from . import content as c
from .figures import curves_svg

PictureSource = Callable[[str], bytes]

GRID_CELL_PX = 76  # displayed side of one heatmap in a grid

_CSS = """
:root { color-scheme: light; }
body { font-family: "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; font-size: 14px;
  line-height: 1.45; color: #1d1f23; margin: 0; background: #fafbfc; }
main, header.cover, nav { max-width: 1160px; margin: 0 auto; padding: 0 24px; }
header.cover { padding-top: 28px; }
h1 { font-size: 30px; margin: 0 0 6px; }
h2 { font-size: 22px; margin: 34px 0 8px; padding-top: 12px; border-top: 2px solid #c9ced6; }
h3 { font-size: 17px; margin: 22px 0 6px; }
h4 { font-size: 14px; margin: 16px 0 4px; }
p { margin: 6px 0; }
p.subtitle { font-size: 16px; color: #3a3f47; }
p.note { font-size: 12.5px; color: #50555d; }
p.missing { color: #8a5a00; font-style: italic; }
.scroll { overflow-x: auto; margin: 8px 0; }
table { border-collapse: collapse; font-size: 12.5px; background: #fff; }
table.small { font-size: 11.5px; }
th { background: HEADER; text-align: left; font-weight: bold; }
th, td { padding: 3px 6px; border-bottom: 1px solid #c3c9d2; vertical-align: top; }
td .detail { display: block; font-size: 10.5px; color: #30343a; font-weight: normal; }
td.pass, td.fail, td.inconclusive { font-weight: bold; }
TONES
table.facts td:first-child { color: #50555d; white-space: nowrap; }
table.grid { background: transparent; }
table.grid th, table.grid td { border: none; padding: 1px; font-size: 10.5px;
  font-weight: normal; background: transparent; vertical-align: middle; }
table.grid th.col { text-align: center; vertical-align: bottom; max-width: GRIDpx;
  word-break: break-all; }
table.grid img { width: GRIDpx; height: GRIDpx; image-rendering: pixelated; display: block; }
figure { margin: 12px 0; }
figcaption { font-size: 12px; color: #3a3f47; max-width: 900px; }
figure.curves svg { width: 100%; max-width: 1000px; height: auto; }
dl { margin: 6px 0; font-size: 12.5px; }
dt { font-weight: bold; margin-top: 6px; }
dd { margin: 0 0 0 18px; }
pre { background: #f1f2f4; padding: 8px 10px; font-size: 11.5px; overflow-x: auto;
  white-space: pre-wrap; word-break: break-all; }
ul.contents { list-style: none; padding-left: 0; font-size: 13.5px; }
ul.contents li.level2 { padding-left: 22px; }
footer { max-width: 1160px; margin: 40px auto 20px; padding: 0 24px; color: #60656d;
  font-size: 12px; }
"""


def _css() -> str:
    tones = "\n".join(
        f"td.{tone} {{ background: {colour}; }}" for tone, colour in c.TONE_COLOURS.items()
    )
    return (
        _CSS.replace("HEADER", c.HEADER_COLOUR)
        .replace("TONES", tones)
        .replace("GRID", str(GRID_CELL_PX))
    )


def _cell(cell: c.Cell, tag: str = "td") -> str:
    detail = f'<span class="detail">{escape(cell.detail)}</span>' if cell.detail else ""
    tone = f' class="{cell.tone}"' if cell.tone != "plain" else ""
    return f"<{tag}{tone}>{escape(cell.text)}{detail}</{tag}>"


def _table(block: c.Table) -> str:
    classes = (
        ["data"] + (["small"] if block.small else []) + ([] if any(block.header) else ["facts"])
    )
    parts = [f"<h4>{escape(block.title)}</h4>"] if block.title else []
    parts.append(f'<div class="scroll"><table class="{" ".join(classes)}">')
    if any(block.header):
        parts.append(
            "<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in block.header) + "</tr></thead>"
        )
    parts.append("<tbody>")
    parts += ["<tr>" + "".join(_cell(cell) for cell in row) + "</tr>" for row in block.rows]
    parts.append("</tbody></table></div>")
    if block.caption:
        parts.append(f'<p class="note">{escape(block.caption)}</p>')
    return "\n".join(parts)


def _picture(picture: c.Picture | None, fetch: PictureSource) -> str:
    if picture is None:
        return f"<td>{escape(c.MISSING)}</td>"
    try:
        data = fetch(picture.sha256)
    except (LookupError, OSError):
        # a picture gone from storage should not cost the whole report
        return "<td>image unavailable</td>"
    encoded = base64.b64encode(data).decode("ascii")
    return f'<td><img src="data:image/png;base64,{encoded}" alt="{escape(picture.alt)}"></td>'


def _grid(block: c.PictureGrid, fetch: PictureSource) -> str:
    head = "<th></th>" + "".join(
        f'<th class="col">{escape(label)}</th>' for label in block.column_labels
    )
    rows = [
        f"<tr><th>{escape(label)}</th>" + "".join(_picture(p, fetch) for p in row) + "</tr>"
        for label, row in zip(block.row_labels, block.cells, strict=True)
    ]
    return (
        f'<figure class="grid"><h4>{escape(block.title)}</h4><div class="scroll">'
        f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
        f"</table></div><figcaption>{escape(block.caption)}</figcaption></figure>"
    )


def _block(block: c.Block, fetch: PictureSource) -> str:
    if isinstance(block, c.Paragraph):
        kind = "" if block.kind == "body" else f' class="{block.kind}"'
        return f"<p{kind}>{escape(block.text)}</p>"
    if isinstance(block, c.Table):
        return _table(block)
    if isinstance(block, c.Code):
        caption = f"<h4>{escape(block.caption)}</h4>" if block.caption else ""
        return f"{caption}<pre><code>{escape(block.text)}</code></pre>"
    if isinstance(block, c.Definitions):
        items = "".join(
            f"<dt>{escape(term)}</dt><dd>{escape(text)}</dd>" for term, text in block.items
        )
        return f"<dl>{items}</dl>"
    if isinstance(block, c.CurveFigure):
        # the SVG is matplotlib's own output, whose text is drawn as paths (and escaped in
        # its comments), so it is inlined as is
        return (
            f'<figure class="curves" id="{escape(block.key)}">{curves_svg(block)}'
            f"<figcaption>{escape(block.caption)}</figcaption></figure>"
        )
    return _grid(block, fetch)


def render_html(report: dict[str, Any], picture: PictureSource) -> str:
    """The HTML report of ``report`` (a ``report.json`` document) as one self-contained page;
    ``picture(sha256)`` returns the PNG bytes of an artifact the report lists."""
    content = c.build_content(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(content.title)}</title>",
        f"<style>{_css()}</style>",
        "</head>",
        "<body>",
        '<header class="cover">',
        f"<h1>{escape(content.title)}</h1>",
        f'<p class="subtitle">{escape(content.subtitle)}</p>',
        *(_block(block, picture) for block in content.cover),
        "</header>",
        '<nav><h2>Contents</h2><ul class="contents">',
        *(
            f'<li class="level{s.level}"><a href="#{escape(s.anchor)}">{escape(s.title)}</a></li>'
            for s in content.sections
        ),
        "</ul></nav>",
        "<main>",
    ]
    for section in content.sections:
        tag = "h2" if section.level == 1 else "h3"
        parts.append(f'<section id="{escape(section.anchor)}">')
        parts.append(f"<{tag}>{escape(section.title)}</{tag}>")
        parts += [_block(block, picture) for block in section.blocks]
        parts.append("</section>")
    model = str((report.get("model") or {}).get("sha256", ""))
    parts += [
        "</main>",
        f"<footer>saliency-audit report of model {escape(model)}</footer>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(parts)
