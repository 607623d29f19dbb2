"""The demo report: report.html with its PNGs, and the headline table for the terminal.

`render_report` draws the PNGs (`demo.plots`) and writes a self-contained HTML page beside
them; `terminal_table` prints the headline figures. Nothing here knows how the
arrays were produced.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.data.atomic import write_bytes_atomic
from mmcurate.demo.analysis import FAULT_ORDER, SET_LABELS, recall_mean
from mmcurate.demo.plots import (
    plot_distilled,
    plot_retrieval,
    plot_roc,
    plot_scores,
    plot_target,
    plot_tau_sweep,
)
from mmcurate.metrics.retrieval import RECALL_KEYS


def set_label(name: str, entry: Mapping[str, Any]) -> str:
    """How a retrieval row is named: what the students trained on, and its size."""
    label = SET_LABELS.get(name, name)
    return f"{label} ({entry['pairs']} pairs)" if "pairs" in entry else label


# ----------------------------------------------------------------------------- terminal


def terminal_table(summary: Mapping[str, Any]) -> str:
    """The headline figures: noise-detection AUROC per metric and R@K per training set."""
    lines = ["noise-detection AUROC (misaligned + generic vs clean + rare; 0.5 = chance)"]
    tau = summary.get("tau")
    for name, value in summary["auroc"].items():
        note = f"  (τ = {tau:.3g})" if name == "negclip" and tau is not None else ""
        lines.append(f"  {name:<14}{value:7.3f}{note}")
    dups = summary.get("duplicates")
    if dups:
        lines.append("")
        lines.append(
            f"duplicates ({dups['copies']} copies in {dups['groups']} groups: "
            f"{dups['injected']} beyond one per group)"
        )
        auroc = dups["auroc"]["semdedup"]["duplicates"]
        lines.append(f"  semdedup AUROC, duplicates vs clean{auroc:7.3f}")
        lines.append(
            f"  kept by the selection: {dups['kept_without_dedup']} without the dedup rule, "
            f"{dups['kept_with_dedup']} with {dups['rule']}"
        )
    retrieval = summary.get("retrieval") or {}
    if retrieval:
        lines.append("")
        head = "".join(f"{k:>8}" for k in RECALL_KEYS) + f"{'mean':>8}"
        lines.append(f"retrieval on the test split (%, mean over students){'':<2}")
        lines.append(f"  {'trained on':<30}{head}")
        for name, entry in retrieval.items():
            cells = "".join(f"{entry[k]['mean']:8.1f}" for k in RECALL_KEYS)
            lines.append(f"  {set_label(name, entry):<30}{cells}{recall_mean(entry):8.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- HTML


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if np.isnan(value) else f"{value:.3f}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:0.6em 0}"
    "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
    "th{background:#eee}img{max-width:100%}p.note{color:#555;font-size:0.9em}"
)


def render_html(report: Mapping[str, Any]) -> str:
    """The report page (images referenced by relative file name)."""
    a = report["analysis"]
    parts = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>{html.escape(report.get('title', 'mmcurate report'))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(report.get('title', 'mmcurate report'))}</h1>",
    ]
    for line in report.get("notes", []):
        parts.append(f"<p class='note'>{html.escape(line)}</p>")
    counts = a["counts"]
    parts.append("<h2>Pool</h2>")
    parts.append(_table(list(counts), [list(counts.values())]))
    parts.append("<h2>Score histograms by ground truth</h2><img src='scores.png' alt='scores'>")
    parts.append("<h2>Noise detection</h2>")
    parts.append(
        "<p>Positives: misaligned and generic captions. Negatives: clean pairs and correct "
        "captions of rare concepts. Near-duplicates are left out of this task and shown per "
        "fault below. The selection is a yes/no score (kept or dropped): its AUROC is "
        "(TPR + 1 − FPR) / 2 at a single point, so a selection that keeps a small share of the "
        "pool drops many good pairs and scores well below the ranking metrics.</p>"
    )
    parts.append("<img src='roc.png' alt='roc'>")
    faults = [f for f in FAULT_ORDER[1:] if f in next(iter(a["auroc_by_fault"].values()))]
    rows = [
        [name, a["auroc"][name], *[a["auroc_by_fault"][name].get(f, float("nan")) for f in faults]]
        for name in a["auroc"]
    ]
    parts.append(_table(["metric", "noise AUROC", *[f"{f} vs clean" for f in faults]], rows))
    parts.append(
        "<p class='note'>Per-fault columns: AUROC of telling that group from clean pairs by a "
        "low score. For rare (good data), above 0.5 means the metric under-rates it.</p>"
    )
    sel = a["selection"]
    parts.append(
        _table(
            ["kept of pool", *FAULT_ORDER],
            [[f"{sel['kept']} / {sel['pool']}", *[sel["kept_by_fault"][f] for f in FAULT_ORDER]]],
        )
    )
    if report.get("duplicates"):
        parts += _duplicates_section(report["duplicates"])
    sweep = report.get("tau_sweep") or []
    if sweep:
        parts.append("<h2>negclip temperature sweep</h2><img src='tau_sweep.png' alt='tau'>")
        parts.append(
            "<p class='note'>negclip recomputed from the stored embeddings at each τ with the "
            "score stage's batching (B, K, seed); the teacher's τ is the one the pipeline "
            "used.</p>"
        )
        keys = [f for f in FAULT_ORDER[1:] if f in sweep[0].get("by_fault", {})]
        rows = [
            [r["label"], r["tau"], r["auroc"], *[r["by_fault"][f] for f in keys]] for r in sweep
        ]
        rows.append(
            [
                "clipscore",
                "–",
                a["auroc"]["clipscore"],
                *[a["auroc_by_fault"]["clipscore"].get(f, float("nan")) for f in keys],
            ]
        )
        parts.append(_table(["τ", "value", "noise AUROC", *keys], rows))
    overlap = report.get("overlap")
    if overlap:
        parts.append("<h2>Subset overlap</h2>")
        parts.append(
            _table(
                ["subsets", "size a", "size b", "intersection", "Jaccard"],
                [[k, v["a"], v["b"], v["intersection"], v["jaccard"]] for k, v in overlap.items()],
            )
        )
    target = a.get("target")
    if target:
        parts.append("<h2>Target relevance (NormSim)</h2><img src='target.png' alt='target'>")
        shares = target["relevant_share"]
        parts.append(
            _table(
                ["", *shares],
                [
                    ["target-like share", *shares.values()],
                    ["mean normsim_inf", *target["mean_normsim"].values()],
                ],
            )
        )
    distilled = report.get("distilled")
    if distilled:
        parts.append("<h2>Distilled pairs</h2><img src='distilled.png' alt='distilled'>")
        parts.append(
            "<p class='note'>Each synthetic text embedding is shown as the real caption "
            "nearest to it (cosine in the text encoder's space).</p>"
        )
        parts.append(
            _table(
                ["#", "nearest real caption", "cosine"],
                [[i, c, s] for i, (c, s) in enumerate(distilled["captions"])],
            )
        )
    retrieval = report.get("retrieval")
    if retrieval:
        parts.append("<h2>Retrieval on the test split</h2><img src='retrieval.png' alt='recall'>")
        rows = []
        for name, entry in retrieval.items():
            cells = [
                f"{entry[k]['mean']:.1f} ± {entry[k].get('std', 0.0):.1f}" for k in RECALL_KEYS
            ]
            label = SET_LABELS.get(name, name)
            rows.append([label, entry.get("pairs", ""), *cells, f"{recall_mean(entry):.1f}"])
        parts.append(_table(["trained on", "pairs", *RECALL_KEYS, "mean"], rows))
        parts.append(
            "<p class='note'>Figures after the last epoch (nothing selected on test data); ± is "
            "the std over evaluation students. MTT is the same distillation with S fixed to I and "
            "cross-entropy, so LoRS − MTT is what the learned similarity adds; each random "
            "student trains on its own draw of real pairs.</p>"
        )
    details = report.get("details")
    if details:
        parts.append("<h2>Run</h2>")
        parts.append(_table(["", "value"], [[k, v] for k, v in details.items()]))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _duplicates_section(d: Mapping[str, Any]) -> list[str]:
    """Duplicate detection per metric, and the duplicates kept with and without dedup."""
    alone = d["dedup_rule_alone"]
    return [
        "<h2>Duplicates</h2>",
        f"<p>{d['groups']} groups of copies of one image and caption under other uids, "
        f"{d['copies']} copies in all. As in the dedup literature, N copies of one pair are "
        f"N - 1 duplicates ({d['injected']} here): one copy per group is the pair itself, and "
        "any deduplication keeps one. Which copy stays is arbitrary, so each metric keeps the "
        "copy it ranks best.</p>",
        _table(
            ["metric", "AUROC, duplicates vs clean", "AUROC, every copy vs clean"],
            [[k, v["duplicates"], v["every_copy"]] for k, v in d["auroc"].items()],
        ),
        _table(
            ["kept by the selection", "duplicates", "copies"],
            [
                ["without the dedup rule", d["kept_without_dedup"], d["copies_kept_without_dedup"]],
                [f"with {d['rule']}", d["kept_with_dedup"], d["copies_kept_with_dedup"]],
                [f"{d['rule']} alone", alone["duplicates_kept"], alone["copies_kept"]],
            ],
        ),
        f"<p>{html.escape(d['rule'])} alone drops {alone['clean_dropped']} of the "
        f"{alone['clean']} clean pairs.</p>",
    ]


def render_report(report: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write the PNGs and report.html into OUT_DIR; returns the HTML path.

    `report` holds `analysis` (from `analyse`), `scores`, `faults`, and optionally `tau_sweep`,
    `normsim`/`relevant`, `distilled` ({"images": uint8 (N,H,W,3), "captions": [(str, cos)]}),
    `retrieval`, `overlap`, `notes`, `details` and `title`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    a = report["analysis"]
    plot_scores(report["scores"], report["faults"], out / "scores.png")
    plot_roc(a, out / "roc.png")
    if report.get("tau_sweep"):
        plot_tau_sweep(report["tau_sweep"], a["auroc"]["clipscore"], out / "tau_sweep.png")
    if a.get("target"):
        plot_target(report["normsim"], report["relevant"], a["target"], out / "target.png")
    if report.get("distilled"):
        d = report["distilled"]
        plot_distilled(d["images"], [c for c, _ in d["captions"]], out / "distilled.png")
    if report.get("retrieval"):
        plot_retrieval(report["retrieval"], out / "retrieval.png")
    path = out / "report.html"
    write_bytes_atomic(path, render_html(report).encode())
    return path
