"""`medplib train --config configs/stageN_*.py:SIZE --workdir DIR [--dry-run] [--config.x=y ...]`."""

import json
import logging
import math

import jax
import numpy as np

from medplib_jax import sharding
from medplib_jax.config_loading import load_config

ACCEPTS_EXTRA = True  # --config.a.b=value overrides


def add_arguments(p):
  p.add_argument("--config", required=True, help="stage config file, e.g. configs/stage4_moe.py:7b")
  p.add_argument("--workdir", help="checkpoints, logs and the stage export go here")
  p.add_argument("--dry-run", action="store_true",
                 help="print the resolved config, the mesh and parameter counts, then exit")
  p.epilog = "Any config field can be overridden: --config.optim.lr=1e-4 --config.mesh.fsdp=8"


def _human(n: int) -> str:
  return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.3f} M"


def dry_run(cfg) -> dict:
  """Resolved config, mesh on the visible devices, parameter counts from shapes only."""
  from medplib_jax.train import trainer
  mesh = sharding.make_mesh(cfg.mesh)
  abstract = trainer.abstract_variables(cfg)["params"]
  import flax.linen as nn
  counts = trainer.component_counts(nn.unbox(abstract))
  mask = trainer.stage_trainable_mask(cfg, nn.unbox(abstract))
  trainable = sum(math.prod(p.shape) for p, m in zip(jax.tree.leaves(nn.unbox(abstract)),
                                                     jax.tree.leaves(mask)) if m)
  return {"mesh": dict(mesh.shape), "devices": len(mesh.devices.flat), "params": counts,
          "total": int(sum(counts.values())), "trainable": int(trainable)}


def run(args) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  # Multi-process jobs (launch/*.py, SLURM, TPU pods) must connect before any device is touched.
  sharding.maybe_initialize_distributed()
  try:
    cfg = load_config(args.config, args.extra)
  except (ValueError, FileNotFoundError) as e:
    print(f"medplib train: {e}")
    return 2
  if args.dry_run:
    print(cfg)
    try:
      info = dry_run(cfg)
    except sharding.MeshError as e:
      print(f"medplib train: {e}")
      return 2
    print(f"mesh: {info['mesh']} over {info['devices']} {jax.default_backend()} device(s)")
    print("parameters (from shapes, nothing allocated):")
    for name, n in info["params"].items():
      print(f"  {name:<16} {n:>15,d}  ({_human(n)})")
    print(f"  {'total':<16} {info['total']:>15,d}  ({_human(info['total'])})")
    print(f"  {'trainable':<16} {info['trainable']:>15,d}  ({_human(info['trainable'])})")
    return 0
  if not args.workdir:
    print("medplib train: --workdir is required (unless --dry-run)")
    return 2
  from medplib_jax.train import run_stage
  result = run_stage.run_from_config(cfg, args.workdir)
  print(json.dumps({"steps": result.steps, "export": result.export_dir,
                    "preempted": result.preempted, "skipped_steps": result.skipped_steps,
                    "final": {k: float(np.round(v, 6)) for k, v in result.final_metrics.items()}}))
  return 0
