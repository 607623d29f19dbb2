"""Scores (CLIPScore, negCLIPLoss, NormSim, NormSim-D), selection and resharding."""

from mmcurate.curate.scores import (
    MaxAbsIndex,
    clipscore,
    gram,
    negclip_batchings,
    negclip_scores,
    normsim_2,
    normsim_d_keep,
    normsim_inf_exact,
    normsim_p,
)
from mmcurate.curate.select import load_subset, select, write_subset
from mmcurate.curate.targets import load_target

__all__ = [
    "MaxAbsIndex",
    "clipscore",
    "gram",
    "load_subset",
    "load_target",
    "negclip_batchings",
    "negclip_scores",
    "normsim_2",
    "normsim_d_keep",
    "normsim_inf_exact",
    "normsim_p",
    "select",
    "write_subset",
]
