"""A stage from its config alone: tokenizer, grain data, step count, logging, MFU, export."""

import logging
import math
import os
import shutil

import jax

from medplib_jax import flops, sharding
from medplib_jax.data import pipeline
from medplib_jax.data.tokenizer import load_tokenizer
from medplib_jax.train import trainer
from medplib_jax.train.metrics_log import MetricsLog

log = logging.getLogger(__name__)


def dataset_size(cfg) -> int:
  return sum(len(pipeline.open_source(pipeline.DatasetEntry.parse(e))) for e in cfg.data.train)


def total_steps(cfg) -> int:
  """`train.steps` when set, else epochs x records / global batch (rounded up)."""
  if cfg.train.steps > 0:
    return int(cfg.train.steps)
  return max(1, math.ceil(cfg.optim.epochs * dataset_size(cfg) / cfg.optim.global_batch_size))


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind.lower()
  for name, peak in flops.PEAK_BF16_FLOPS.items():
    if name.replace("_", " ") in kind or name.replace("tpu_", "") in kind:
      return peak
  return None


def run_from_config(cfg, workdir: str, console: bool = True) -> trainer.StageResult:
  if not cfg.data.tokenizer:
    raise ValueError("config.data.tokenizer is empty: point it at a tokenizer directory "
                     "(e.g. made by `medplib data synth` or a LLaVA checkpoint)")
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  steps = total_steps(cfg)
  data = pipeline.make_train_iterator(cfg, tokenizer, jax.process_index(), jax.process_count())
  step_flops = flops.train_step_flops(cfg, cfg.optim.global_batch_size, cfg.data.max_length)["total"]
  peak = peak_flops_per_device()
  metrics_log = MetricsLog(workdir, steps, desc=f"stage {cfg.stage}", console=console)

  def log_fn(step, metrics):
    t = metrics["step_time_s"]
    metrics["tokens_per_s"] = cfg.optim.global_batch_size * cfg.data.max_length / t
    metrics["model_tflops_per_s"] = step_flops / t / 1e12
    if peak:
      metrics["mfu"] = flops.mfu(step_flops, t, peak, jax.device_count())
    metrics["skipped_records"] = float(data.budget.total)
    metrics_log(step, metrics)

  mesh = sharding.make_mesh(cfg.mesh)
  try:
    result = trainer.train_stage(cfg, workdir, data, steps, mesh=mesh, log_fn=log_fn)
  finally:
    metrics_log.close()
  if result.export_dir and jax.process_index() == 0:
    shutil.copytree(cfg.data.tokenizer, os.path.join(result.export_dir, "tokenizer"),
                    dirs_exist_ok=True)
  return result
