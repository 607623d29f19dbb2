"""AUROC against a brute-force pairwise count, ROC/area consistency, overlap, and the report."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmcurate.demo.analysis import analyse
from mmcurate.demo.report import render_report, terminal_table
from mmcurate.metrics.auroc import auroc, curve_area, detection_auroc, roc_curve
from mmcurate.metrics.overlap import overlap


def brute_auroc(scores, labels) -> float:
    """Every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-4, 4).map(lambda v: v / 2), st.booleans()), min_size=2, max_size=60
    )
)
def test_auroc_matches_brute_force_with_ties(rows):
    scores = [s for s, _ in rows]
    labels = [y for _, y in rows]
    if all(labels) or not any(labels):
        assert np.isnan(auroc(scores, labels))
        return
    expected = brute_auroc(scores, labels)
    assert auroc(scores, labels) == pytest.approx(expected, abs=1e-12)
    fpr, tpr, _ = roc_curve(scores, labels)
    assert curve_area(fpr, tpr) == pytest.approx(expected, abs=1e-12)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_auroc_known_values():
    assert auroc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert auroc([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0]) == 0.0
    assert auroc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5
    # low quality flags a fault: detection_auroc negates
    assert detection_auroc([0.9, 0.8, 0.1], [False, False, True]) == 1.0
    with pytest.raises(ValueError):
        auroc([0.1, np.nan], [0, 1])


def test_binary_score_gives_one_interior_point():
    kept = np.array([1, 1, 1, 0, 0, 0, 1, 0], dtype=float)
    noise = np.array([0, 0, 0, 1, 1, 0, 1, 1], dtype=bool)
    fpr, tpr, _ = roc_curve(-kept, noise)
    assert len(fpr) == 3
    assert curve_area(fpr, tpr) == pytest.approx(brute_auroc(-kept, noise))


def test_overlap_and_jaccard_on_uid_pairs():
    dt = np.dtype("u8,u8")
    a = np.array([(1, 1), (1, 2), (3, 4)], dtype=dt)
    b = np.array([(1, 2), (3, 4), (5, 6), (7, 8)], dtype=dt)
    o = overlap(a, b)
    assert (o["intersection"], o["union"]) == (2, 5)
    assert o["jaccard"] == pytest.approx(0.4)
    assert o["a_in_b"] == pytest.approx(2 / 3)
    assert overlap(["x", "y", "y"], np.array(["y", "z"]))["jaccard"] == pytest.approx(1 / 3)
    assert np.isnan(overlap([], [])["jaccard"])
    rng = np.random.default_rng(0)
    big_a = np.array([tuple(p) for p in rng.integers(0, 50, (300, 2))], dtype=dt)
    big_b = np.array([tuple(p) for p in rng.integers(0, 50, (300, 2))], dtype=dt)
    as_tuples = overlap([tuple(p) for p in big_a.tolist()], [tuple(p) for p in big_b.tolist()])
    assert overlap(big_a, big_b) == as_tuples


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.stack: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.stack.append(tag)
        if tag == "table":
            self.tables += 1

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack}"
        self.stack.pop()


def _synthetic_report(rng: np.random.Generator) -> dict:
    faults = np.array(
        ["clean"] * 120 + ["misaligned"] * 30 + ["generic"] * 25 + ["duplicate"] * 16 + ["rare"] * 9
    )
    noise = np.isin(faults, ["misaligned", "generic"])
    clip = rng.normal(0.3, 0.05, len(faults)) - 0.1 * noise
    neg = clip + rng.normal(0, 0.02, len(faults))
    normsim = rng.uniform(0.2, 0.9, len(faults))
    relevant = normsim + rng.normal(0, 0.1, len(faults)) > 0.7
    selected = neg >= np.quantile(neg, 0.6)
    scores = {"clipscore": clip, "negclip": neg, "normsim_inf": normsim}
    analysis = analyse(
        {"clipscore": clip, "negclip": neg},
        faults,
        selected,
        relevant=relevant,
        normsim=normsim,
        stage_masks={"negclip": neg >= np.median(neg), "final": selected},
    )
    entry = {
        k: {"mean": float(rng.uniform(0, 50)), "std": 1.0}
        for k in ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10")
    }
    return {
        "title": "synthetic <report> & check",
        "analysis": analysis,
        "scores": scores,
        "faults": faults,
        "normsim": normsim,
        "relevant": relevant,
        "tau_sweep": [
            {"tau": t, "label": lab, "auroc": 0.9, "by_fault": {"generic": 0.8}}
            for t, lab in ((0.01, "0.01"), (0.07, "teacher"), (0.1, "0.1"), (1.0, "1"))
        ],
        "distilled": {
            "images": rng.integers(0, 255, (7, 8, 8, 3), dtype=np.uint8),
            "captions": [(f"caption <{i}>", 0.5) for i in range(7)],
        },
        "retrieval": {
            "distilled": {**entry, "pairs": 7},
            "mtt": {**{k: {"mean": 10.0 + i, "std": 0.5} for i, k in enumerate(entry)}, "pairs": 7},
            "random": {**entry, "pairs": 7},
        },
        "overlap": {"clipscore vs negclip": overlap(["a", "b"], ["b", "c"])},
        "details": {"seed": 0},
    }


def test_report_html_parses_and_every_image_exists(tmp_path: Path):
    report = _synthetic_report(np.random.default_rng(0))
    path = render_report(report, tmp_path)
    text = path.read_text()
    parser = _Collector()
    parser.feed(text)
    parser.close()
    assert parser.stack == ["html"] or parser.stack == []
    assert parser.tables >= 5
    assert len(parser.images) == 6
    for src in parser.images:
        png = tmp_path / src
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    assert "&lt;report&gt; &amp; check" in text and "caption &lt;3&gt;" in text
    json.dumps(report["analysis"])


def test_analysis_figures_match_direct_computation():
    rng = np.random.default_rng(1)
    report = _synthetic_report(rng)
    a = report["analysis"]
    faults = report["faults"]
    rows = np.isin(faults, ["clean", "rare", "misaligned", "generic"])
    noise = np.isin(faults, ["misaligned", "generic"])
    clip = report["scores"]["clipscore"]
    assert a["auroc"]["clipscore"] == pytest.approx(brute_auroc(-clip[rows], noise[rows]))
    gen = (faults == "generic") | (faults == "clean")
    assert a["auroc_by_fault"]["clipscore"]["generic"] == pytest.approx(
        brute_auroc(-clip[gen], faults[gen] == "generic")
    )
    neg = report["scores"]["negclip"]
    selected = neg >= np.quantile(neg, 0.6)
    assert a["selection"]["kept"] == int(selected.sum())
    assert a["auroc"]["selection"] == pytest.approx(
        brute_auroc(-selected[rows].astype(float), noise[rows])
    )
    table = terminal_table({"auroc": a["auroc"], "retrieval": report["retrieval"], "tau": 0.07})
    assert "clipscore" in table and "negclip" in table and "distilled (7 pairs)" in table
    mtt = [line for line in table.splitlines() if "MTT (S = I, CE) (7 pairs)" in line]
    assert len(mtt) == 1 and mtt[0].split()[-7:] == [
        "10.0", "11.0", "12.0", "13.0", "14.0", "15.0", "12.5"
    ]  # fmt: skip
