"""The demo's student towers: each pretrained alone on its own modality, with honest labels."""

from __future__ import annotations

from dataclasses import replace

import torch

from mmcurate.demo.corpus import SHAPES
from mmcurate.demo.faults import DemoSizes, make_teacher_split
from mmcurate.demo.pretrain import (
    PretrainConfig,
    caption_labels,
    image_labels,
    pretrain_image_tower,
    pretrain_text_tower,
)
from mmcurate.demo.teacher import build_model

FAST = PretrainConfig(steps=15, batch_size=16, warmup=3, seed=3)


def _fresh(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model()[0]


def test_caption_labels_read_the_words_and_skip_generic_captions():
    keep, labels = caption_labels(
        ["there is a large blue ring in the top", "a photo", "red cross, small, left of a x"]
    )
    assert keep.tolist() == [0, 2]
    assert labels.tolist() == [[4, 2, 1, 2], [3, 0, 0, 0]]


def test_the_towers_learn_their_own_modality_and_nothing_else():
    split = make_teacher_split(replace(DemoSizes(), train=64), 0)
    assert len(split["concepts"]) == 64
    labels = image_labels(split["concepts"])
    assert labels.shape == (64, 5)
    assert SHAPES[int(labels[0, 0])] == split["concepts"][0].shape
    image, image_stats = pretrain_image_tower(split["images"], split["concepts"], FAST)
    text, text_stats = pretrain_text_tower(split["captions"], FAST)
    assert image_stats["final_loss"] < image_stats["first_loss"]
    assert text_stats["final_loss"] < text_stats["first_loss"]
    # the image model's text tower and the text model's visual tower are their random starts
    start_image, start_text = _fresh(FAST.seed), _fresh(FAST.seed + 1)
    for name, p in image.state_dict().items():
        same = torch.equal(p, start_image.state_dict()[name])
        assert same != name.startswith("visual."), name
    for name, p in text.state_dict().items():
        if name.startswith("visual.") or name == "logit_scale":
            assert torch.equal(p, start_text.state_dict()[name]), name
    assert not torch.equal(
        text.state_dict()["text_projection"], start_text.state_dict()["text_projection"]
    )
