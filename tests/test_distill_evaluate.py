"""Evaluation students: the published schedule, last-epoch figures, and the baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmcurate.distill.augment import CLIP_MEAN, CLIP_STD
from mmcurate.distill.buffers import Buffers, derive_seed
from mmcurate.distill.data import PairSet
from mmcurate.distill.evaluate import (
    EvalConfig,
    SmallSet,
    evaluate_small_set,
    expert_recall,
    random_set,
    train_student,
)
from mmcurate.distill.losses import wbce
from mmcurate.distill.sampling import pick_init_pairs
from mmcurate.distill.students import build_student, normalize_images
from mmcurate.errors import MmcurateError, UsageError
from mmcurate.metrics import retrieval_recall
from mmcurate.metrics.retrieval import mean_recall

ARCH = {
    "image_encoder": "convnet-w8-d2",
    "text_encoder": "hf-text:mmc-tiny-bert",
    "image_size": 16,
    "text_dim": 12,
    "mean": list(CLIP_MEAN),
    "std": list(CLIP_STD),
    "resize": "squash",
}


def _small(seed=0, n=6):
    gen = torch.Generator().manual_seed(seed)
    s = torch.eye(n) + 0.3 * torch.rand(n, n, generator=gen)
    return SmallSet(
        images=torch.randn(n, 3, 16, 16, generator=gen),
        texts=torch.randn(n, 12, generator=gen),
        similarity=s,
        lr_img=0.05,
        lr_txt=0.2,
        loss="wbce",
        arch=ARCH,
    )


def _test_pairs(seed=1, n_images=10):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_images, 16, 16, 3), generator=gen, dtype=torch.uint8)
    return PairSet(
        images=images.numpy(),
        image_index=np.repeat(np.arange(n_images), 2),
        texts=torch.randn(2 * n_images, 12, generator=gen),
        captions=[f"c{i}" for i in range(2 * n_images)],
        uids=[f"{i:032x}" for i in range(2 * n_images)],
    )


def _manual_training(student, small, cfg, seed, epochs=None, decay=None, after_epoch=None):
    """An independent loop: SGD with momentum and weight decay written out by hand."""
    epochs = cfg.epochs if epochs is None else epochs
    decay = cfg.epochs // 2 if decay is None else decay
    groups = [(list(student.image.parameters()), small.lr_img)]
    groups.append((list(student.text.parameters()), small.lr_txt))
    velocity = {id(p): None for params, _ in groups for p in params}
    order = torch.Generator().manual_seed(derive_seed(seed, 1))
    student.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, 2))
        for epoch in range(epochs):
            scale = 0.1 if epoch >= decay else 1.0
            perm = torch.randperm(small.images.shape[0], generator=order)
            for b in torch.split(perm, cfg.batch_size):
                loss = wbce(student(small.images[b], small.texts[b]), small.similarity[b][:, b])
                student.zero_grad()
                loss.backward()
                with torch.no_grad():
                    for params, lr in groups:
                        for p in params:
                            d = p.grad + cfg.weight_decay * p
                            v = velocity[id(p)]
                            v = d.clone() if v is None else cfg.momentum * v + d
                            velocity[id(p)] = v
                            p -= lr * scale * v
            if after_epoch is not None:
                after_epoch(epoch)
                student.train()
    return student


def _hand_recall(student, test):
    student.eval()
    with torch.no_grad():
        img = student.image(normalize_images(torch.from_numpy(test.images), CLIP_MEAN, CLIP_STD))
        txt = student.text(test.texts)
    return retrieval_recall(img, txt, test.image_index)


def test_published_schedule_and_last_epoch_figures():
    small, test = _small(), _test_pairs()
    cfg = EvalConfig(num_eval=2, epochs=6, batch_size=4, seed=7)
    result = evaluate_small_set(small, test, cfg, progress=False)
    assert cfg.momentum == 0.9 and cfg.weight_decay == 5e-4 and EvalConfig().epochs == 100
    for k in range(2):
        seed = derive_seed(7, 1000 + k)
        ours = train_student(build_student("convnet-w8-d2", 12, 16, seed), small, cfg, seed, "cpu")
        hand = _manual_training(build_student("convnet-w8-d2", 12, 16, seed), small, cfg, seed)
        for a, b in zip(ours.parameters(), hand.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-5)
        assert result["runs"][k] == pytest.approx(_hand_recall(hand, test))
    for key, value in result["summary"].items():
        runs = [r[key] for r in result["runs"]]
        assert value == pytest.approx({"mean": np.mean(runs), "std": np.std(runs)})
    assert "best_on_test" not in result


def test_paper_protocol_keeps_the_best_test_checkpoint_apart():
    """The reference's schedule: epochs + 1 epochs, decay from epochs//2 + 1, the test split
    scored after epochs 0, epochs//10, …, epochs; the best mean R@K per student."""
    small, test = _small(seed=4), _test_pairs(seed=5)
    cfg = EvalConfig(num_eval=2, epochs=20, batch_size=4, seed=9, protocol="paper")
    result = evaluate_small_set(small, test, cfg, progress=False)
    for k in range(2):
        seed = derive_seed(9, 1000 + k)
        hand = build_student("convnet-w8-d2", 12, 16, seed)
        scored = {}

        def after(epoch, hand=hand, scored=scored):
            if epoch in (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20):
                scored[epoch] = _hand_recall(hand, test)

        _manual_training(hand, small, cfg, seed, epochs=21, decay=11, after_epoch=after)
        assert sorted(scored) == list(range(0, 21, 2))
        assert result["runs"][k] == pytest.approx(scored[20])
        best = max(scored.values(), key=mean_recall)
        assert result["best_on_test"]["runs"][k] == pytest.approx(best)
        assert mean_recall(best) >= mean_recall(result["runs"][k])
    best_runs = result["best_on_test"]["runs"]
    assert result["best_on_test"]["mean_recall"] == pytest.approx(
        np.mean([mean_recall(r) for r in best_runs])
    )


def test_bad_evaluation_inputs():
    small, test = _small(), _test_pairs()
    with pytest.raises(MmcurateError, match="learned learning rates must be positive"):
        bad = SmallSet(**{**small.__dict__, "lr_txt": -0.1})
        evaluate_small_set(bad, test, EvalConfig(num_eval=1, epochs=1), progress=False)
    other = SmallSet(**{**small.__dict__, "arch": {**ARCH, "image_size": 32}})
    with pytest.raises(UsageError, match="needs 32 px"):
        evaluate_small_set(other, test, EvalConfig(num_eval=1, epochs=1), progress=False)
    with pytest.raises(UsageError, match="eval-momentum"):
        EvalConfig(momentum=1.5).check()


def test_random_baseline_draws_a_new_subset_per_student_apart_from_the_init():
    train = _test_pairs(seed=3, n_images=40)
    art = {"config": {**ARCH, "expert_lr": 0.1}}
    init = {
        tuple(pick_init_pairs(train, 5, seed=2, mode=m).tolist()) for m in ("random", "distinct")
    }
    subsets = []
    for k in range(4):
        small = random_set(art, train, 5, seed=2, k=k)
        assert torch.equal(small.similarity, torch.eye(5)) and small.loss == "ce"
        assert small.lr_img == small.lr_txt == 0.1
        rows = [int(np.flatnonzero((train.texts == t).all(1))[0]) for t in small.texts]
        assert len(set(train.image_index[rows].tolist())) == 5
        assert torch.equal(small.images, normalize_images(train.pixels(rows), CLIP_MEAN, CLIP_STD))
        subsets.append(tuple(rows))
    assert len(set(subsets)) == 4 and not set(subsets) & init
    again = random_set(art, train, 5, seed=2, k=1)
    assert torch.equal(again.texts, random_set(art, train, 5, seed=2, k=1).texts)
    with pytest.raises(UsageError, match="fewer than N = 41"):
        pick_init_pairs(train, 41, seed=0)


def test_expert_recall_scores_each_snapshot_as_its_own_module(tmp_path):
    """A buffer whose snapshots are two differently seeded students: the recall at epoch 1
    is the second student's, scored through the module itself."""
    students = [build_student(ARCH["image_encoder"], 12, 16, seed) for seed in (5, 6)]
    flats = [s.flat() for s in students]
    meta = {**ARCH, "epochs": 1}
    expert = {
        "image": torch.stack([f[0] for f in flats]),
        "text": torch.stack([f[1] for f in flats]),
    }
    buffers = Buffers(tmp_path, meta, [expert, expert])
    test = _test_pairs()
    at_one = expert_recall(buffers, test, 1)
    assert at_one == [_hand_recall(students[1], test)] * 2
    assert expert_recall(buffers, test, 0)[0] == _hand_recall(students[0], test)
    assert at_one[0] != expert_recall(buffers, test, 0)[0]


def test_is_mtt_of_names_the_baseline_of_exactly_this_artifact():
    from dataclasses import replace

    from mmcurate.distill.evaluate import is_mtt_of
    from mmcurate.distill.presets import mtt_config, resolve_config

    lors = resolve_config("tiny", pairs=20)
    where = {"data": "/d/*.tar", "buffers": "/b"}
    art = {"config": {**lors.to_dict(), **where, "method": "lors"}}
    mtt = {"config": {**mtt_config(lors).to_dict(), **where, "method": "mtt", "seconds": 3.0}}
    assert is_mtt_of(mtt, art) and is_mtt_of(mtt, art, pairs=20)
    assert not is_mtt_of(mtt, art, pairs=10)  # another budget
    assert not is_mtt_of(art, art)  # LoRS itself: S learned, WBCE
    other_seed = {"config": {**mtt["config"], "seed": lors.seed + 1}}
    assert not is_mtt_of(other_seed, art)
    fewer = {"config": {**mtt["config"], **replace(mtt_config(lors), iterations=5).to_dict()}}
    assert not is_mtt_of(fewer, art)
    for key in where:  # the same settings on other data or other buffers
        assert not is_mtt_of({"config": {**mtt["config"], key: "/elsewhere"}}, art)
