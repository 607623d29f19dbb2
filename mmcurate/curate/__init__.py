"""Scores (CLIPScore, negCLIPLoss, NormSim, NormSim-D), selection and resharding.

Names are imported on first use, so `select` never loads the embedding-store code.
"""

from importlib import import_module

_HOMES = {
    "MaxAbsIndex": "curate.normsim",
    "clipscore": "curate.scores",
    "gram": "curate.normsim",
    "negclip_batchings": "curate.scores",
    "negclip_scores": "curate.scores",
    "normsim_2": "curate.normsim",
    "normsim_d_keep": "curate.normsim",
    "normsim_inf_exact": "curate.normsim",
    "normsim_p": "curate.normsim",
    "ScoreConfig": "curate.score_config",
    "run_score": "curate.score_stage",
    "SelectConfig": "curate.select",
    "run_select": "curate.select",
    "select": "curate.select",
    "ReshardConfig": "curate.reshard",
    "reshard": "curate.reshard",
    "load_target": "curate.targets",
    "load_subset": "data.subset",
    "write_subset": "data.subset",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    """Import `name` from its module the first time it is asked for."""
    if name not in _HOMES:
        raise AttributeError(f"module 'mmcurate.curate' has no attribute {name!r}")
    return getattr(import_module(f"mmcurate.{_HOMES[name]}"), name)
