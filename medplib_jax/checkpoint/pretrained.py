"""What a training stage starts from: `load(cfg)` -> flat {param path: array}.

Stage 1 takes the pretrained parts named in `init.clip` / `init.llm` / `init.sam` (each one of
our model directories, or a PyTorch / Hugging Face checkpoint read by the importers); stages 2
and 3 take the previous stage's export (`init.previous_stage`); stage 4 takes stage 3 (the
grounding expert) for everything and builds each MoE FFN from [stage-3 FFN, stage-2 FFN]
(SPEC.md: expert 0 = grounding, expert 1 = VQA). Empty when nothing is named (from scratch).
"""

import logging
import os
from typing import Any

from flax import traverse_util

from medplib_jax.checkpoint import model_dir
from medplib_jax.checkpoint.clip import load_clip_vision
from medplib_jax.checkpoint.llama import load_llama
from medplib_jax.checkpoint.sam import load_sam
from medplib_jax.models.moe import upcycle_ffns

log = logging.getLogger(__name__)


def _flat(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def load(cfg) -> dict[str, Any]:
  """Flat {path: array} of what the stage of `cfg` inherits."""
  init = cfg.init
  if cfg.stage == 4 and init.ground_expert and init.vqa_expert:
    ground = model_dir.load_params(init.ground_expert)
    vqa = model_dir.load_params(init.vqa_expert)
    inherited = {k: v for k, v in _flat(ground).items() if not k.startswith("llm/layers/mlp/")}
    moe = upcycle_ffns([ground["llm"]["layers"]["mlp"], vqa["llm"]["layers"]["mlp"]])
    inherited.update({f"llm/layers/mlp/{k}": v for k, v in _flat(moe).items()})
    return inherited
  if init.previous_stage:
    return _flat(model_dir.load_params(init.previous_stage))
  inherited = {}
  for component, source in (("vision", init.clip), ("llm", init.llm), ("sam", init.sam)):
    if source:
      inherited.update({f"{component}/{k}": v
                        for k, v in _flat(load_component(cfg, component, source)).items()})
  return inherited


def load_component(cfg, component: str, source: str):
  """Params of one component ("vision", "llm" or "sam") from a pretrained source: one of our
  model directories holding that component (an export, a demo stand-in) or a PyTorch / HF
  checkpoint."""
  if os.path.isdir(os.path.join(source, "params")):
    params = model_dir.load_params(source)
    if component not in params:
      raise ValueError(f"{source}: holds no {component!r} params (has {sorted(params)})")
    return params[component]
  if component == "vision":
    params, report = load_clip_vision(source, cfg.model.vision)
  elif component == "llm":
    params, report = load_llama(source, cfg.model.llm, resize_vocab_to=cfg.model.llm.vocab_size)
  else:
    params, report = load_sam(source, cfg.model.sam)
  log.info("init.%s from %s: %s", component, source, {k: v for k, v in report.items() if k != "unmapped"})
  return params
