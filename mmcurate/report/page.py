"""The report's sections as HTML: pool, funnel, one block per score column, NormSim and
SemDeDup. Everything shown comes from `build` as plain data; every text is escaped here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mmcurate.report.figures import histogram_png
from mmcurate.report.html import Markup, data_uri, esc, heading, img, para, png, table
from mmcurate.report.pool_view import QUANTILES, ColumnStats, StageView

CAPTION_CHARS = 300


def card(row: int, view: dict, mark: str = "") -> Markup:
    """One example: thumbnail (or why there is none), caption, uid, stem/key, URL, scores."""
    d = view["details"][row]
    shot = view["thumbs"].get(d["uid"])
    if shot and shot.get("thumb"):
        data, mime = shot["thumb"]
        picture = img(data_uri(data, mime), f"thumbnail of {d['uid']}")
    else:
        picture = Markup(f"<div class='noimg'>{esc(view['no_image'])}</div>")
    caption = d["caption"]
    caption = "(no caption)" if caption is None else caption
    if len(caption) > CAPTION_CHARS:
        caption = caption[:CAPTION_CHARS] + "…"
    inside = view["in_subset"]
    state = "" if inside is None else ("kept" if inside[row] else "dropped")
    label = {"kept": "in the subset", "dropped": "not in the subset", "": ""}[state]
    scores = "<br>".join(f"{esc(k)} {esc(_num(v))}" for k, v in d["scores"].items())
    extra = f"<div>{esc(mark)}</div>" if mark else ""
    tag = view["tags"].get(d["uid"])
    if tag:
        extra += f"<div class='tag'>{esc(tag)}</div>"
    where = d["stem"] + (f"/{d['key']}" if d.get("key") else "")
    url = d.get("url")
    if url:
        extra += f"<div class='url'>{esc(url if len(url) <= 80 else url[:80] + '…')}</div>"
    return Markup(
        f"<div class='card {state}'>{picture}<div class='cap'>{esc(caption)}</div>"
        f"<div class='uid'>{esc(d['uid'])}</div><div>{esc(where)}"
        f"{' · ' + esc(label) if label else ''}</div>{extra}<div>{scores}</div></div>"
    )


def _num(value: Any) -> str:
    return (
        "NaN" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.4g}"
    )


def cards(rows: Sequence[int], view: dict, marks: Sequence[str] | None = None) -> Markup:
    """A row of example cards."""
    marks = marks or [""] * len(rows)
    inner = "".join(card(int(r), view, m) for r, m in zip(rows, marks))
    return Markup(f"<div class='cards'>{inner or esc('(none)')}</div>")


def pool_section(view: dict) -> list[Markup]:
    """What was read: score files, rows, columns, the subset and where images came from."""
    rows = [
        ["score files", f"{view['files']} ({view['source']}) in {view['scores']}"],
        ["rows", f"{view['pool']:,}"],
        ["score columns", ", ".join(view["columns"])],
    ]
    if view["subset"]:
        s = view["subset"]
        rows.append(["subset", f"{s['path']}: {s['uids']:,} uids, {s['rows']:,} pool rows"])
    rows.append(["thumbnails", view["images_note"]])
    rows.append(["captions", view["captions_note"]])
    return [heading(2, "Pool", "pool"), table([], rows, "kv")]


def funnel_section(view: dict) -> list[Markup]:
    """Rows kept after each --keep stage, as subset.json records them (bars: share of pool)."""
    record = view["record"]
    if not record:
        return []
    pool = max(int(record.get("pool") or view["pool"]), 1)

    def bar(count: int) -> Markup:
        share = 100.0 * count / pool
        return Markup(f"<div class='bar' style='width:{share:.2f}%'></div>")

    rows = [["pool", "", f"{pool:,}", "100.0%", "", bar(pool)]]
    for stage in record.get("stages") or []:
        count = int(stage["count"])
        cut = stage.get("threshold")
        rows.append(
            [
                stage["rule"],
                f"{int(stage['input']):,}",
                f"{count:,}",
                f"{100.0 * count / pool:.1f}%",
                "–" if cut is None else f"{cut:.6g}",
                bar(count),
            ]
        )
    for kind in ("union", "intersect"):
        for entry in record.get(kind) or []:
            rows.append([f"{kind} {entry['path']}", "", f"{entry['count']:,}", "", "", ""])
    final = int(record.get("count", 0))
    rows.append(["subset", "", f"{final:,}", f"{100.0 * final / pool:.1f}%", "", bar(final)])
    parts = [
        heading(2, "Selection funnel", "funnel"),
        table(["stage", "input", "kept", "of pool", "cut-off", ""], rows, "funnel"),
    ]
    parts += [para(n, note=True) for n in view["replay_notes"]]
    return parts


def column_block(stats: ColumnStats, view: dict, labels: tuple[str, str]) -> list[Markup]:
    """A column's histogram with its cut-offs, its quantiles and its example rows."""
    stages: list[StageView] = [s for s in view["stages"] if s.metric == stats.name]
    cutoffs = [(s.rule, float(s.threshold)) for s in stages if s.threshold is not None]
    figure = histogram_png(stats.name, stats.edges, stats.counts, stats.kept, cutoffs)
    head = ["rows", "NaN", "mean", *[f"q{q:g}" for q in QUANTILES]]
    qs = [stats.quantiles.get(q, float("nan")) for q in QUANTILES]
    parts = [
        heading(3, stats.name, f"col-{stats.name}"),
        png(figure, f"histogram of {stats.name}"),
        table(head, [[f"{stats.rows:,}", f"{stats.nan:,}", stats.mean, *qs]], "quantiles"),
        heading(4, f"{labels[0]} ({stats.name})"),
        cards(view["top"][stats.name], view),
    ]
    for s in stages:
        if s.kept is None:
            parts.append(para(f"{s.rule}: not replayed here, so no rows at its cut-off.", True))
            continue
        side = "lowest" if not s.low_kept else "highest"
        parts += [
            heading(4, f"just kept by {s.rule} (the {side} kept scores)"),
            cards(s.kept, view),
            heading(4, f"just dropped by {s.rule}"),
            cards(s.dropped, view),
        ]
    if not stages:
        parts.append(para(f"No --keep rule of the subset reads {stats.name}.", note=True))
    parts += [heading(4, f"{labels[1]} ({stats.name})"), cards(view["bottom"][stats.name], view)]
    return parts


def dedup_section(view: dict) -> list[Markup]:
    """The largest SemDeDup groups: the kept row beside the removed ones."""
    dedup = view.get("dedup")
    if dedup is None:
        return []
    about = (
        f"Rows scoring above {dedup['threshold']:g} in the semdedup column (each row's largest "
        "cosine to an earlier member of its k-means cluster) are the ones SemDeDup removes."
    )
    if not dedup["groups"]:
        return [
            heading(2, "SemDeDup", "semdedup"),
            para(f"{about} No groups shown: {dedup['how']}."),
        ]
    parts = [heading(2, "SemDeDup", "semdedup"), para(f"{about} {dedup['how'].capitalize()}.")]
    for n, g in enumerate(dedup["groups"], 1):
        kept = cards([g.kept], view, ["kept"]) if g.kept is not None else Markup("")
        removed = cards(
            [r for r, _ in g.removed][: view["examples"]],
            view,
            [f"removed · cosine to kept {c:.4f}" if c == c else "removed" for _, c in g.removed],
        )
        parts += [
            heading(4, f"group {n}: {len(g.removed)} removed (cluster {g.cluster})"),
            Markup(f"<div class='groups'>{kept}{removed}</div>"),
        ]
    return parts
