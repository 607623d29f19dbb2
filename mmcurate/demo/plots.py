"""The demo report's ground-truth figures: one PNG file per plot (drawn as `mmcurate.report`
draws its own)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.data.atomic import write_bytes_atomic
from mmcurate.demo.analysis import FAULT_COLOURS, FAULT_ORDER, SET_LABELS
from mmcurate.metrics.retrieval import RECALL_KEYS
from mmcurate.report.figures import png_bytes, pyplot


def _save(fig, path: Path) -> None:
    write_bytes_atomic(path, png_bytes(fig))


def plot_scores(scores: Mapping[str, np.ndarray], faults: np.ndarray, path: Path) -> None:
    """Histograms of each metric, one colour per fault category."""
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.2, 3.4))
    normsim, relevant = np.asarray(normsim, dtype=np.float64), np.asarray(relevant, dtype=bool)
    bins = np.linspace(normsim.min(), normsim.max(), 41)
    left.hist(normsim[relevant], bins=bins, alpha=0.7, density=True, label="target-like")
    left.hist(normsim[~relevant], bins=bins, alpha=0.7, density=True, label="other")
    left.set_title(f"normsim_inf (AUROC {target['auroc']:.3f})")
    left.set_xlabel("normsim_inf")
    left.legend(fontsize=8)
    shares = target["relevant_share"]
    labels = ["\n".join(textwrap.wrap(name, 18)) for name in shares]
    right.barh(labels[::-1], [100 * v for v in list(shares.values())[::-1]], color="#4c72b0")
    right.set_xlabel("target-like pairs (%)")
    right.tick_params(axis="y", labelsize=8)
    right.set_title("share of target-like pairs")
    _save(fig, path)


def plot_distilled(images: np.ndarray, captions: Sequence[str], path: Path) -> None:
    """The distilled images in a grid, each with its decoded (nearest real) caption."""
    plt = pyplot()
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
    plt = pyplot()
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
