"""The select-then-distill pipeline: config, stage fingerprints, one thin body per stage, runner."""

from mmcurate.pipeline.config import STAGES, Plan, load_plan, plan_from_dict
from mmcurate.pipeline.runner import run_pipeline

__all__ = ["STAGES", "Plan", "load_plan", "plan_from_dict", "run_pipeline"]
