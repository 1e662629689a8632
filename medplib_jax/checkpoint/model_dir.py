"""Our model directory: what a stage exports and what `eval`, `predict`, `serve` and the next
stage read.

  <dir>/params        the parameters (orbax), LoRA merged
  <dir>/config.json   the resolved config that produced them
  <dir>/tokenizer/    the tokenizer files (written by the demo and `medplib convert`)
"""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from configs import stage_config


def save_params(path: str, params) -> str:
  """Writes a params pytree to `<path>/params` (orbax), replacing what was there."""
  path = os.path.abspath(path)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, "params"), params, force=True)
  ckptr.wait_until_finished()
  return path


def save(path: str, params, config) -> str:
  """`<path>/params` and `<path>/config.json` (written by process 0)."""
  path = save_params(path, params)
  if jax.process_index() == 0:
    with open(os.path.join(path, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  return path


def load_params(path: str, abstract_params=None):
  """Reads `<path>/params` (optionally into the shardings of `abstract_params`)."""
  target = os.path.join(os.path.abspath(path), "params")
  if not os.path.isdir(target):
    raise FileNotFoundError(f"{path}: no exported params (expected {target}; run the stage first)")
  ckptr = ocp.StandardCheckpointer()
  if abstract_params is None:
    return ckptr.restore(target)
  return ckptr.restore(target, abstract_params)


def load_config(path: str) -> ml_collections.ConfigDict:
  """`<path>/config.json`. A field it lacks (written before the field existed) takes the default
  of its stage config at its model size, so code reads every field by attribute."""
  file = os.path.join(path, "config.json")
  with open(file) as f:
    stored = json.load(f)
  stage, size = stored.get("stage"), stored.get("model", {}).get("size")
  if stage is None or size is None:
    raise ValueError(f"{file}: no 'stage' / 'model.size' field; not a MedPLIB-JAX model directory")
  return ml_collections.ConfigDict(_with_defaults(stored, stage_config(stage, size).to_dict()))


def _with_defaults(stored: dict, defaults: dict) -> dict:
  out = dict(stored)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = _with_defaults(out[key], value)
  return out
