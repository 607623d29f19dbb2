"""Evaluation (SPEC §6): fresh students trained on a small set, retrieval on a test split.

The headline figures are taken after the last epoch; nothing is selected on test data. The
`paper` protocol is the reference's (`evaluate_synset_with_similarity`): epochs + 1 epochs, lr
×0.1 from epoch epochs//2 + 1, the test split scored after epochs 0, epochs//10, …, epochs, and
the checkpoint with the best mean recall kept as `best_on_test`: selected on test data, for
comparison with published tables only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.nn.utils import vector_to_parameters

from mmcurate.distill.artifact import artifact_config_of, similarity_matrix
from mmcurate.distill.buffers import Buffers, derive_seed
from mmcurate.distill.data import PairSet
from mmcurate.distill.distiller import SAVE_EVERY, distill
from mmcurate.distill.heap import keep_freed_heap
from mmcurate.distill.losses import get_loss
from mmcurate.distill.presets import mtt_config
from mmcurate.distill.sampling import pick_init_pairs
from mmcurate.distill.students import Student, build_student, normalize_images
from mmcurate.errors import MmcurateError, UsageError
from mmcurate.metrics.retrieval import mean_recall, retrieval_recall, summarize_runs
from mmcurate.progress import progress_bar

PROTOCOLS = ("last", "paper")


@dataclass(frozen=True)
class EvalConfig:
    """Training of the evaluation students (published: momentum 0.9, wd 5e-4, 100 epochs);
    `protocol` last (the headline, last epoch) or paper (also the best epoch on test data)."""

    num_eval: int = 5
    epochs: int = 100
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    protocol: str = "last"
    seed: int = 0

    def check(self) -> EvalConfig:
        """Refuse settings that cannot run."""
        if self.num_eval < 1 or self.epochs < 1 or self.batch_size < 1:
            raise UsageError("--num-eval, --epochs and the batch size must be >= 1")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"--eval-momentum must be in [0, 1), got {self.momentum}")
        if self.protocol not in PROTOCOLS:
            raise UsageError(
                f"unknown --protocol {self.protocol!r}: choose from {', '.join(PROTOCOLS)}"
            )
        return self


@dataclass(frozen=True)
class Schedule:
    """How many epochs a student trains, from which epoch lr is ×0.1, and after which epochs
    (0-based) the test split is scored for the paper protocol's best checkpoint."""

    epochs: int
    decay: int
    tests: tuple[int, ...]


def schedule(cfg: EvalConfig) -> Schedule:
    """The last-epoch schedule (epochs, decay at epochs//2) or the reference's (epochs + 1,
    decay at epochs//2 + 1, tests after 0, epochs//10, …, epochs)."""
    if cfg.protocol == "paper":
        step = max(1, cfg.epochs // 10)
        tests = tuple(sorted({*range(0, cfg.epochs + 1, step), cfg.epochs}))
        return Schedule(cfg.epochs + 1, cfg.epochs // 2 + 1, tests)
    return Schedule(cfg.epochs, cfg.epochs // 2, ())


@dataclass
class SmallSet:
    """What an evaluation student trains on: normalised images, text features, S and η."""

    images: torch.Tensor
    texts: torch.Tensor
    similarity: torch.Tensor
    lr_img: float
    lr_txt: float
    loss: str
    arch: dict


def train_student(
    student: Student,
    small: SmallSet,
    cfg: EvalConfig,
    seed: int,
    device: torch.device | str,
    on_test: Callable[[int], None] | None = None,
) -> Student:
    """SGD with momentum and weight decay, lr ×0.1 from the schedule's decay epoch, S
    sub-blocks; `on_test(epoch)` runs after each of the schedule's test epochs."""
    keep_freed_heap()
    device = torch.device(device)
    if small.lr_img <= 0 or small.lr_txt <= 0:
        raise MmcurateError(
            f"learned learning rates must be positive, got lr_img={small.lr_img:.4g}, "
            f"lr_txt={small.lr_txt:.4g}; the distillation diverged"
        )
    optimizer = torch.optim.SGD(
        [
            {"params": student.image.parameters(), "lr": small.lr_img},
            {"params": student.text.parameters(), "lr": small.lr_txt},
        ],
        lr=small.lr_img,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    loss_fn = get_loss(small.loss)
    images, texts = small.images.to(device), small.texts.to(device)
    sim = small.similarity.to(device)
    order = torch.Generator().manual_seed(derive_seed(seed, 1))
    plan = schedule(cfg)
    student.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(seed, 2))
        for epoch in range(plan.epochs):
            if epoch == plan.decay:
                for group in optimizer.param_groups:
                    group["lr"] *= 0.1
            for batch in torch.split(torch.randperm(len(images), generator=order), cfg.batch_size):
                b = batch.to(device)
                loss = loss_fn(student(images[b], texts[b]), sim[b][:, b])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if on_test is not None and epoch in plan.tests:
                on_test(epoch)
                student.train()
    return student


@torch.no_grad()
def embed_test(
    student: Student, test: PairSet, mean, std, device: torch.device, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features of every test image and text features of every test caption."""
    student.eval()
    feats = []
    for s in range(0, test.n_images, batch):
        pixels = torch.from_numpy(np.array(test.images[s : s + batch]))
        feats.append(student.image(normalize_images(pixels, mean, std).to(device)).cpu())
    texts = [
        student.text(test.texts[s : s + batch].to(device)).cpu()
        for s in range(0, test.n_pairs, batch)
    ]
    return torch.cat(feats), torch.cat(texts)


def student_recall(
    small: SmallSet, test: PairSet, cfg: EvalConfig, k: int, device: torch.device
) -> dict[str, Any]:
    """Train fresh student k (its seed from cfg.seed and k) on a small set: its last-epoch
    test recall, and with the paper protocol the best of its test checkpoints (by mean R@K)."""
    arch = small.arch
    seed = derive_seed(cfg.seed, 1000 + k)
    student = build_student(
        arch["image_encoder"], arch["text_dim"], arch["image_size"], seed, device
    )
    checkpoints: list[dict[str, float]] = []

    def score() -> dict[str, float]:
        img, txt = embed_test(student, test, arch["mean"], arch["std"], device)
        return retrieval_recall(img, txt, test.image_index)

    train_student(student, small, cfg, seed, device, lambda _: checkpoints.append(score()))
    result: dict[str, Any] = {"recall": checkpoints[-1] if checkpoints else score()}
    if checkpoints:
        result["best_on_test"] = best_checkpoint(checkpoints)
    return result


def expert_recall(
    buffers: Buffers, test: PairSet, epoch: int, device: torch.device | str = "cpu"
) -> list[dict[str, float]]:
    """Test recall of every expert at one buffer epoch: what a distilled set that matches the
    segments ending there imitates, so roughly the most it can give."""
    meta = buffers.meta
    student = build_student(meta["image_encoder"], meta["text_dim"], meta["image_size"], 0, device)
    recalls = []
    for index in range(len(buffers.experts)):
        p_img, p_txt, _, _ = buffers.segment(index, epoch, 0)
        with torch.no_grad():
            vector_to_parameters(p_img.to(device, torch.float32), student.image.parameters())
            vector_to_parameters(p_txt.to(device, torch.float32), student.text.parameters())
        img, txt = embed_test(student, test, meta["mean"], meta["std"], torch.device(device))
        recalls.append(retrieval_recall(img, txt, test.image_index))
    return recalls


def best_checkpoint(checkpoints: list[dict[str, float]]) -> dict[str, float]:
    """The first checkpoint with the highest mean R@K (the reference keeps a strict maximum)."""
    best = checkpoints[0]
    for recall in checkpoints[1:]:
        if mean_recall(recall) > mean_recall(best):
            best = recall
    return best


def evaluate_small_set(
    small: SmallSet,
    test: PairSet,
    cfg: EvalConfig,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """num_eval fresh students; per-run last-epoch recalls and their mean ± std (and, with the
    paper protocol, the best-on-test checkpoints' under `best_on_test`)."""
    cfg.check()
    device = torch.device(device)
    arch = small.arch
    if test.image_size != arch["image_size"] or test.text_dim != arch["text_dim"]:
        raise UsageError(
            f"test data has {test.image_size} px images and {test.text_dim}-d texts; the set "
            f"needs {arch['image_size']} px and {arch['text_dim']}-d ({arch['text_encoder']})"
        )
    results = [
        student_recall(small, test, cfg, k, device)
        for k in progress_bar(
            range(cfg.num_eval), desc="evaluate", unit="student", disable=not progress
        )
    ]
    return summarize_students(results)


def summarize_students(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Students' results as R@K mean ± std (`summary`), `runs`, `mean_recall`, and the same
    for the best-on-test checkpoints when present."""
    runs = [r["recall"] for r in results]
    out: dict[str, Any] = {
        "summary": summarize_runs(runs),
        "runs": runs,
        "mean_recall": float(np.mean([mean_recall(r) for r in runs])),
    }
    if all("best_on_test" in r for r in results):
        best = [r["best_on_test"] for r in results]
        out["best_on_test"] = {
            "summary": summarize_runs(best),
            "runs": best,
            "mean_recall": float(np.mean([mean_recall(r) for r in best])),
        }
    return out


def architecture(cfg: dict) -> dict:
    """The student architecture an artifact's config names, its image normalisation and resize
    mode (artifacts made before the resize mode was recorded used crop)."""
    keys = ("image_encoder", "text_encoder", "image_size", "text_dim", "mean", "std")
    return {**{k: cfg[k] for k in keys}, "resize": cfg.get("resize", "crop")}


def artifact_set(art: dict) -> SmallSet:
    """A distilled artifact as a training set: its S, learned η and loss."""
    cfg = art["config"]
    return SmallSet(
        images=art["images"].float(),
        texts=art["texts"].float(),
        similarity=similarity_matrix(art),
        lr_img=float(art["lr_img"]),
        lr_txt=float(art["lr_txt"]),
        loss=str(cfg["loss"]),
        arch=architecture(cfg),
    )


def mtt_artifact(
    art: dict,
    train: PairSet,
    buffers: Buffers,
    device: torch.device | str = "cpu",
    out: str | os.PathLike | None = None,
    progress: bool = True,
    pairs: int | None = None,
) -> dict[str, Any]:
    """The MTT-VL baseline at N pairs (default the artifact's): S fixed to I, cross-entropy."""
    config = mtt_config(artifact_config_of(art))
    if pairs is not None:
        config = replace(config, pairs=pairs)
    extra = {k: art["config"][k] for k in ("data",) if k in art["config"]}
    return distill(
        train,
        buffers,
        config,
        device=device,
        out=out,
        save_every=SAVE_EVERY if out is not None else 0,
        resume=out is not None,
        progress=progress,
        extra_config=extra,
    )


def is_mtt_of(mtt: dict, art: dict, pairs: int | None = None) -> bool:
    """True when artifact MTT is the MTT-VL baseline `mtt_artifact` would distill from ART at
    N pairs: the same settings with S fixed to I and cross-entropy, the same data and buffers."""
    expected = mtt_config(artifact_config_of(art))
    if pairs is not None:
        expected = replace(expected, pairs=pairs)
    same_inputs = all(mtt["config"].get(k) == art["config"].get(k) for k in ("data", "buffers"))
    return same_inputs and artifact_config_of(mtt) == expected


def real_set(art: dict, train: PairSet, chosen: np.ndarray) -> SmallSet:
    """Real pairs as a training set: S = I, cross-entropy, the experts' learning rate."""
    cfg = art["config"]
    lr = float(cfg["expert_lr"])
    return SmallSet(
        images=normalize_images(train.pixels(chosen), cfg["mean"], cfg["std"]),
        texts=train.texts[torch.from_numpy(chosen)].float(),
        similarity=torch.eye(len(chosen)),
        lr_img=lr,
        lr_txt=lr,
        loss="ce",
        arch=architecture(cfg),
    )


def random_set(art: dict, train: PairSet, n: int, seed: int, k: int = 0) -> SmallSet:
    """The random baseline of evaluation student k: N real pairs with distinct images, drawn
    for each student anew and independently of the distillation's initial pairs."""
    return real_set(art, train, pick_init_pairs(train, n, derive_seed(seed, 3000 + k)))


def full_set(art: dict, train: PairSet) -> SmallSet:
    """The full baseline: every real pair."""
    return real_set(art, train, np.arange(train.n_pairs))
