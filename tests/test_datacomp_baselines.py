"""DataComp's baseline filters as `select` rules, on a DataComp-shaped metadata directory: each
keeps exactly the uids its rule (baselines/apply_filter.py) defines, written out here."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from datacomp_meta import L14, ROWS, datacomp_meta, uid, write_wordnet

from mmcurate.cli.main import cli
from mmcurate.curate.centroids import load_centroids, nearest_by_inner_product
from mmcurate.curate.datacomp_rules import fasttext_token_counts
from mmcurate.data.uid import pair_to_uid
from mmcurate.errors import UsageError

E = np.eye(4, dtype=np.float32)
# Published-style centroids: c0 is long (3·e1), so inner product and L2 disagree near e1.
CENTROIDS = np.stack([3 * E[0], 0.95 * E[0] + 0.31 * E[1], E[2], E[3]]).astype(np.float32)
TARGET = E[:1]  # one ImageNet row, e1: inner product picks c0 (L2 would pick c1)
IMG = np.stack(
    [
        0.5 * E[0] + 0.866 * E[2],  # 0: inner product c0 (kept); L2 c2
        E[0],  # 1: fr, caption-filtered out
        E[2],  # 2: c2
        E[0],  # 3: c0
        E[3],  # 4: c3
        0.95 * E[0] + 0.31 * E[1],  # 5: c0
        E[0],  # 6: empty caption
        E[1],  # 7: c1 (L2 also c1, which L2 would keep)
        E[0],  # 8: whitespace caption
        E[0],  # 9: de
        (E[0] + E[1]) / np.sqrt(2),  # 10: c0
        E[2],  # 11: c2
    ]
).astype(np.float16)
BASIC = {0, 5, 7, 10, 11}
TEXT_BASED = {0, 2, 3, 7, 10}
LAION2B = {2, 5, 7, 10, 11}
CAPTION_FILTER = {0, 2, 3, 4, 5, 7, 10, 11}
IMAGE_BASED = {0, 3, 5, 10}


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def kept(path) -> set[int]:
    subset = np.load(path, allow_pickle=False)
    return {int(pair_to_uid(int(a), int(b)), 16) for a, b in zip(subset["f0"], subset["f1"])}


@pytest.fixture(scope="module")
def dc(tmp_path_factory):
    """The metadata directory, its lang/lang_cld3 sidecars, a WordNet and the image assets."""
    root = tmp_path_factory.mktemp("dc")
    meta = datacomp_meta(root / "meta", img=IMG)
    scores = root / "scores"
    result = invoke("score", meta, "--out", scores, "--metric", "lang", "--metric", "lang_cld3")
    assert result.exit_code == 0, result.output
    torch.save(CENTROIDS.copy(), root / "small_centroids_l14.pt")  # a pickled numpy array
    np.save(root / "centroids.npy", CENTROIDS)
    torch.save({"image_features": torch.from_numpy(TARGET)}, root / "in1k_clip_vit_l14_0.pt")
    return {"root": root, "meta": meta, "scores": scores, "wordnet": write_wordnet(root / "nltk")}


def select(dc, tmp_path, *keep, extra=()):
    out = tmp_path / "subset.npy"
    args = [a for k in keep for a in ("--keep", k)]
    result = invoke("select", dc["scores"], "--store", dc["meta"], "--out", out, *args, *extra)
    assert result.exit_code == 0, result.output
    return kept(out), json.loads(out.with_suffix(".json").read_text())


def image_args(dc, centroids="small_centroids_l14.pt"):
    root = dc["root"]
    return ["--centroids", root / centroids, "--target", root / "in1k_clip_vit_l14_0.pt"]


def test_basic(dc, tmp_path):
    assert select(dc, tmp_path, "datacomp:basic")[0] == BASIC


def test_basic_is_its_parts_as_rules_that_need_no_score_run(dc, tmp_path):
    parts = ("lang==en", "caption_words>2", "caption_chars>5", "min_side>=200", "aspect_ratio<=3")
    assert select(dc, tmp_path, *parts)[0] == BASIC


def test_text_based_finds_imagenet21k_words_through_wordnet(dc, tmp_path):
    got, _ = select(dc, tmp_path, "datacomp:text_based", extra=["--wordnet", dc["wordnet"]])
    # dog, car, sofa and "Dogs" (WordNet's morphy) are ImageNet-21k classes; "bank" is one only
    # as its second synset, and DataComp takes the first.
    assert got == TEXT_BASED


def test_laion2b_uses_cld3_and_the_b32_score(dc, tmp_path):
    # Row 0 is English to fastText but Irish to CLD3, so laion2b drops it.
    assert select(dc, tmp_path, "datacomp:laion2b")[0] == LAION2B


@pytest.mark.parametrize("centroids", ["small_centroids_l14.pt", "centroids.npy"])
def test_image_based_picks_centroids_by_inner_product(dc, tmp_path, centroids):
    got, record = select(dc, tmp_path, "datacomp:image_based", extra=image_args(dc, centroids))
    assert got == IMAGE_BASED
    stage = record["stages"][0]
    assert stage["caption_filter"] == len(CAPTION_FILTER) and stage["target_centroids"] == 1
    # An L2 assignment would keep a different set: the rule is the inner product's.
    x = IMG.astype(np.float32)
    l2 = ((x[:, None] - CENTROIDS[None]) ** 2).sum(-1).argmin(1)
    target_l2 = ((TARGET[:, None] - CENTROIDS[None]) ** 2).sum(-1).argmin(1)
    assert {i for i in CAPTION_FILTER if l2[i] in target_l2} != IMAGE_BASED


def test_image_based_intersect_clip_score_is_the_two_rules_in_order(dc, tmp_path):
    got, record = select(
        dc,
        tmp_path,
        f"{L14}:0.5",
        "datacomp:image_based",
        extra=["--ties", "datacomp", *image_args(dc)],
    )
    clip = {i for i, row in enumerate(ROWS) if row[3] >= 0.29}  # the score at index int(12·0.5)
    assert clip == {0, 1, 2, 3, 7, 9, 10}
    assert got == clip & IMAGE_BASED == {0, 3, 10}
    assert record["stages"][1]["input"] == len(clip)


def test_image_based_without_centroids_runs_faiss_kmeans(dc, tmp_path):
    root = dc["root"]
    extra = ["--target", root / "in1k_clip_vit_l14_0.pt", "--image-clusters", "5"]
    got, record = select(dc, tmp_path, "datacomp:image_based", extra=extra)
    # 8 caption-filtered rows allow at most 8 // 39 -> 1 cluster: every candidate shares it.
    assert record["stages"][0]["centroids"]["clusters"] == 1
    assert got == CAPTION_FILTER


def test_named_rules_compose_with_union_and_intersect(dc, tmp_path):
    text = tmp_path / "text.npy"
    args = ["--keep", "datacomp:text_based", "--wordnet", dc["wordnet"]]
    assert (
        invoke("select", dc["scores"], "--store", dc["meta"], "--out", text, *args).exit_code == 0
    )
    assert select(dc, tmp_path, "datacomp:basic", extra=["--intersect", text])[0] == {0, 7, 10}
    union = select(dc, tmp_path, "datacomp:laion2b", extra=["--union", text])[0]
    assert union == LAION2B | TEXT_BASED


def test_the_wnids_are_datacomps_asset_byte_for_byte():
    import hashlib
    import importlib.util
    from pathlib import Path

    from mmcurate.curate.in21k import in21k_offsets

    root = Path(importlib.util.find_spec("timm").submodule_search_locations[0])
    data = (root / "data/_info/imagenet21k_goog_synsets.txt").read_bytes()
    # sha256 of imagenet21k_wordnet_ids.txt in DataComp's baselines/utils.py
    assert hashlib.sha256(data).hexdigest() == (
        "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2"
    )
    offsets = in21k_offsets()
    assert len(offsets) == 21843 and 2084071 in offsets and 1740 not in offsets


def test_fasttext_token_count_counts_each_newline_as_a_token():
    texts = ["a dog\nrunning", "sunset", "  two\twords ", "", None, "x\r\ny"]
    assert fasttext_token_counts(texts).tolist() == [4, 1, 2, 0, 0, 3]


def test_inner_product_assignment_matches_numpy_in_blocks():
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((1000, 16)), rng.standard_normal((300, 16)) * 3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("mmcurate.curate.centroids.PRODUCT_BUDGET", 300 * 7)  # 7 rows per block
        got = nearest_by_inner_product(x.astype(np.float32), c.astype(np.float32))
    assert (got == (x.astype(np.float32) @ c.astype(np.float32).T).argmax(1)).all()


def test_centroid_pt_files_load_without_unpickling_anything_else(tmp_path):
    import datetime
    import zipfile

    torch.save(CENTROIDS.copy(), tmp_path / "ok.pt")
    assert np.array_equal(load_centroids(tmp_path / "ok.pt"), CENTROIDS)
    # DataComp's files were pickled by numpy 1, whose array global is numpy.core.multiarray.
    with zipfile.ZipFile(tmp_path / "ok.pt") as src:
        members = {name: src.read(name) for name in src.namelist()}
    for name in members:
        if name.endswith("data.pkl"):
            members[name] = members[name].replace(b"numpy._core.", b"numpy.core.")
            assert b"numpy.core.multiarray\n_reconstruct" in members[name]
    with zipfile.ZipFile(tmp_path / "numpy1.pt", "w") as dst:
        for name, data in members.items():
            dst.writestr(name, data)
    assert np.array_equal(load_centroids(tmp_path / "numpy1.pt"), CENTROIDS)
    torch.save({"when": datetime.date(2023, 4, 1)}, tmp_path / "other.pt")  # not a numpy global
    with pytest.raises(UsageError, match="weights_only"):
        load_centroids(tmp_path / "other.pt")


def one_line_refusal(result, out, needle):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], lines
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_bad_inputs_are_refused_in_one_line_before_anything_is_written(dc, tmp_path):
    out = tmp_path / "o.npy"
    wide = tmp_path / "wide.npy"
    np.save(wide, np.ones((4, 7), np.float32))
    base = ["select", dc["scores"], "--store", dc["meta"], "--out", out, "--keep"]
    result = invoke(*base, "datacomp:image_based", *image_args(dc), "--centroids", wide)
    one_line_refusal(result, out, "width 7")
    one_line_refusal(invoke(*base, "datacomp:bogus"), out, "unknown DataComp baseline")
    # A metadata directory without original_width (nor width).
    meta = datacomp_meta(tmp_path / "meta", img=IMG)
    for path in meta.glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop(["original_width"]), path)
    result = invoke(
        "select", dc["scores"], "--store", meta, "--out", out, "--keep", "datacomp:basic"
    )
    one_line_refusal(result, out, "'original_width'")
    # lang==en on the metadata before any `score --metric lang` run.
    result = invoke("select", meta, "--out", out, "--keep", "lang==en")
    one_line_refusal(result, out, "--metric lang")
    result = invoke("select", meta, "--out", out, "--keep", "datacomp:laion2b")
    one_line_refusal(result, out, "--metric lang_cld3")


def test_missing_wordnet_says_how_to_get_it(dc, tmp_path, monkeypatch):
    import nltk.data

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "none")])
    out = tmp_path / "o.npy"
    args = ["select", dc["scores"], "--store", dc["meta"], "--out", out]
    result = invoke(*args, "--keep", "datacomp:text_based")
    one_line_refusal(result, out, "nltk.downloader wordnet")


def test_uids_are_the_metadata_uids(dc, tmp_path):
    got, _ = select(dc, tmp_path, "lang==fr")
    assert got == {1} and uid(1) == f"{1:032x}"


def test_named_rules_compose_with_negclip_from_the_same_score_run(dc, tmp_path):
    scores = tmp_path / "scores"
    args = ["--metric", "negclip", "--metric", "lang", "--batch-size", "4"]
    keys = ["--img-key", "l14_img", "--txt-key", "l14_txt"]
    assert invoke("score", dc["meta"], "--out", scores, *args, *keys).exit_code == 0
    out = tmp_path / "subset.npy"
    rules = ["--keep", "negclip:0.5", "--keep", "datacomp:basic"]
    result = invoke("select", scores, "--store", dc["meta"], "--out", out, *rules)
    assert result.exit_code == 0, result.output
    table = pq.read_table(sorted(scores.glob("*.scores.parquet"))).to_pylist()
    rows = sorted(table, key=lambda r: (-r["negclip"], r["uid"]))[:6]  # floor(0.5 · 12)
    assert kept(out) == {int(r["uid"], 16) for r in rows} & BASIC


def test_a_stores_width_and_height_stand_in_for_the_original_sizes(dc, tmp_path):
    meta = datacomp_meta(tmp_path / "meta", img=IMG)
    for path in meta.glob("*.parquet"):
        table = pq.read_table(path)
        names = [
            {"original_width": "width", "original_height": "height"}.get(n, n)
            for n in table.column_names
        ]
        pq.write_table(table.rename_columns(names), path)
    out = tmp_path / "subset.npy"
    args = ["--keep", "datacomp:basic"]
    assert invoke("select", dc["scores"], "--store", meta, "--out", out, *args).exit_code == 0
    assert kept(out) == BASIC


def test_string_equality_on_a_number_column_is_refused(dc, tmp_path):
    out = tmp_path / "o.npy"
    result = invoke("select", dc["meta"], "--out", out, "--keep", f"{L14}==en")
    one_line_refusal(result, out, "compares strings")


def test_centroid_files_with_a_pickle_payload_are_refused_without_running_it(tmp_path):
    import pickle
    from pathlib import Path

    from faults.generator import Evil

    marker = Path(Evil.marker)
    marker.unlink(missing_ok=True)
    torch.save([CENTROIDS.copy(), Evil()], tmp_path / "evil.pt")
    (tmp_path / "raw.pt").write_bytes(pickle.dumps([CENTROIDS, Evil()], protocol=2))
    np.save(tmp_path / "evil.npy", np.array([Evil()], dtype=object), allow_pickle=True)
    for name in ("evil.pt", "raw.pt", "evil.npy"):
        with pytest.raises(UsageError):
            load_centroids(tmp_path / name)
    assert not marker.exists(), "the centroid loader executed a pickle payload"


def test_centroids_made_here_separate_the_pool_and_are_seeded(tmp_path):
    import pyarrow as pa

    rng = np.random.default_rng(5)
    n, meta = 200, tmp_path / "meta"
    meta.mkdir()
    near = np.where(np.arange(n) % 2 == 0, 0, 1)  # even rows near e1, odd rows near e2
    img = E[near] + 0.05 * rng.standard_normal((n, 4)).astype(np.float32)
    table = pa.table(
        {
            "uid": [uid(i) for i in range(n)],
            "text": [f"a photo of a red car parked outside house number {i}" for i in range(n)],
        }
    )
    pq.write_table(table, meta / "0.parquet")
    np.savez(meta / "0.npz", l14_img=img.astype(np.float16))
    np.save(tmp_path / "target.npy", E[:1])
    scores = tmp_path / "scores"
    assert invoke("score", meta, "--out", scores, "--metric", "lang").exit_code == 0
    runs = []
    args = ["--keep", "datacomp:image_based", "--target", tmp_path / "target.npy"]
    made = ["--image-clusters", "2", "--save-centroids", tmp_path / "made.npy"]
    for extra in (made, made, ["--centroids", tmp_path / "made.npy"]):
        out = tmp_path / "subset.npy"
        result = invoke("select", scores, "--store", meta, "--out", out, *args, *extra)
        assert result.exit_code == 0, result.output
        runs.append(out.read_bytes())
        assert kept(out) == set(range(0, n, 2))
    assert runs[0] == runs[1] == runs[2]  # seeded, and the saved centroids reproduce it
    assert np.load(tmp_path / "made.npy").shape == (2, 4)


def test_a_named_rule_on_a_million_rows_stays_within_selects_bytes_per_row(tmp_path):
    """datacomp:laion2b over 1M rows in 20 files (lang_cld3 in sidecars, the b32 score in the
    metadata): the bounds tests/test_select.py asserts for score rules, at the same 20% kept."""
    import subprocess
    import sys
    import textwrap

    import pyarrow as pa

    n, files = 1_000_000, 20
    rng = np.random.default_rng(0)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    hexes = digits[rng.integers(0, 16, size=(n, 32), dtype=np.uint8)].view("S32").ravel()
    english = rng.random(n) < 0.4
    b32 = rng.random(n) * 0.56  # half of them >= 0.28
    meta, scores = tmp_path / "meta", tmp_path / "scores"
    meta.mkdir()
    scores.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(n), files)):
        uids = pa.array(hexes[rows]).cast(pa.string())
        table = pa.table({"uid": uids, "clip_b32_similarity_score": pa.array(b32[rows])})
        pq.write_table(table, meta / f"{i:05d}.parquet")
        lang = pa.array(np.where(english[rows], "en", "de").tolist())
        pq.write_table(
            pa.table({"uid": uids, "lang_cld3": lang}), scores / f"{i:05d}.scores.parquet"
        )
    script = textwrap.dedent(
        f"""
        import json, tracemalloc
        import pyarrow.parquet
        from mmcurate.curate.select import SelectConfig, select
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        pyarrow.parquet.read_table({str(meta / "00000.parquet")!r})
        base = hwm()
        tracemalloc.start()
        config = SelectConfig(keep=("datacomp:laion2b",), store={str(meta)!r})
        subset, report = select({str(scores)!r}, config, progress=False)
        print(json.dumps({{"traced": tracemalloc.get_traced_memory()[1], "rss": hwm() - base,
                          "count": report["count"]}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["count"] == int(np.count_nonzero(english & (b32 >= 0.28)))
    assert stats["traced"] / n <= 24 and stats["rss"] / n <= 48, stats


def test_score_metric_centroid_assigns_on_the_executor_and_select_uses_it(dc, tmp_path):
    root, scores = dc["root"], tmp_path / "scores"
    args = ["--metric", "lang", "--metric", "centroid", "--centroids", root / "centroids.npy"]
    result = invoke("score", dc["meta"], "--out", scores, *args)
    assert result.exit_code == 0, result.output
    table = pq.read_table(sorted(scores.glob("*.scores.parquet")))
    ids = dict(zip(table.column("uid").to_pylist(), table.column("centroid").to_pylist()))
    expected = (IMG.astype(np.float32) @ CENTROIDS.T).argmax(1)  # inner product, not L2
    assert [ids[uid(i)] for i in range(len(ROWS))] == expected.tolist()
    out = tmp_path / "subset.npy"
    extra = ["--keep", "datacomp:image_based", *image_args(dc, "centroids.npy")]
    result = invoke("select", scores, "--store", dc["meta"], "--out", out, *extra)
    assert result.exit_code == 0, result.output
    assert kept(out) == IMAGE_BASED
    made = json.loads(out.with_suffix(".json").read_text())["stages"][0]["centroids"]
    assert made["assigned_by"] == "score --metric centroid"
    # Other centroids than the run's: select assigns the rows itself, with the same result.
    out2 = tmp_path / "subset2.npy"
    extra = ["--keep", "datacomp:image_based", *image_args(dc)]  # the .pt: another file
    assert invoke("select", scores, "--store", dc["meta"], "--out", out2, *extra).exit_code == 0
    assert kept(out2) == IMAGE_BASED
    made = json.loads(out2.with_suffix(".json").read_text())["stages"][0]["centroids"]
    assert made["assigned_by"] == "select"


def test_score_metric_centroid_needs_centroids_of_the_right_width(dc, tmp_path):
    out = tmp_path / "scores"
    result = invoke("score", dc["meta"], "--out", out, "--metric", "centroid")
    one_line_refusal(result, out, "--metric centroid needs --centroids")
    wide = tmp_path / "wide.npy"
    np.save(wide, np.ones((3, 7), np.float32))
    summary = tmp_path / "summary.json"
    args = ["--metric", "centroid", "--centroids", wide, "--json", summary]
    result = invoke("score", dc["meta"], "--out", out, *args)
    assert result.exit_code == 1, result.output  # SPEC §9: a dimension mismatch fails the shard
    reasons = list(json.loads(summary.read_text())["failed"].values())
    assert reasons == ["centroids have width 7, embeddings have 4"]
