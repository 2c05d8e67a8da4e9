"""HTML pieces of ``report.html`` (``aqexport.report_html``): every text escaped, every
figure printed one way, every gap in the records said in one line."""

from __future__ import annotations

import html
import math
from typing import Any

__all__ = ["NOT_RECORDED", "Markup", "bar", "details", "esc", "image", "missing", "note", "num", "table"]

NOT_RECORDED = "not recorded in this artifact"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def num(value: Any) -> str:
    """A figure as the page prints it: ints with thousands separators, floats to 4 significant
    digits (scientific when tiny or huge), None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0:
            return str(value)
        return f"{value:.3e}" if abs(value) >= 1e5 or abs(value) < 1e-3 else f"{value:.4g}"
    return esc(value)


def missing(what: str) -> str:
    return f'<p class="missing">{esc(what)}: {NOT_RECORDED}.</p>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def table(headers: list[str] | None, rows: list[list[Any]]) -> str:
    """A table (``headers`` None: a key/value table without a header row); cells that are
    already markup are passed as ``Markup``, the rest through ``num``."""
    head = "" if headers is None else "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


class Markup(str):
    """Text that is already HTML (made by these helpers), put into a table cell as it is."""


def _cell(value: Any) -> str:
    return str(value) if isinstance(value, Markup) else num(value)


def bar(value: float, largest: float) -> Markup:
    """A horizontal bar, ``value`` against ``largest``, drawn with CSS."""
    share = 0.0 if not largest or not value else max(0.0, min(1.0, value / largest))
    return Markup(f'<div class="barcell"><span class="bar" style="width:{share * 100:.1f}%"></span></div>')


def image(uri: str, alt: str) -> str:
    return f'<img class="plot" src="{esc(uri)}" alt="{esc(alt)}">'


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"
