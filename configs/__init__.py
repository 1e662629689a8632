"""MedPLIB's stage configs: `configs/stageN_*.py:ARG`, each `get_config(arg)`; ARG is a model size
(configs/common.py SIZES) or, for size demo, `demo,WORKDIR`."""

import importlib

STAGES = {1: "stage1_align", 2: "stage2_vqa", 3: "stage3_ground", 4: "stage4_moe"}


def stage_config(stage: int, arg: str):
  """The config of training stage 1-4 for config arg `arg`: "tiny", "7b", "demo" (the demo in
  runs/demo) or "demo,WORKDIR" (the demo in WORKDIR)."""
  if stage not in STAGES:
    raise ValueError(f"stage {stage!r}: choose one of {sorted(STAGES)}")
  return importlib.import_module(f"configs.{STAGES[stage]}").get_config(arg)
