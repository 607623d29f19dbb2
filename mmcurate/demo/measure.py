"""Measuring a demo run against its ground truth: scores joined to the injected faults, the
selection's stages, a τ sweep of negclip, the distilled set and the retrieval figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmcurate.curate.scores import negclip_scores
from mmcurate.curate.select import SelectConfig, select
from mmcurate.data.store import finished_stems, read_stem
from mmcurate.data.subset import load_subset
from mmcurate.data.uid import member_mask, uid_pairs
from mmcurate.demo.analysis import (
    analyse,
    duplicate_aurocs,
    duplicates_kept,
    fault_aurocs,
    noise_mask,
)
from mmcurate.distill.artifact import load_artifact
from mmcurate.distill.students import denormalize_images
from mmcurate.errors import UsageError
from mmcurate.metrics.auroc import detection_auroc
from mmcurate.metrics.overlap import overlap

TAU_SWEEP = (0.01, None, 0.1, 1.0)
DEDUP_RULE = "semdedup<=0.999"  # copies score 0.999 99; distinct clean renders up to 0.9995
KEEP = ("negclip:0.3", DEDUP_RULE, "normsim_inf:0.2")


def _pool_table(run: Path, truth: dict) -> dict[str, np.ndarray]:
    """Score columns of every pool pair, joined to its ground truth by uid."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in sorted((run / "score").glob("*.scores.parquet"))]
    scores = pa.concat_tables(tables)
    uids = scores.column("uid").to_pylist()
    rows = [truth[u] for u in uids]
    return {
        "uid": np.array(uids),
        "fault": np.array([r["fault"] for r in rows]),
        "relevant": np.array([r["target_relevant"] for r in rows], dtype=bool),
        "dup_group": np.array([r["dup_group"] for r in rows]),
        **{
            name: scores.column(name).to_numpy().astype(np.float64)
            for name in ("clipscore", "negclip", "normsim_inf", "semdedup")
        },
    }


def _member(uids: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """Which pool rows (unique uids) are in a subset."""
    return member_mask(uid_pairs(list(uids)), subset)


def _subset_after(scores_dir: Path, rules: list[str]) -> np.ndarray:
    subset, _ = select(str(scores_dir), SelectConfig(keep=tuple(rules)), progress=False)
    return subset


def duplicate_figures(run: Path, table: dict, selected: np.ndarray) -> dict:
    """How each metric finds the injected duplicates, and how many the selection keeps with
    and without the dedup rule (semdedup's quality is its negation: unique is good). Counts
    follow the dedup literature: N copies of one pair are N - 1 duplicates."""
    quality = {
        "clipscore": table["clipscore"],
        "negclip": table["negclip"],
        "semdedup": -table["semdedup"],
    }
    rules = [r for r in KEEP if r != DEDUP_RULE]
    without = _member(table["uid"], _subset_after(run / "score", rules))
    dedup_only = _member(table["uid"], _subset_after(run / "score", [DEDUP_RULE]))
    faults, groups = table["fault"], table["dup_group"]
    is_copy = faults == "duplicate"
    copies, n_groups = int(is_copy.sum()), int(len(np.unique(groups[is_copy])))
    return {
        "rule": DEDUP_RULE,
        "auroc": {k: duplicate_aurocs(q, faults, groups) for k, q in quality.items()},
        "injected": copies - n_groups,
        "copies": copies,
        "groups": n_groups,
        "kept_without_dedup": duplicates_kept(without, groups),
        "kept_with_dedup": duplicates_kept(selected, groups),
        "copies_kept_without_dedup": int((without & is_copy).sum()),
        "copies_kept_with_dedup": int((selected & is_copy).sum()),
        "dedup_rule_alone": {
            "duplicates_kept": duplicates_kept(dedup_only, groups),
            "copies_kept": int((dedup_only & is_copy).sum()),
            "clean_dropped": int((~dedup_only & (faults == "clean")).sum()),
            "clean": int((faults == "clean").sum()),
        },
    }


def tau_sweep(run: Path, table: dict, teacher_tau: float, batch: int, k: int, seed: int) -> list:
    """negclip's noise-detection AUROC at each τ of the sweep, from the stored embeddings."""
    store = run / "embed" / "store"
    uids, imgs, txts = [], [], []
    for stem in finished_stems(store):
        meta, arrays = read_stem(store, stem, ["img", "txt"])
        uids += meta.column("uid").to_pylist()
        imgs.append(np.asarray(arrays["img"], dtype=np.float32))
        txts.append(np.asarray(arrays["txt"], dtype=np.float32))
    if uids != table["uid"].tolist():
        raise UsageError("the demo store and its score sidecars disagree on the pool's rows")
    img, txt = np.concatenate(imgs), np.concatenate(txts)
    rows, noise = noise_mask(table["fault"])
    sweep = []
    for tau in TAU_SWEEP:
        label = f"{tau:g}" if tau is not None else f"teacher ({teacher_tau:.3g})"
        value = float(tau if tau is not None else teacher_tau)
        scores = negclip_scores(img, txt, tau=value, batch_size=batch, k=k, seed=(seed, 0))
        sweep.append(
            {
                "tau": value,
                "label": label,
                "auroc": detection_auroc(scores[rows], noise[rows]),
                "by_fault": fault_aurocs(scores, table["fault"]),
            }
        )
    return sweep


def _distilled_view(run: Path) -> dict | None:
    import torch

    path = run / "distill" / "distilled.pt"
    captions_path = run / "distill" / "export" / "captions.json"
    if not path.is_file() or not captions_path.is_file():
        return None
    art = load_artifact(path)
    cfg = art["config"]
    pixels = denormalize_images(art["images"].float(), cfg["mean"], cfg["std"])
    images = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    rows = json.loads(captions_path.read_text())
    return {"images": images, "captions": [(r["caption"], r["cosine"]) for r in rows]}


def _retrieval(run: Path) -> dict:
    out = {}
    for name in ("distilled", "mtt", "random", "full"):
        path = run / "evaluate" / f"{name}.json"
        if path.is_file():
            entry = json.loads(path.read_text())
            out[name] = {k: v for k, v in entry.items() if k not in ("runs",)}
    return out


def measure(
    root: Path, data: dict, negclip: tuple[int, int], seed: int, pipeline_report: dict
) -> dict:
    """Everything the report shows, from the run's files and the ground truth (negclip: B, K)."""
    run = root / "run"
    truth = {r["uid"]: r for r in json.loads(Path(data["ground_truth"]).read_text())["samples"]}
    table = _pool_table(run, truth)
    score_summary = pipeline_report["score"]["summary"] or {}
    tau = float(score_summary.get("tau") or data["teacher_stats"]["tau"])
    final = load_subset(run / "select" / "subset.npy")
    after_negclip = _subset_after(run / "score", [KEEP[0]])
    by_clipscore = _subset_after(run / "score", ["clipscore:0.3"])
    selected = _member(table["uid"], final)
    analysis = analyse(
        {"clipscore": table["clipscore"], "negclip": table["negclip"]},
        table["fault"],
        selected,
        relevant=table["relevant"],
        normsim=table["normsim_inf"],
        stage_masks={
            "after negclip:0.3": _member(table["uid"], after_negclip),
            "final subset": selected,
            "clipscore:0.3 (comparison)": _member(table["uid"], by_clipscore),
        },
    )
    sweep = tau_sweep(run, table, tau, *negclip, seed)
    duplicates = duplicate_figures(run, table, selected)
    return {
        "table": table,
        "analysis": analysis,
        "tau": tau,
        "tau_sweep": sweep,
        "overlap": {
            "negclip:0.3 vs clipscore:0.3": overlap(after_negclip, by_clipscore),
            "final subset vs negclip:0.3": overlap(final, after_negclip),
        },
        "duplicates": duplicates,
        "distilled": _distilled_view(run),
        "retrieval": _retrieval(run),
    }
