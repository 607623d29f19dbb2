"""Scores (CLIPScore, negCLIPLoss, NormSim, NormSim-D), selection and resharding.

Names are imported on first use, so `select` never loads the embedding-store code.
"""

from importlib import import_module

_HOMES = {
    "MaxAbsIndex": "scores",
    "clipscore": "scores",
    "gram": "scores",
    "negclip_batchings": "scores",
    "negclip_scores": "scores",
    "normsim_2": "scores",
    "normsim_d_keep": "scores",
    "normsim_inf_exact": "scores",
    "normsim_p": "scores",
    "load_subset": "select",
    "write_subset": "select",
    "load_target": "targets",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    """Import `name` from its module the first time it is asked for."""
    if name not in _HOMES:
        raise AttributeError(f"module 'mmcurate.curate' has no attribute {name!r}")
    return getattr(import_module(f"mmcurate.curate.{_HOMES[name]}"), name)
