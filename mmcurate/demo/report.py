"""The demo report: report.html with its PNGs, and the headline table for the terminal.

`render_report` draws the ground-truth PNGs (`demo.plots`) and writes the page beside them:
the ground-truth sections, then `mmcurate report`'s own sections for the demo's scored pool
(one report module, `mmcurate.report`); `terminal_table` prints the headline figures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.data.atomic import read_json_dict, write_bytes_atomic
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
from mmcurate.report import ReportConfig, build_sections
from mmcurate.report.html import Markup, heading, img, page, para, table


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


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Markup:
    """A table whose float cells show three decimals (NaN as a dash)."""
    return table(header, [[_fmt(c) for c in row] for row in rows])


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "–" if np.isnan(value) else f"{value:.3f}"
    return value


def _section(title: str, image: str | None = None) -> list[Markup]:
    """A heading and, when given, the PNG file beside the page."""
    parts = [heading(2, title)]
    if image:
        parts.append(img(image, image.removesuffix(".png")))
    return parts


def render_html(report: Mapping[str, Any], pool_sections: Sequence[str] = ()) -> str:
    """The demo page: its ground-truth sections (PNGs referenced by file name), then the pool
    as `mmcurate report` shows any scored pool (`pool_sections`, images embedded)."""
    a = report["analysis"]
    parts: list[str] = [para(line, note=True) for line in report.get("notes", [])]
    counts = a["counts"]
    parts += _section("Pool by ground truth")
    parts.append(_table(list(counts), [list(counts.values())]))
    parts += _section("Score histograms by ground truth", "scores.png")
    parts += _section("Noise detection", "roc.png")
    parts.insert(
        -1,
        para(
            "Positives: misaligned and generic captions. Negatives: clean pairs and correct "
            "captions of rare concepts. Near-duplicates are left out of this task and shown per "
            "fault below. The selection is a yes/no score (kept or dropped): its AUROC is "
            "(TPR + 1 − FPR) / 2 at a single point, so a selection that keeps a small share of "
            "the pool drops many good pairs and scores well below the ranking metrics."
        ),
    )
    faults = [f for f in FAULT_ORDER[1:] if f in next(iter(a["auroc_by_fault"].values()))]
    rows = [
        [name, a["auroc"][name], *[a["auroc_by_fault"][name].get(f, float("nan")) for f in faults]]
        for name in a["auroc"]
    ]
    parts.append(_table(["metric", "noise AUROC", *[f"{f} vs clean" for f in faults]], rows))
    parts.append(
        para(
            "Per-fault columns: AUROC of telling that group from clean pairs by a low score. For "
            "rare (good data), above 0.5 means the metric under-rates it.",
            note=True,
        )
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
        parts += _section("negclip temperature sweep", "tau_sweep.png")
        parts.append(
            para(
                "negclip recomputed from the stored embeddings at each τ with the score stage's "
                "batching (B, K, seed); the teacher's τ is the one the pipeline used.",
                note=True,
            )
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
        parts += _section("Subset overlap")
        parts.append(
            _table(
                ["subsets", "size a", "size b", "intersection", "Jaccard"],
                [[k, v["a"], v["b"], v["intersection"], v["jaccard"]] for k, v in overlap.items()],
            )
        )
    target = a.get("target")
    if target:
        parts += _section("Target relevance (NormSim)", "target.png")
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
        parts += _section("Distilled pairs", "distilled.png")
        parts.append(
            para(
                "Each synthetic text embedding is shown as the real caption nearest to it (cosine "
                "in the text encoder's space).",
                note=True,
            )
        )
        parts.append(
            _table(
                ["#", "nearest real caption", "cosine"],
                [[i, c, s] for i, (c, s) in enumerate(distilled["captions"])],
            )
        )
    if report.get("retrieval"):
        parts += _retrieval_section(report["retrieval"], report.get("regime"))
    details = report.get("details")
    if details:
        parts += _section("Run")
        parts.append(_table(["", "value"], [[k, v] for k, v in details.items()]))
    if pool_sections:
        parts += _section("The pool, as mmcurate report shows any scored pool")
        parts.append(
            para(
                "The same page `mmcurate report` writes for any scored pool, here on the demo's "
                "score sidecars, its subset and its pool shards.",
                note=True,
            )
        )
        parts += list(pool_sections)
    return page(report.get("title", "mmcurate report"), parts)


def _retrieval_section(retrieval: Mapping[str, Any], regime: str | None) -> list[str]:
    """R@K per training set, with the students' regime when the run names it."""
    title = "Retrieval on the test split"
    parts: list[str] = _section(f"{title} ({regime} regime)" if regime else title, "retrieval.png")
    rows = []
    for name, entry in retrieval.items():
        cells = [f"{entry[k]['mean']:.1f} ± {entry[k].get('std', 0.0):.1f}" for k in RECALL_KEYS]
        label = SET_LABELS.get(name, name)
        rows.append([label, entry.get("pairs", ""), *cells, f"{recall_mean(entry):.1f}"])
    parts.append(_table(["trained on", "pairs", *RECALL_KEYS, "mean"], rows))
    parts.append(
        para(
            "Figures after the last epoch (nothing selected on test data); ± is the std over "
            "evaluation students. MTT is the same distillation with S fixed to I and "
            "cross-entropy, so LoRS − MTT is what the learned similarity adds; each random "
            "student trains on its own draw of real pairs.",
            note=True,
        )
    )
    return parts


def _duplicates_section(d: Mapping[str, Any]) -> list[str]:
    """Duplicate detection per metric, and the duplicates kept with and without dedup."""
    alone = d["dedup_rule_alone"]
    return [
        heading(2, "Duplicates"),
        para(
            f"{d['groups']} groups of copies of one image and caption under other uids, "
            f"{d['copies']} copies in all. As in the dedup literature, N copies of one pair are "
            f"N - 1 duplicates ({d['injected']} here): one copy per group is the pair itself, "
            "and any deduplication keeps one. Which copy stays is arbitrary, so each metric keeps "
            "the copy it ranks best."
        ),
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
        para(
            f"{d['rule']} alone drops {alone['clean_dropped']} of the {alone['clean']} clean pairs."
        ),
    ]


def pool_sections(out: Path, title: str) -> list[str]:
    """The generic report's sections for the demo run under `out` (none without a scored run):
    its score sidecars, its final subset and the pool shards named in pipeline.toml, each card
    tagged with its ground truth."""
    scores = out / "run" / "score"
    if not any(scores.glob("*.scores.parquet")):
        return []
    subset = out / "run" / "select" / "subset.npy"
    shards: tuple[str, ...] = ()
    config_path = out / "pipeline.toml"
    if config_path.is_file():
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        embed = tomllib.loads(config_path.read_text()).get("embed") or {}
        shards = tuple(str(s) for s in embed.get("src") or ())
    config = ReportConfig(
        subset=str(subset) if subset.is_file() else None, shards=shards, title=title
    )
    return build_sections(scores, config, ground_truth_tags(out))[0]


def ground_truth_tags(out: Path) -> dict[str, str]:
    """Each pool uid's injected fault (and whether it is target-like), for the report's cards."""
    truth = read_json_dict(out / "data" / "corpus" / "ground_truth.json") or {}
    tags = {}
    for row in truth.get("samples") or []:
        like = ", target-like" if row.get("target_relevant") else ""
        tags[row["uid"]] = f"ground truth: {row['fault']}{like}"
    return tags


def render_report(report: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write the PNGs and report.html into OUT_DIR; returns the HTML path.

    `report` holds `analysis` (from `analyse`), `scores`, `faults`, and optionally `tau_sweep`,
    `normsim`/`relevant`, `distilled` ({"images": uint8 (N,H,W,3), "captions": [(str, cos)]}),
    `retrieval` (and the students' `regime`), `overlap`, `notes`, `details` and `title`. When
    OUT_DIR holds a scored demo run, the page ends with `mmcurate report`'s sections for it.
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
    sections = pool_sections(out, report.get("title", "mmcurate report"))
    path = out / "report.html"
    write_bytes_atomic(path, render_html(report, sections).encode())
    return path
