"""`score --metric lang` / `--metric lang_cld3`: DataComp's language identification as sidecar
columns, checked against the fastText and CLD3 libraries called as DataComp calls them."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from datacomp_meta import ROWS, datacomp_meta, uid

from mmcurate.cli.main import cli
from mmcurate.curate.lang import bundled_model


def score(*args: str):
    return CliRunner().invoke(cli, ["score", *map(str, args)])


def sidecars(out) -> dict[str, dict]:
    table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("*.scores.parquet")))
    return {row.pop("uid"): row for row in table.to_pylist()}


def test_lang_columns_match_fasttext_and_cld3_as_datacomp_calls_them(tmp_path):
    import fasttext
    import gcld3

    meta = datacomp_meta(tmp_path / "meta")
    out = tmp_path / "scores"
    result = score(meta, "--out", out, "--metric", "lang", "--metric", "lang_cld3")
    assert result.exit_code == 0, result.output
    got = sidecars(out)
    model = fasttext.load_model(str(bundled_model()))
    cld3 = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    for i, (text, *_) in enumerate(ROWS):
        row = got[uid(i)]
        if not text.strip():
            assert row == {"lang": "", "lang_score": 0.0, "lang_cld3": ""}
            continue
        labels, probs = model.predict(text.replace("\n", " "))
        assert row["lang"] == labels[0].split("__label__")[1]
        assert np.float32(row["lang_score"]) == np.float32(probs[0])
        assert row["lang_cld3"] == cld3.FindLanguage(text=text.replace("\n", " ")).language
    assert [got[uid(i)]["lang"] for i in (0, 1, 9)] == ["en", "fr", "de"]
    # DataComp's own calls on blank captions, which mmcurate records as "": no rule's decision
    # changes (fastText rules need words, and CLD3 does not say en).
    assert model.predict("")[0][0] == "__label__en"
    assert {cld3.FindLanguage(text=t).language for t in ("", "   ", "\t")} == {"ja"}
    # CLD3 and fastText disagree on this caption, which makes laion2b differ from basic.
    assert got[uid(0)]["lang_cld3"] == "ga"
    marker = json.loads((out / "00000000.done.json").read_text())
    sha = hashlib.sha256(bundled_model().read_bytes()).hexdigest()
    assert marker["lang_model"]["sha256"] == sha == marker["config"]["lang_model_sha256"]
    summary = tmp_path / "again.json"
    again = score(
        meta, "--out", out, "--metric", "lang", "--metric", "lang_cld3", "--json", summary
    )
    assert again.exit_code == 0, again.output
    assert len(json.loads(summary.read_text())["already_done"]) == 2  # resumable per stem


def test_min_num_bytes_zero_gives_short_captions_a_language(tmp_path):
    import gcld3

    meta = datacomp_meta(tmp_path / "meta")
    out = tmp_path / "scores"
    assert score(meta, "--out", out, "--metric", "lang_cld3").exit_code == 0
    short = ROWS[2][0]  # "red car": 7 bytes
    strict = gcld3.NNetLanguageIdentifier(min_num_bytes=50, max_num_bytes=1000)
    assert strict.FindLanguage(text=short).language == "und"
    assert sidecars(out)[uid(2)]["lang_cld3"] == "en"


def test_bad_captions_get_an_empty_language_and_the_bin_model_sha_is_recorded(tmp_path):
    meta = tmp_path / "meta"  # parquet only: a caption-only run opens no npz
    meta.mkdir()
    bad = pa.array([b"\xff\xfe not utf-8", b"a photo of a dog", None]).view(pa.string())
    pq.write_table(pa.table({"uid": [uid(i) for i in range(3)], "text": bad}), meta / "0.parquet")
    model = tmp_path / "lid.176.bin"
    shutil.copy(bundled_model(), model)
    out = tmp_path / "scores"
    result = score(meta, "--out", out, "--metric", "lang", "--lang-model", model)
    assert result.exit_code == 0, result.output
    got = sidecars(out)
    assert [got[uid(i)]["lang"] for i in range(3)] == ["", "en", ""]
    marker = json.loads((out / "0.done.json").read_text())
    assert marker["lang_model"]["path"] == str(model.resolve())
    assert marker["lang_model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()


def test_a_bad_lang_model_is_refused_before_work(tmp_path):
    meta = datacomp_meta(tmp_path / "meta")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    for model in (junk, tmp_path / "missing.bin"):
        result = score(meta, "--out", tmp_path / "s", "--metric", "lang", "--lang-model", model)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "s").exists()


def test_lang_and_centroid_run_per_stem_on_ray_with_the_local_bytes(tmp_path):
    import logging

    ray = pytest.importorskip("ray")
    meta = datacomp_meta(tmp_path / "meta")
    np.save(tmp_path / "c.npy", np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32))
    args = ["--metric", "lang", "--metric", "lang_cld3"]
    args += ["--metric", "centroid", "--centroids", str(tmp_path / "c.npy"), "--window", "1"]
    assert score(meta, "--out", tmp_path / "local", *args).exit_code == 0
    ctx = ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    try:
        address = ctx.address_info["gcs_address"]
        summary = tmp_path / "ray.json"
        result = score(
            meta,
            "--out",
            tmp_path / "ray",
            *args,
            "--executor",
            "ray",
            "--ray-address",
            address,
            "--json",
            summary,
        )
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    assert len(json.loads(summary.read_text())["done"]) == 2  # one work item per stem
    for path in sorted((tmp_path / "local").glob("*.scores.parquet")):
        assert (tmp_path / "ray" / path.name).read_bytes() == path.read_bytes()


def test_a_stem_without_captions_fails_alone(tmp_path):
    meta = datacomp_meta(tmp_path / "meta")
    path = meta / "00000001.parquet"
    pq.write_table(pq.read_table(path).drop(["text"]), path)
    out = tmp_path / "scores"
    summary = tmp_path / "summary.json"
    result = score(meta, "--out", out, "--metric", "lang", "--json", summary)
    assert result.exit_code == 1, result.output
    failed = json.loads(summary.read_text())["failed"]
    assert list(failed.values()) == ["00000001: parquet lacks column(s) ['text']"]
    assert (out / "00000000.scores.parquet").is_file()
    assert not (out / "00000001.scores.parquet").exists()


def test_a_caption_parquet_resized_after_its_marker_fails_its_stem_naming_it(tmp_path):
    from conftest import meta_table

    from mmcurate.data.store import write_stem

    store = tmp_path / "store"
    for stem in ("a", "b"):
        meta = meta_table(stem, 6)
        arrays = {"img": np.eye(6, 4, dtype=np.float16), "txt": np.eye(6, 4, dtype=np.float16)}
        write_stem(store, stem, meta, arrays, {"read": 6})
    damaged = store / "b.parquet"
    damaged.write_bytes(damaged.read_bytes() + b"\0")
    out, summary = tmp_path / "scores", tmp_path / "summary.json"
    result = score(store, "--out", out, "--metric", "lang", "--json", summary)
    assert result.exit_code == 1, result.output
    failed = json.loads(summary.read_text())["failed"]
    assert len(failed) == 1
    ((item, reason),) = failed.items()
    assert item.endswith("/b") and "b.parquet: size" in reason and "marker" in reason
    assert (out / "a.scores.parquet").is_file() and not (out / "b.scores.parquet").exists()
