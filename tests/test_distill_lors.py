"""LoRS end to end on the built-in corpus: 20 distilled pairs beat 20 random real pairs.

The experts train without augmentation (`--no-augment`): on this corpus the `tiny` preset's
margin over random pairs is clear with plain experts and within noise with augmented ones
(benchmarks/bench_lors_margin.py measures both)."""

from __future__ import annotations

import pytest
import torch

from mmcurate.demo.corpus import make_pairs
from mmcurate.distill import (
    BufferConfig,
    EvalConfig,
    artifact_set,
    distill,
    evaluate_small_set,
    load_buffers,
    make_buffers,
    pairs_from_arrays,
    random_set,
    resolve_config,
)
from mmcurate.engine import LocalExecutor

TEXT = "hf-text:mmc-tiny-bert"
ITERATIONS = 200
MARGIN = 0.5


@pytest.mark.slow
def test_distilled_pairs_beat_random_pairs(tmp_path):
    torch.set_num_threads(1)
    train_raw, test_raw = make_pairs(3000, seed=100), make_pairs(500, seed=200)
    train = pairs_from_arrays(train_raw["images"], train_raw["captions"], TEXT)
    test = pairs_from_arrays(test_raw["images"], test_raw["captions"], TEXT)
    config = BufferConfig(
        experts=3,
        epochs=3,
        image_encoder="convnet-tiny",
        text_encoder=TEXT,
        image_size=32,
        augment=False,
    )
    summary = make_buffers(train, tmp_path / "buf", config, LocalExecutor(1, 1), device="cpu")
    assert len(summary["done"]) == 3 and not summary["failed"]

    art = distill(
        train,
        load_buffers(tmp_path / "buf"),
        resolve_config("tiny", iterations=ITERATIONS, seed=0),
        device="cpu",
        progress=False,
    )
    assert art["images"].shape == (20, 3, 32, 32)
    ev = EvalConfig(num_eval=3, seed=0)
    distilled = evaluate_small_set(artifact_set(art), test, ev, progress=False)
    random = evaluate_small_set(random_set(art, train, 20, seed=0), test, ev, progress=False)
    print(
        f"\nmean R@K over {ev.num_eval} students, {test.n_images} test pairs: "
        f"distilled-20 {distilled['mean_recall']:.2f} vs random-20 {random['mean_recall']:.2f}"
    )
    assert distilled["mean_recall"] >= random["mean_recall"] + MARGIN
