"""The LoRS reference's protocol: the experts' images, and what each distillation iteration draws
(start epoch, expert order, mini-batches, initial pairs)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from mmcurate.demo.corpus import make_pairs
from mmcurate.distill import matching
from mmcurate.distill.augment import (
    ExpertAugment,
    apply_op,
    crop_box,
    rotation_matrix,
    warp_affine,
)
from mmcurate.distill.buffers import BufferConfig, derive_seed, expert_trajectory, load_buffers
from mmcurate.distill.data import PairSet, pairs_from_arrays
from mmcurate.distill.distiller import distill, initial_images
from mmcurate.distill.presets import resolve_config
from mmcurate.distill.sampling import expert_for, mini_batches, pick_init_pairs, start_epoch
from mmcurate.distill.students import Student, normalize_images

TEXT = "hf-text:mmc-tiny-bert"
# the reference's data/__init__.py: transforms.Normalize((0.48145466, ...), (0.26862954, ...))
REFERENCE_MEAN = (0.48145466, 0.4578275, 0.40821073)
REFERENCE_STD = (0.26862954, 0.26130258, 0.27577711)
REFERENCE_STEPS = [
    "RandomResizedCrop(size=32, scale=(0.5, 1.0), ratio=(3/4, 4/3), bicubic)",
    "RandomHorizontalFlip(p=0.5)",
    "RandomAugment(n=2, m=5, p=0.5, ops=['Identity', 'AutoContrast', 'Brightness', "
    "'Sharpness', 'Equalize', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate'])",
    "ToTensor",
    "Normalize(clip)",
]


@pytest.fixture(scope="module")
def pairs() -> PairSet:
    raw = make_pairs(40, seed=4)
    return pairs_from_arrays(raw["images"], raw["captions"], TEXT)


def _first_batch(pairs, config, monkeypatch):
    seen = []
    forward = Student.forward

    def spy(self, images, texts):
        seen.append((images.detach().clone(), texts.detach().clone()))
        return forward(self, images, texts)

    monkeypatch.setattr(Student, "forward", spy)
    expert_trajectory(pairs, config, index=0)
    return seen


def _on_the_255_grid(images, mean, std):
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    levels = (images * s + m) * 255
    return float((levels - levels.round()).abs().max())


def test_the_first_expert_batch_follows_the_reference(pairs, monkeypatch):
    config = BufferConfig(
        experts=1, epochs=1, batch_size=16, image_encoder="convnet-w4-d2", text_encoder=TEXT,
        image_size=32, seed=5,
    )  # fmt: skip
    seen = _first_batch(pairs, config, monkeypatch)
    assert [len(t) for _, t in seen] == [16, 16]  # 40 pairs: two full batches, the rest dropped
    images, texts = seen[0]
    order = torch.randperm(40, generator=torch.Generator().manual_seed(derive_seed(5, 0, 1)))
    assert torch.equal(texts, pairs.texts[order[:16]])
    # CLIP's mean/std: the batch maps back onto whole 8-bit levels; ImageNet's would not
    assert _on_the_255_grid(images, REFERENCE_MEAN, REFERENCE_STD) < 1e-3
    assert _on_the_255_grid(images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) > 0.1
    plain = normalize_images(pairs.pixels(order[:16].numpy()), REFERENCE_MEAN, REFERENCE_STD)
    changed = [not torch.equal(a, b) for a, b in zip(images, plain, strict=True)]
    assert sum(changed) >= 12
    draws = torch.Generator().manual_seed(derive_seed(5, 0, 3))
    again = ExpertAugment(32)(pairs.pixels(order[:16].numpy()), draws)
    assert torch.equal(images, normalize_images(again, REFERENCE_MEAN, REFERENCE_STD))
    assert ExpertAugment(32).steps() + ["ToTensor", "Normalize(clip)"] == REFERENCE_STEPS

    monkeypatch.undo()
    flat = BufferConfig(**{**config.__dict__, "augment": False})
    seen = _first_batch(pairs, flat, monkeypatch)
    assert torch.equal(seen[0][0], plain)


def test_buffers_record_the_protocol(pairs, tmp_path):
    from mmcurate.distill.buffers import make_buffers
    from mmcurate.engine import LocalExecutor

    config = BufferConfig(
        experts=1, epochs=1, batch_size=16, image_encoder="convnet-w4-d2", text_encoder=TEXT,
        image_size=32,
    )  # fmt: skip
    make_buffers(pairs, tmp_path, config, LocalExecutor(1, 1), device="cpu")
    protocol = load_buffers(tmp_path).experts[0]["meta"]["protocol"]
    assert protocol == {
        "augment": True,
        "normalize": "clip",
        "mean": list(REFERENCE_MEAN),
        "std": list(REFERENCE_STD),
        "resize": "squash",
        "transforms": REFERENCE_STEPS,
        "drop_last": True,
    }


def test_crop_boxes_and_flips_have_the_reference_distribution():
    from torchvision.transforms.v2 import RandomResizedCrop

    gen = torch.Generator().manual_seed(0)
    boxes = [crop_box(224, 224, (0.5, 1.0), (3 / 4, 4 / 3), gen) for _ in range(2000)]
    torch.manual_seed(0)
    oracle = RandomResizedCrop(224, scale=(0.5, 1.0))
    image = torch.zeros(3, 224, 224)
    reference = [tuple(oracle.make_params([image]).values()) for _ in range(2000)]
    for got in (boxes, reference):
        assert all(t + h <= 224 and left + w <= 224 for t, left, h, w in got)
    areas, ref_areas = ([h * w / 224**2 for _, _, h, w in b] for b in (boxes, reference))
    aspects, ref_aspects = ([w / h for _, _, h, w in b] for b in (boxes, reference))
    assert min(areas) > 0.49 and max(areas) <= 1.0
    assert abs(np.mean(areas) - np.mean(ref_areas)) < 0.01
    assert abs(np.std(areas) - np.std(ref_areas)) < 0.01
    assert abs(np.mean(aspects) - np.mean(ref_aspects)) < 0.01
    assert min(aspects) > 0.74 and max(aspects) < 1.35
    aug = ExpertAugment(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), n_ops=0)
    img = torch.arange(8 * 8 * 3, dtype=torch.uint8).reshape(1, 8, 8, 3)
    outs = [aug(img, gen) for _ in range(1000)]
    flipped = [torch.equal(out, img.flip(2)) for out in outs]
    assert all(f or torch.equal(out, img) for f, out in zip(flipped, outs, strict=True))
    assert abs(np.mean(flipped) - 0.5) < 0.06


def test_geometric_operations_follow_opencv_conventions():
    gen = torch.Generator().manual_seed(1)
    img = torch.zeros(3, 16, 16, dtype=torch.uint8)
    img[:, 6, 9] = 200
    moved = apply_op(img, "TranslateX", 5, gen)
    offset = int(np.argwhere(moved[0].numpy() == 200)[0][1]) - 9
    assert abs(offset) == 5  # magnitude 5 of 10: 5 pixels, either way
    shifted = torch.full_like(img, 128)
    if offset > 0:
        shifted[:, :, offset:] = img[:, :, :-offset]
    else:
        shifted[:, :, :offset] = img[:, :, -offset:]
    assert torch.equal(moved, shifted)
    sheared = warp_affine(img, torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0]]).double())
    assert sheared[0, 6, 12] == 200  # x' = x + 0.5 y = 9 + 3
    quarter = warp_affine(img, torch.tensor(rotation_matrix(90, 7.5, 7.5)).double())
    assert torch.equal(quarter, torch.rot90(img, 1, dims=(1, 2)))
    for name in ("Brightness", "Sharpness", "Identity"):
        assert torch.equal(apply_op(img, name, 5, gen), img)  # factor 1.0 at magnitude 5


def test_start_epochs_and_mini_batches_over_1000_draws():
    gen = torch.Generator().manual_seed(3)
    epochs = Counter(start_epoch(2, gen) for _ in range(1000))
    assert set(epochs) == {0, 1} and abs(epochs[0] - 500) < 80
    three = Counter(start_epoch(3, gen) for _ in range(1000))
    assert set(three) == {0, 1, 2} and min(three.values()) > 250
    distinct = []
    for _ in range(1000):
        batches = mini_batches(99, 20, 8, gen)
        assert [len(b) for b in batches] == [20] * 8
        assert len(set(torch.cat(batches[:4]).tolist())) == 80  # one permutation's slices
        assert len(set(torch.cat(batches[4:]).tolist())) == 80
        distinct.append(len(set(torch.cat(batches).tolist())))
    expected = 99 * (1 - (19 / 99) ** 2)  # a row is missed by both permutations w.p. (19/99)²
    assert abs(np.mean(distinct) - expected) < 0.3
    assert [len(b) for b in mini_batches(6, 20, 3, gen)] == [6, 6, 6]


def test_experts_come_in_shuffled_cycles():
    orders = [[expert_for(7, 5, c * 5 + i) for i in range(5)] for c in range(6)]
    assert all(sorted(order) == list(range(5)) for order in orders)
    assert len({tuple(o) for o in orders}) > 1


def test_initial_pairs_random_or_distinct_images():
    index = np.repeat(np.arange(10), 5)
    pairs = PairSet(
        images=np.zeros((10, 4, 4, 3), np.uint8),
        image_index=index,
        texts=torch.zeros(50, 2),
        captions=[str(i) for i in range(50)],
        uids=[str(i) for i in range(50)],
    )
    repeats = 0
    for seed in range(20):
        chosen = pick_init_pairs(pairs, 8, seed, "random")
        assert len(set(chosen.tolist())) == 8
        repeats += len(set(index[chosen].tolist())) < 8
        assert len(set(index[pick_init_pairs(pairs, 8, seed, "distinct")].tolist())) == 8
    assert repeats > 10  # 8 of 50 captions of 10 images almost always share an image


def test_initial_images_are_augmented_as_the_experts_unless_turned_off(pairs):
    chosen = np.arange(6)
    meta = {"mean": REFERENCE_MEAN, "std": REFERENCE_STD}
    plain = normalize_images(pairs.pixels(chosen), REFERENCE_MEAN, REFERENCE_STD)
    off = initial_images(pairs, chosen, resolve_config("tiny", augment=False, seed=3), meta)
    assert torch.equal(off, plain)
    on = initial_images(pairs, chosen, resolve_config("tiny", augment=True, seed=3), meta)
    again = initial_images(pairs, chosen, resolve_config("tiny", augment=True, seed=3), meta)
    other = initial_images(pairs, chosen, resolve_config("tiny", augment=True, seed=4), meta)
    assert on.shape == plain.shape and torch.equal(on, again)
    changed = [not torch.equal(a, b) for a, b in zip(on, plain)]
    assert sum(changed) == len(chosen)  # every image cropped (scale < 1 almost surely)
    assert not torch.equal(on, other)  # the draws follow the seed
    assert resolve_config("flickr-100").augment and not resolve_config("coco-500").augment


def test_distill_loop_draws_as_the_reference(pairs, tmp_path, monkeypatch):
    from mmcurate.distill.buffers import make_buffers
    from mmcurate.engine import LocalExecutor

    config = BufferConfig(
        experts=3, epochs=2, batch_size=16, image_encoder="convnet-w4-d2", text_encoder=TEXT,
        image_size=32, augment=False,
    )  # fmt: skip
    make_buffers(pairs, tmp_path, config, LocalExecutor(1, 1), device="cpu")
    buffers = load_buffers(tmp_path)
    segments, sizes = [], []
    real_segment = type(buffers).segment

    def segment(self, expert, start, length):
        segments.append((expert, start, length))
        return real_segment(self, expert, start, length)

    monkeypatch.setattr(type(buffers), "segment", segment)

    def fake(student, loss_fn, syn, seg, batches, merge):
        sizes.append([len(b) for b in batches])
        return matching.MatchResult(1.0, 0.5, 0.5)

    monkeypatch.setitem(matching.MATCHERS, "tesla", fake)
    monkeypatch.setattr("mmcurate.distill.distiller.MATCHERS", matching.MATCHERS)
    cfg = resolve_config("tiny", pairs=9, mini_batch=4, iterations=12, expert_epochs=1, seed=1)
    distill(pairs, buffers, cfg, progress=False)
    assert [sorted(e for e, _, _ in segments[c : c + 3]) for c in (0, 3, 6, 9)] == [[0, 1, 2]] * 4
    assert {s for _, s, _ in segments} == {0, 1} and {n for _, _, n in segments} == {1}
    assert sizes == [[4] * 8] * 12 and cfg.max_start_epoch == 2
