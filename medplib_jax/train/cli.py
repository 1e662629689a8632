"""`medplib train --config configs/stageN_*.py:SIZE --workdir DIR [--dry-run | --compile-only
[--devices N]] [--config.x=y ...]`."""

import json
import logging
import math
import sys

import flax.linen as nn
import jax
import numpy as np

from medplib_jax import sharding
from medplib_jax.config_loading import load_config
from medplib_jax.models import kernels
from medplib_jax.models.medplib import abstract_variables
from medplib_jax.train import aot, run_stage, trainer

ACCEPTS_EXTRA = True  # --config.a.b=value overrides


def add_arguments(p):
  p.add_argument("--config", required=True, help="stage config file, e.g. configs/stage4_moe.py:7b")
  p.add_argument("--workdir", help="checkpoints, logs and the stage export go here")
  p.add_argument("--dry-run", action="store_true",
                 help="print the resolved config, the mesh and parameter counts, then exit")
  p.add_argument("--compile-only", action="store_true",
                 help="compile the stage's train step ahead of time from shapes (nothing is "
                      "allocated, no data read) for the config's mesh and optim.global_batch_size; "
                      "print per-device memory and FLOPs as JSON, then exit")
  p.add_argument("--devices", type=int, default=0,
                 help="with --compile-only: compile for this many fake CPU devices (a pod's "
                      "device count), e.g. --devices 256 --config.mesh.fsdp=-1 "
                      "--config.model.llm.kernels=tpu")
  p.epilog = "Any config field can be overridden: --config.optim.lr=1e-4 --config.mesh.fsdp=8"


def _human(n: int) -> str:
  return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.3f} M"


def dry_run(cfg) -> dict:
  """Resolved config, mesh on the visible devices, parameter counts from shapes only."""
  mesh = sharding.make_mesh(cfg.mesh)
  abstract = abstract_variables(trainer.build_model(cfg), cfg.data.max_length)["params"]
  counts = trainer.component_counts(nn.unbox(abstract))
  mask = trainer.stage_trainable_mask(cfg, nn.unbox(abstract))
  trainable = sum(math.prod(p.shape) for p, m in zip(jax.tree.leaves(nn.unbox(abstract)),
                                                     jax.tree.leaves(mask)) if m)
  return {"mesh": dict(mesh.shape), "devices": len(mesh.devices.flat), "params": counts,
          "total": int(sum(counts.values())), "trainable": int(trainable)}


def compile_only(cfg, devices: int) -> int:
  """Ahead-of-time compile of exactly the step `medplib train` would run (train/aot.py)."""
  if devices:  # before any device is touched: the CPU client is created with this many
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", devices)
  try:
    mesh = sharding.make_mesh(cfg.mesh)
    kernel_set = kernels.resolve(cfg.model.llm.kernels)
  except (sharding.MeshError, ValueError) as e:
    print(f"medplib train: {e}")
    return 2
  batch = int(cfg.optim.global_batch_size)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_tuple(cfg.logical_axis_rules)):
    shards = sharding.batch_shards()
  if batch % shards:
    print(f"medplib train: optim.global_batch_size={batch} does not split over the {shards} batch "
          f"shards of mesh {dict(mesh.shape)}; set --config.optim.global_batch_size to a multiple "
          f"of {shards}")
    return 2
  if devices and cfg.model.llm.kernels == "auto":
    print(f"medplib train: compiling the {kernel_set} kernel set; pass "
          "--config.model.llm.kernels=tpu (or gpu) for what a pod compiles", file=sys.stderr)
  report = aot.compile_report(cfg, mesh, batch)
  report.update(backend=jax.default_backend(), kernels_compiled=kernel_set)
  print(json.dumps(report))
  return 0


def run(args) -> int:
  # force: an imported library may already have put a handler on the root logger.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      force=True)
  try:
    cfg = load_config(args.config, args.extra)
  except (ValueError, FileNotFoundError) as e:
    print(f"medplib train: {e}")
    return 2
  if args.compile_only:
    return compile_only(cfg, args.devices)
  if args.devices:
    print("medplib train: --devices goes with --compile-only")
    return 2
  # Multi-process jobs (launch/*.py, SLURM, TPU pods) must connect before any device is touched.
  sharding.maybe_initialize_distributed()
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
  result = run_stage.run_from_config(cfg, args.workdir)
  print(json.dumps({"steps": result.steps, "export": result.export_dir,
                    "preempted": result.preempted, "skipped_steps": result.skipped_steps,
                    "final": {k: float(np.round(v, 6)) for k, v in result.final_metrics.items()}}))
  return 0
