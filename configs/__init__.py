"""MedPLIB's stage configs: `configs/stageN_*.py:SIZE`, each `get_config(size)`."""

import importlib

STAGES = {1: "stage1_align", 2: "stage2_vqa", 3: "stage3_ground", 4: "stage4_moe"}


def stage_config(stage: int, size: str):
  """The config of training stage 1-4 at model size `size` ("tiny" or "7b")."""
  if stage not in STAGES:
    raise ValueError(f"stage {stage!r}: choose one of {sorted(STAGES)}")
  return importlib.import_module(f"configs.{STAGES[stage]}").get_config(size)
