"""The demo: faulty corpus ground truth, the tiny teacher, and a reduced end-to-end run."""

from __future__ import annotations

import base64
import json
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli

from mmcurate.data.shards import expand_sources, iter_samples
from mmcurate.demo.faults import (
    DUPLICATE_GROUP,
    GENERIC_CAPTIONS,
    RARE_COLOUR,
    TARGET_COLOURS,
    DemoSizes,
    make_teacher_split,
    write_demo_corpus,
)
from mmcurate.demo.teacher import (
    TeacherConfig,
    build_model,
    encode_text_prefix,
    pixels_to_input,
    save_teacher,
    train_teacher,
)
from mmcurate.distill.artifact import load_artifact
from mmcurate.distill.buffers import load_buffers
from mmcurate.distill.data import load_pairs
from mmcurate.distill.evaluate import architecture, is_mtt_of, mtt_artifact
from mmcurate.distill.evaluate_stage import tower_pins
from mmcurate.engine import pinned


def test_corpus_ground_truth_matches_the_shards(tmp_path):
    sizes = DemoSizes(train=100, pool=300, target=30, test=40, pool_shards=3)
    paths = write_demo_corpus(tmp_path, sizes, seed=7)
    truth = json.loads(Path(paths["ground_truth"]).read_text())["samples"]
    by_uid = {r["uid"]: r for r in truth}
    assert len(by_uid) == sizes.pool
    counts = Counter(r["fault"] for r in truth)
    assert dict(counts) == sizes.fault_counts()
    duplicates = counts["duplicate"] // DUPLICATE_GROUP * (DUPLICATE_GROUP - 1)
    assert duplicates == round(sizes.shares["duplicate"] * sizes.pool)  # N - |C|

    samples = [s for url in expand_sources([paths["pool"]]) for s in iter_samples(url)]
    assert len(samples) == sizes.pool
    groups: dict[int, list[dict]] = {}
    for s in samples:
        row = by_uid[s["uid"]]
        concept = s["json"]["concept"]
        assert s["json"]["ground_truth"]["fault"] == row["fault"]
        assert s["caption"] == row["caption"]
        assert row["target_relevant"] == (concept["colour"] in TARGET_COLOURS)
        if row["fault"] == "generic":
            assert s["caption"] in GENERIC_CAPTIONS
        elif row["fault"] == "misaligned":
            words = s["caption"].replace(",", " ").split()
            assert not (concept["shape"] in words and concept["colour"] in words)
        else:
            for key in ("shape", "colour", "size", "position"):
                assert concept[key] in s["caption"], (row["fault"], s["caption"])
        assert (concept["colour"] == RARE_COLOUR) == (row["fault"] == "rare")
        if row["fault"] == "duplicate":
            groups.setdefault(row["dup_group"], []).append(s)
    assert groups and all(len(g) == DUPLICATE_GROUP for g in groups.values())
    for members in groups.values():
        assert len({m["caption"] for m in members}) == 1
        assert len({json.dumps(m["json"]["concept"]) for m in members}) == 1
        assert len({m["image"] for m in members}) == 1  # copies of one image

    targets = list(iter_samples(paths["target"]))
    assert len(targets) == sizes.target and all(
        t["json"]["concept"]["colour"] in TARGET_COLOURS and t["caption"] is None for t in targets
    )
    test_uids = {s["uid"] for s in iter_samples(paths["test"])}
    assert len(test_uids) == sizes.test and not test_uids & set(by_uid)

    split = make_teacher_split(DemoSizes(train=2000), seed=7)
    generic = np.mean([c in GENERIC_CAPTIONS for c in split["captions"]])
    assert 0.12 < generic < 0.18


def test_teacher_trains_and_loads_as_an_encoder_spec(tmp_path):
    torch.set_num_threads(1)
    split = make_teacher_split(DemoSizes(train=256), seed=1)
    model, stats = train_teacher(
        split["images"], split["captions"], TeacherConfig(steps=25, batch_size=64, warmup=5)
    )
    assert stats["final_loss"] < stats["first_loss"]
    assert stats["tau"] == pytest.approx(1 / stats["logit_scale"])
    short = TeacherConfig(steps=3, batch_size=32, warmup=1)
    first, _ = train_teacher(split["images"][:64], split["captions"][:64], short)
    second, _ = train_teacher(split["images"][:64], split["captions"][:64], short)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name

    _, tokenizer = build_model()
    tokens = tokenizer(split["captions"][:16])
    with torch.no_grad():
        assert torch.allclose(
            encode_text_prefix(model, tokens), model.encode_text(tokens), atol=1e-5
        )

    from mmcurate.embed import load_encoder

    spec = save_teacher(model, tmp_path / "teacher.pt")
    assert spec == f"open_clip:mmc-tiny@{tmp_path / 'teacher.pt'}"
    encoder = load_encoder(spec, "cpu")
    assert encoder.logit_scale == pytest.approx(stats["logit_scale"], rel=1e-6)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        pixels = pixels_to_input(split["images"][:8], model)
        expected_img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
    assert torch.allclose(encoder.encode_texts(split["captions"][:16]), expected, atol=1e-5)
    assert torch.allclose(encoder.encode_images(pixels), expected_img, atol=1e-5)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def _brute_auroc(quality: np.ndarray, noise: np.ndarray) -> float:
    pos, neg = -quality[noise], -quality[~noise]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


@pytest.mark.slow
def _check_mtt_made_beside_lors(run: Path) -> None:
    """The distill stage made MTT beside LoRS; evaluate used that file (it made none of its
    own), and it is exactly what evaluate would have distilled from the LoRS artifact."""
    lors = load_artifact(run / "distill" / "distilled.pt")
    mtt = load_artifact(run / "distill" / "mtt.pt")
    assert not (run / "evaluate" / "mtt.pt").exists() and is_mtt_of(mtt, lors)
    arch = architecture(lors["config"])
    train = load_pairs(
        lors["config"]["data"],
        image_size=arch["image_size"],
        text_encoder=arch["text_encoder"],
        cache_dir=run / "cache",
        image_root=None,
        device="cpu",
        resize=arch["resize"],
    )
    buffers = load_buffers(lors["config"]["buffers"], tower_pins(lors["config"]))
    with pinned(1):  # as every demo process
        again = mtt_artifact(lors, train, buffers, progress=False)
    for key in ("images", "texts", "lr_img", "lr_txt"):
        assert torch.equal(torch.as_tensor(again[key]), torch.as_tensor(mtt[key])), key


def test_reduced_demo_writes_report_and_summary(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", out, "--size", "0.2", "--seed", "3", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # stderr is a pipe here, as in `mmcurate demo 2>log`: whole lines only, and few of them
    assert "\r" not in result.stderr and len(result.stderr.splitlines()) < 200
    needles = ("noise-detection AUROC", "clipscore", "negclip", "distilled", "MTT", "random")
    for needle in (*needles, "full"):
        assert needle in result.stdout, needle

    summary = json.loads((out / "summary.json").read_text())
    # the students' towers: pretrained apart on the clean split, named in the summary
    assert summary["regime"] == "pretrained"
    manifest = json.loads((out / "run" / "buffer" / "buffers.json").read_text())
    assert manifest["image_encoder"].endswith("data/image_tower.pt")
    assert manifest["text_encoder"].endswith("data/text_tower.pt")
    assert manifest["image_weights"] != "random" and manifest["text_weights"] != "random"
    # every retrieval figure is the mean/std over that set's evaluation students' own files
    assert sorted(summary["retrieval"]) == ["distilled", "full", "mtt", "random"]
    for name, entry in summary["retrieval"].items():
        students = sorted((out / "run" / "evaluate").glob(f"{name}.student*.json"))
        recalls = [json.loads(p.read_text())["recall"] for p in students]
        assert len(recalls) == summary["plan"]["num_eval"]
        for key in ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10"):
            values = [r[key] for r in recalls]
            assert entry[key]["mean"] == pytest.approx(np.mean(values), abs=1e-9)
            assert entry[key]["std"] == pytest.approx(np.std(values), abs=1e-9)
    assert summary["retrieval"]["full"]["pairs"] > summary["retrieval"]["distilled"]["pairs"]
    assert summary["retrieval"]["mtt"]["pairs"] == summary["retrieval"]["distilled"]["pairs"]
    _check_mtt_made_beside_lors(out / "run")

    # the headline AUROC, recomputed from the written sidecars and the ground-truth file
    truth = json.loads((out / "data" / "corpus" / "ground_truth.json").read_text())
    fault = {r["uid"]: r["fault"] for r in truth["samples"]}
    table = pa.concat_tables(
        [pq.read_table(p) for p in sorted((out / "run" / "score").glob("*.scores.parquet"))]
    )
    faults = np.array([fault[u] for u in table.column("uid").to_pylist()])
    rows = faults != "duplicate"
    noise = np.isin(faults, ["misaligned", "generic"])
    for metric in ("clipscore", "negclip"):
        quality = table.column(metric).to_numpy().astype(np.float64)
        assert summary["auroc"][metric] == pytest.approx(
            _brute_auroc(quality[rows], noise[rows]), abs=1e-12
        )
    # the selection's AUROC, from which samples the resharded subset actually holds
    kept = {
        s["uid"]
        for url in expand_sources([str(out / "run" / "reshard" / "*.tar")])
        for s in iter_samples(url)
    }
    selected = np.array([u in kept for u in table.column("uid").to_pylist()], dtype=np.float64)
    assert summary["auroc"]["selection"] == pytest.approx(
        _brute_auroc(selected[rows], noise[rows]), abs=1e-12
    )
    # duplicates: the figures again from the semdedup column and the resharded subset
    dups = summary["duplicates"]
    is_dup = faults == "duplicate"
    group_of = {r["uid"]: r["dup_group"] for r in truth["samples"]}
    groups = np.array([group_of[u] for u in table.column("uid").to_pylist()])
    n_groups = len(set(groups[is_dup].tolist()))
    assert dups["copies"] == int(is_dup.sum()) == n_groups * DUPLICATE_GROUP > 0
    assert dups["injected"] == n_groups * (DUPLICATE_GROUP - 1)
    assert dups["copies_kept_with_dedup"] == int((selected.astype(bool) & is_dup).sum())
    kept_per_group = Counter(groups[selected.astype(bool) & is_dup].tolist())
    assert dups["kept_with_dedup"] == sum(n - 1 for n in kept_per_group.values())
    kept_line = f"{dups['kept_without_dedup']} without the dedup rule, {dups['kept_with_dedup']} "
    assert kept_line in result.stdout
    semdedup = table.column("semdedup").to_numpy().astype(np.float64)
    extra = is_dup.copy()
    for g in np.unique(groups[is_dup]):
        members = np.flatnonzero(groups == g)
        extra[members[np.argmin(semdedup[members])]] = False
    task = extra | (faults == "clean")
    assert dups["auroc"]["semdedup"]["duplicates"] == pytest.approx(
        _brute_auroc(-semdedup[task], extra[task]), abs=1e-12
    )
    teacher_row = [r for r in summary["tau_sweep"] if r["label"].startswith("teacher")]
    assert teacher_row and teacher_row[0]["auroc"] == pytest.approx(summary["auroc"]["negclip"])
    assert teacher_row[0]["tau"] == pytest.approx(summary["tau"])
    assert [r["tau"] for r in summary["tau_sweep"]][::2] == [0.01, 0.1]

    assert "Retrieval on the test split (pretrained regime)" in (out / "report.html").read_text()
    parser = _Images()
    parser.feed((out / "report.html").read_text())
    parser.close()
    assert {"scores.png", "roc.png", "tau_sweep.png", "distilled.png"} <= set(parser.images)
    for src in parser.images:  # the ground-truth PNG files, and report's embedded images
        if src.startswith("data:image/"):
            data = base64.b64decode(src.split(",", 1)[1])
            assert data[:4] == b"\x89PNG" or data[:3] == b"\xff\xd8\xff", src[:40]
        else:
            assert (out / src).read_bytes()[:4] == b"\x89PNG", src

    again = run_cli("demo", "--out", out, "--size", "0.2", "--seed", "3", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((out / "summary.json").read_text())
    assert set(second["stages"].values()) == {"skipped"}
    assert second["auroc"] == summary["auroc"] and second["retrieval"] == summary["retrieval"]
