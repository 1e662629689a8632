"""Ahead-of-time compile of the train step `train_stage` runs, from abstract shapes only.

Nothing is materialised: params come from `jax.eval_shape`, so the 7B step compiles on a laptop
for a fake mesh of N CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`).
Used by `medplib train --compile-only`, `make aot` (bench/aot_7b.py) and the memory-scaling
guard in the tests.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from medplib_jax import sharding
from medplib_jax.data.batch import batch_spec, original_mask_hw
from medplib_jax.models.medplib import abstract_variables
from medplib_jax.train import trainer

GIB = 1024 ** 3
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes")


def memory_report(compiled) -> dict:
  """Per-device bytes of a compiled step; peak = inputs + outputs not aliased to donated inputs
  + scratch (what is live at the step's high-water mark)."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, k)) for k in MEMORY_FIELDS}
  out["peak_bytes_per_device"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                  - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  out["peak_gib_per_device"] = out["peak_bytes_per_device"] / GIB
  return out


def lower_train_step(cfg, mesh, global_batch: int, total_steps: int = 1000):
  """Lowers `trainer.make_train_step(cfg, ...)` for `global_batch` sequences of
  cfg.data.max_length tokens over `mesh`, under cfg.logical_axis_rules, with the shardings and
  donation `train_stage` uses. Returns (lowered, params) (params: abstract, for counting)."""
  rules = sharding.rules_tuple(cfg.logical_axis_rules)
  model = trainer.build_model(cfg)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = abstract_variables(model, cfg.data.max_length)["params"]
    param_shardings = sharding.logical_to_shardings(boxed, mesh, rules)
    params = sharding.strip_boxes(boxed)
    mask = trainer.stage_trainable_mask(cfg, params)
    trainable, frozen = trainer.partition(params, mask)
    trainable_sh, frozen_sh = trainer.partition(param_shardings, mask)
    tx, schedule = trainer.make_optimizer(cfg.optim, total_steps=total_steps)
    # Adam moments take their param's sharding: read them off a compiled tx.init.
    opt_sh = jax.jit(tx.init, in_shardings=(trainable_sh,)).lower(trainable).compile().output_shardings
    replicated = NamedSharding(mesh, PartitionSpec())
    state = trainer.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable,
                               frozen=frozen, opt_state=jax.eval_shape(tx.init, trainable),
                               rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    state_sh = trainer.TrainState(step=replicated, trainable=trainable_sh, frozen=frozen_sh,
                                  opt_state=opt_sh, rng=replicated)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                         state_sh)
    spec = batch_spec(cfg.model, cfg.data.max_length, original_mask_hw(cfg))
    batch_sh = {k: sharding.batch_sharding(mesh, 1 + len(s), rules) for k, (s, _) in spec.items()}
    batch = {k: jax.ShapeDtypeStruct((global_batch,) + s, d, sharding=batch_sh[k])
             for k, (s, d) in spec.items()}
    step_fn = trainer.make_train_step(cfg, model, tx, schedule)
    jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                     donate_argnums=0)
    return jitted.lower(state, batch), params


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", -1.0))


def compile_report(cfg, mesh, global_batch: int) -> dict:
  """Compiles the train step and returns its per-device memory, XLA FLOPs and timings."""
  t0 = time.perf_counter()
  lowered, params = lower_train_step(cfg, mesh, global_batch)
  t_lower = time.perf_counter() - t0
  compiled = lowered.compile()
  t_compile = time.perf_counter() - t0 - t_lower
  trainable, _ = trainer.partition(params, trainer.stage_trainable_mask(cfg, params))
  return dict(mesh=dict(mesh.shape), devices=mesh.size, global_batch=global_batch,
              seq_len=int(cfg.data.max_length), kernels=cfg.model.llm.kernels,
              params=trainer.count_params(params), trainable_params=trainer.count_params(trainable),
              component_params=trainer.component_counts(params), memory=memory_report(compiled),
              xla_flops_per_device=xla_flops(compiled), lower_s=t_lower, compile_s=t_compile)
