"""The demo report: report.html with its PNGs, and the headline table for the terminal.

`render_report` draws the PNGs with matplotlib's Agg backend and writes a self-contained HTML
page beside them; `terminal_table` prints the headline figures. Nothing here knows how the
arrays were produced.
"""

from __future__ import annotations

import html
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.data.atomic import write_bytes_atomic
from mmcurate.demo.analysis import FAULT_COLOURS, FAULT_ORDER, recall_mean
from mmcurate.metrics.retrieval import RECALL_KEYS

SET_LABELS = {
    "distilled": "LoRS distilled",
    "mtt": "MTT (S = I, CE)",
    "random": "random real",
    "full": "full subset",
}


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


# ----------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    write_bytes_atomic(path, buf.getvalue())


def plot_scores(scores: Mapping[str, np.ndarray], faults: np.ndarray, path: Path) -> None:
    """Histograms of each metric, one colour per fault category."""
    plt = _pyplot()
    names = list(scores)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = np.asarray(scores[name], dtype=np.float64)
        bins = np.linspace(values.min(), values.max(), 41) if len(values) else 10
        for fault in FAULT_ORDER:
            part = values[np.asarray(faults) == fault]
            if len(part):
                ax.hist(
                    part,
                    bins=bins,
                    histtype="step",
                    linewidth=1.6,
                    density=True,
                    color=FAULT_COLOURS[fault],
                    label=f"{fault} ({len(part)})",
                )
        ax.set_title(name)
        ax.set_xlabel("score")
    axes[0][0].set_ylabel("density")
    axes[0][-1].legend(fontsize=8)
    _save(fig, path)


def plot_roc(analysis: Mapping[str, Any], path: Path) -> None:
    """Noise-detection ROC curves with their AUROC in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, curve in analysis["roc"].items():
        style = {"marker": "o"} if name == "selection" else {}
        ax.plot(
            curve["fpr"],
            curve["tpr"],
            label=f"{name} (AUROC {analysis['auroc'][name]:.3f})",
            **style,
        )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate (good pairs flagged)")
    ax.set_ylabel("true positive rate (noise flagged)")
    ax.set_title("noise detection")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def plot_tau_sweep(sweep: Sequence[Mapping[str, Any]], clip: float, path: Path) -> None:
    """negclip's AUROC against τ (log axis), with CLIPScore as a horizontal line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    taus = [row["tau"] for row in sweep]
    ax.plot(taus, [row["auroc"] for row in sweep], marker="o", label="negclip: noise")
    generic = [row.get("by_fault", {}).get("generic") for row in sweep]
    if all(g is not None for g in generic):
        ax.plot(taus, generic, marker="s", linestyle="--", label="negclip: generic only")
    ax.axhline(clip, color="black", linestyle=":", label=f"clipscore ({clip:.3f})")
    for row in sweep:
        ax.annotate(
            row["label"],
            (row["tau"], row["auroc"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("τ")
    ax.set_ylabel("AUROC")
    ax.set_title("negclip temperature sweep")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_target(
    normsim: np.ndarray, relevant: np.ndarray, target: Mapping[str, Any], path: Path
) -> None:
    """NormSim of relevant vs other pool pairs, and the relevant share after each stage."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.2, 3.4))
    normsim, relevant = np.asarray(normsim, dtype=np.float64), np.asarray(relevant, dtype=bool)
    bins = np.linspace(normsim.min(), normsim.max(), 41)
    left.hist(normsim[relevant], bins=bins, alpha=0.7, density=True, label="target-like")
    left.hist(normsim[~relevant], bins=bins, alpha=0.7, density=True, label="other")
    left.set_title(f"normsim_inf (AUROC {target['auroc']:.3f})")
    left.set_xlabel("normsim_inf")
    left.legend(fontsize=8)
    shares = target["relevant_share"]
    right.bar(list(shares), [100 * v for v in shares.values()], color="#4c72b0")
    right.set_ylabel("target-like pairs (%)")
    right.set_title("share of target-like pairs")
    _save(fig, path)


def plot_distilled(images: np.ndarray, captions: Sequence[str], path: Path) -> None:
    """The distilled images in a grid, each with its decoded (nearest real) caption."""
    plt = _pyplot()
    n = len(images)
    cols = min(5, max(1, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.5 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
            ax.set_title("\n".join(textwrap.wrap(captions[i], 24)[:3]), fontsize=7)
    _save(fig, path)


def plot_retrieval(retrieval: Mapping[str, Any], path: Path) -> None:
    """Grouped bars of R@K for each training set."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    names = list(retrieval)
    width = 0.8 / max(1, len(names))
    x = np.arange(len(RECALL_KEYS))
    for i, name in enumerate(names):
        means = [retrieval[name][k]["mean"] for k in RECALL_KEYS]
        stds = [retrieval[name][k].get("std", 0.0) for k in RECALL_KEYS]
        ax.bar(x + i * width, means, width, yerr=stds, label=SET_LABELS.get(name, name), capsize=2)
    ax.set_xticks(x + width * (len(names) - 1) / 2, RECALL_KEYS)
    ax.set_ylabel("recall (%)")
    ax.legend(fontsize=8)
    _save(fig, path)


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
        f"<p>{d['injected']} injected duplicates: {d['groups']} groups of copies of one image "
        "and caption under other uids. Any deduplication keeps one copy per group, so the "
        "redundant copies are each group's copies but the one the metric ranks best.</p>",
        _table(
            ["metric", "AUROC, every copy vs clean", "AUROC, redundant copies vs clean"],
            [[k, v["all_copies"], v["redundant_copies"]] for k, v in d["auroc"].items()],
        ),
        _table(
            ["duplicates kept by the selection", "count"],
            [
                ["without the dedup rule", d["kept_without_dedup"]],
                [f"with {d['rule']}", d["kept_with_dedup"]],
                [f"{d['rule']} alone", alone["duplicates_kept"]],
                [
                    f"clean pairs {d['rule']} alone drops",
                    f"{alone['clean_dropped']} of {alone['clean']}",
                ],
            ],
        ),
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
