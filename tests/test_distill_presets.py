"""The published presets hold the values of the reference's scripts, flag for flag."""

from __future__ import annotations

import pytest

from mmcurate.distill.presets import PRESETS, DistillConfig, resolve_config
from mmcurate.errors import UsageError

# silicx/LoRS_Distill sh/distill_{flickr,coco}_lors_{100,200,500}.sh, with the defaults of
# distill_tesla_lors.py for what a script leaves out (--Iteration 3000, --temperature 0.07,
# no --merge_loss_branches, no --no_aug, --lr_teacher_* 0.1, momenta 0.5, real pixel init)
REFERENCE = {
    "flickr-100": dict(pairs=99, lr_img=100, lr_txt=100, lr_sim=10, rank=10, alpha=3,
                       mini_batch=20, max_start_epoch=2),
    "flickr-200": dict(pairs=199, lr_img=1000, lr_txt=1000, lr_sim=10, rank=5, alpha=1,
                       mini_batch=20, max_start_epoch=2),
    "flickr-500": dict(pairs=499, lr_img=1000, lr_txt=1000, lr_sim=100, rank=20, alpha=0.01,
                       mini_batch=40, max_start_epoch=3),
    "coco-100": dict(pairs=99, lr_img=1000, lr_txt=1000, lr_sim=5, rank=10, alpha=1,
                     mini_batch=20, max_start_epoch=2, merge_loss_branches=True),
    "coco-200": dict(pairs=199, lr_img=1000, lr_txt=1000, lr_sim=50, rank=20, alpha=1,
                     mini_batch=20, max_start_epoch=2, merge_loss_branches=True,
                     iterations=2000),
    "coco-500": dict(pairs=499, lr_img=5000, lr_txt=5000, lr_sim=500, rank=40, alpha=1,
                     mini_batch=30, max_start_epoch=2, merge_loss_branches=True,
                     temperature=0.1, augment=False),
}  # fmt: skip
COMMON = dict(iterations=3000, syn_steps=8, expert_epochs=1, lr_lr=0.01, eta_init=0.1,
              momentum=0.5, temperature=0.07, merge_loss_branches=False, augment=True,
              init="random", loss="wbce", eta_param="linear", learn_sim=True)  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_published_presets_equal_the_reference_scripts(name):
    config = resolve_config(name)
    for key, value in {**COMMON, **REFERENCE[name]}.items():
        assert getattr(config, key) == value, (name, key)


def test_overrides_and_bad_values():
    assert resolve_config("coco-500", temperature=0.05, augment=True).temperature == 0.05
    assert resolve_config("coco-100", merge_loss_branches=False).merge_loss_branches is False
    assert resolve_config("flickr-100", eta_param="log").eta_param == "log"
    assert set(PRESETS["tiny"]) <= {f for f in DistillConfig.__dataclass_fields__}
    with pytest.raises(UsageError, match="unknown --init 'first'"):
        resolve_config("tiny", init="first")
    with pytest.raises(UsageError, match="unknown --eta-param 'exp'"):
        resolve_config("tiny", eta_param="exp")
    with pytest.raises(UsageError, match="--max-start-epoch must be >= 1"):
        resolve_config("tiny", max_start_epoch=0)
