"""HTML building blocks: every value is escaped unless it is `Markup` made here, and images
are data URIs, so a page is one file that opens from disk and never reaches the network."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

CSS = (
    "body{font-family:sans-serif;max-width:1180px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:0.6em 0}"
    "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right;vertical-align:top}"
    "th{background:#eee}img{max-width:100%}p.note{color:#555;font-size:0.9em}"
    ".cards{display:flex;flex-wrap:wrap;gap:8px;margin:0.4em 0 1em}"
    ".card{width:122px;border:1px solid #ccc;padding:4px;font-size:11px;overflow-wrap:anywhere;"
    "text-align:left}"
    ".card img{width:120px;height:120px;object-fit:contain;image-rendering:pixelated;"
    "background:#f4f4f4;display:block}"
    ".card.kept{border-color:#2a8a3a}.card.dropped{border-color:#b03030}"
    ".noimg{width:120px;height:120px;background:#f4f4f4;color:#888;display:flex;"
    "align-items:center;justify-content:center;text-align:center}"
    ".uid{font-family:monospace;color:#666}.url{color:#666;font-size:10px}"
    ".tag{font-weight:bold}.cap{margin:2px 0}"
    ".bar{background:#4c72b0;height:12px}.funnel td:last-child{width:320px;text-align:left}"
    ".groups{display:flex;gap:16px;align-items:flex-start}"
)


class Markup(str):
    """Trusted markup built by this module; any other string is escaped where it is placed."""


def esc(value: Any) -> str:
    """A value as HTML text: numbers formatted, everything else escaped (quotes included)."""
    if isinstance(value, Markup):
        return value
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str) -> str:
    """Bytes as a base64 data URI."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(src: str, alt: str, cls: str = "") -> Markup:
    """An <img> element with an escaped source and alt text."""
    klass = f" class='{esc(cls)}'" if cls else ""
    return Markup(f"<img src='{esc(src)}' alt='{esc(alt)}'{klass}>")


def png(data: bytes, alt: str) -> Markup:
    """A PNG embedded as a data URI."""
    return img(data_uri(data, "image/png"), alt)


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]], cls: str = "") -> Markup:
    """A table (no header row when `header` is empty); every header and cell escaped (Markup
    cells are placed as they are)."""
    klass = f" class='{esc(cls)}'" if cls else ""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return Markup(f"<table{klass}>{head}<tbody>{body}</tbody></table>")


def heading(level: int, text: str, anchor: str = "") -> Markup:
    """A section heading with an optional id."""
    ident = f" id='{esc(anchor)}'" if anchor else ""
    return Markup(f"<h{level}{ident}>{esc(text)}</h{level}>")


def para(text: str, note: bool = False) -> Markup:
    """A paragraph of escaped text."""
    return Markup(f"<p{' class=note' if note else ''}>{esc(text)}</p>")


def page(title: str, parts: Iterable[str]) -> str:
    """A whole document: charset, title, the style sheet and the parts in order."""
    head = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
    )
    body = "\n".join(p if isinstance(p, Markup) else esc(p) for p in parts)
    return f"{head}\n<h1>{esc(title)}</h1>\n{body}\n</body></html>\n"
