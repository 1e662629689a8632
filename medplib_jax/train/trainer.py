"""One MedPLIB training stage over a device mesh: init (from the previous stage), the jitted step,
orbax checkpoints with the grain iterator state, metrics, and the end-of-stage export.

Read top to bottom: Mesh -> Model -> Init -> Optimizer -> Update step -> Loop.
"""

import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from medplib_jax import sharding
from medplib_jax.checkpoint import model_dir, pretrained
from medplib_jax.data.batch import batch_spec, original_mask_hw
from medplib_jax.models import lora as lora_lib
from medplib_jax.models.medplib import RNG_STREAMS, MedPLIB, abstract_variables, dummy_batch
from medplib_jax.train import checkpointing, losses

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("skip", "halt")


class NonFiniteStep(FloatingPointError):
  """train.on_nonfinite="halt": a step's loss or gradient norm was NaN/Inf (names the step)."""


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `trainable` and `frozen` partition the params (None holes)."""
  step: jax.Array
  trainable: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array  # raw key data (uint32), so it checkpoints like any array

  def params(self):
    return combine(self.trainable, self.frozen)


# --- param tree helpers ------------------------------------------------------------------------

def partition(params, mask):
  """Splits params into (trainable, frozen) trees with None where the other one holds a leaf."""
  trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
  frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
  return trainable, frozen


def combine(trainable, frozen):
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                      is_leaf=lambda x: x is None)


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def count_params(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def component_counts(params) -> dict[str, int]:
  """Parameter counts per top-level component (vision, projector, llm, sam, ...)."""
  return {name: count_params(sub) for name, sub in params.items()}


# --- Model -------------------------------------------------------------------------------------

def build_model(cfg) -> MedPLIB:
  return MedPLIB(cfg.model, cfg.lora if cfg.lora.rank else None)


# --- Init --------------------------------------------------------------------------------------

def init_params(cfg, model, mesh, inherited: dict[str, Any], key):
  """Sharded params: inherited leaves are placed as they are, only new leaves are initialised.

  The init runs under jit with the final out_shardings; XLA drops the init of every leaf that
  is overwritten, so nothing is first materialised on one device.
  """
  rules = cfg.logical_axis_rules
  abstract = abstract_variables(model, cfg.data.max_length)["params"]
  shardings = sharding.logical_to_shardings(abstract, mesh, rules)
  abstract_flat = flat(sharding.strip_boxes(abstract))
  for path, value in inherited.items():
    if path in abstract_flat and tuple(abstract_flat[path].shape) != tuple(np.shape(value)):
      raise ValueError(f"inherited param {path} has shape {tuple(np.shape(value))}, this stage's "
                       f"model expects {tuple(abstract_flat[path].shape)}")
  inherited = {k: v for k, v in inherited.items() if k in abstract_flat}
  unused = sorted(set(abstract_flat) - set(inherited))
  log.info("init: %d params inherited, %d initialised fresh", len(inherited), len(unused))
  shardings_flat = flat(shardings)
  placed = {k: jax.device_put(np.asarray(v), shardings_flat[k]) for k, v in inherited.items()}

  def init_fn(key, placed):
    rngs = {"params": key, **{s: key for s in RNG_STREAMS}}
    fresh = flat(nn.unbox(model.init(rngs, dummy_batch(cfg.model, cfg.data.max_length),
                                     deterministic=True)["params"]))
    fresh.update({k: v.astype(fresh[k].dtype) for k, v in placed.items()})
    return traverse_util.unflatten_dict(fresh, sep="/")

  return jax.jit(init_fn, out_shardings=shardings)(key, placed)


# --- Optimizer ---------------------------------------------------------------------------------

def learning_rate_schedule(optim, total_steps: int):
  warmup = max(1, int(round(total_steps * optim.warmup_ratio)))
  decay = max(1, total_steps - warmup)
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, warmup + decay, 0.0)
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup),
                               optax.linear_schedule(optim.lr, 0.0, decay)], [warmup])


def make_optimizer(optim, total_steps: int):
  schedule = learning_rate_schedule(optim, total_steps)
  tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip),
                   optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay))
  return tx, schedule


def stage_trainable_mask(cfg, params):
  return lora_lib.trainable_mask(params, list(cfg.trainable), train_lora=True)


# --- Update step -------------------------------------------------------------------------------

def micro_batches(x, accum: int, shards: int):
  """[B, ...] -> [accum, B / accum, ...]. Micro-batch i takes the i-th accum-th of every batch
  shard's rows, so each micro-batch stays spread over all shards as the batch is (no reshard)."""
  b = x.shape[0]
  n = shards if b % (shards * accum) == 0 else 1
  y = x.reshape((n, accum, b // (n * accum)) + x.shape[1:])
  return jnp.swapaxes(y, 0, 1).reshape((accum, b // accum) + x.shape[1:])


def make_train_step(cfg, model, tx, schedule):
  """(state, batch) -> (state, metrics); batch arrays are global [B, ...]."""
  accum = int(cfg.optim.grad_accum_steps)
  weights = cfg.loss
  aux_coef = float(cfg.model.moe.aux_loss_coef)

  def loss_fn(trainable, frozen, micro_batch, key):
    rngs = dict(zip(RNG_STREAMS, jax.random.split(key, len(RNG_STREAMS))))
    outputs = model.apply({"params": combine(trainable, frozen)}, micro_batch,
                          deterministic=False, rngs=rngs)
    loss, metrics = losses.total_loss(outputs, micro_batch, weights, aux_coef)
    for name, value in outputs["moe_stats"].items():
      metrics[f"moe_{name}"] = value
    return loss, metrics

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if accum == 1:
      (_, metrics), grads = grad_fn(state.trainable, state.frozen, batch, key)
    else:
      shards = sharding.batch_shards()
      micro = jax.tree.map(lambda x: micro_batches(x, accum, shards), batch)

      def body(carry, inputs):
        i, mb = inputs
        (_, m), g = grad_fn(state.trainable, state.frozen, mb, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, g), m

      zeros = jax.tree.map(jnp.zeros_like, state.trainable)
      grads, metrics = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
      grads = jax.tree.map(lambda g: g / accum, grads)
      metrics = jax.tree.map(jnp.mean, metrics)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
    updates, new_opt = tx.update(grads, state.opt_state, state.trainable)
    new_trainable = optax.apply_updates(state.trainable, updates)
    # A non-finite loss or gradient skips the update (counted in metrics); params stay clean.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    state = state.replace(step=state.step + 1, trainable=keep(new_trainable, state.trainable),
                          opt_state=keep(new_opt, state.opt_state))
    metrics.update(grad_norm=grad_norm, lr=schedule(state.step - 1), skipped=1 - finite.astype(jnp.int32))
    return state, metrics

  return step_fn


def init_state(cfg, model, mesh, total_steps: int):
  """The stage's starting TrainState (inherited + fresh params), optimizer and lr schedule.

  Call inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(...)`.
  """
  params = init_params(cfg, model, mesh, pretrained.load(cfg), jax.random.key(cfg.seed))
  trainable, frozen = partition(params, stage_trainable_mask(cfg, params))
  tx, schedule = make_optimizer(cfg.optim, total_steps)
  state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                     opt_state=jax.jit(tx.init)(trainable),
                     rng=jax.random.key_data(jax.random.key(cfg.seed + 1)))
  return state, tx, schedule


# --- Loop --------------------------------------------------------------------------------------

@dataclasses.dataclass
class StageResult:
  steps: int
  final_metrics: dict
  export_dir: str
  history: list
  skipped_steps: int = 0    # non-finite steps skipped by this process (train.on_nonfinite="skip")
  preempted: bool = False   # SIGTERM: checkpointed at `steps` and stopped early, nothing exported


class PreemptionFlag:
  """Sets itself on SIGTERM while installed (main thread only); the loop checks it between steps.

  Cloud schedulers send SIGTERM before killing a preemptible job; the loop answers by saving a
  checkpoint at the current step and returning, so the restarted job resumes from it.
  """

  def __init__(self):
    self.event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def _on_signal(self, signum, frame):
    log.warning("SIGTERM: checkpointing at the end of the current step, then stopping")
    self.event.set()

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def is_set(self) -> bool:
    return self.event.is_set()


def train_stage(cfg, workdir: str, data_iterator: Iterator, total_steps: int, *,
                mesh=None, log_fn=None, export: bool = True) -> StageResult:
  """Runs (or resumes) one stage for `total_steps` steps over host-local batches from
  `data_iterator` (a grain iterator: its state is checkpointed with the model).

  A non-finite step keeps the previous params (make_train_step); train.on_nonfinite="skip" counts
  it (metric `skipped_steps`), "halt" raises NonFiniteStep before anything is checkpointed. On
  SIGTERM the current step is checkpointed (waited for) and the result has preempted=True.
  """
  policy = cfg.train.on_nonfinite
  if policy not in NONFINITE_POLICIES:
    raise ValueError(f"train.on_nonfinite={policy!r}: expected one of {NONFINITE_POLICIES}")
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  rules = sharding.rules_tuple(cfg.logical_axis_rules)
  model = build_model(cfg)
  keys = set(batch_spec(cfg.model, cfg.data.max_length, original_mask_hw(cfg)))
  history = []
  with PreemptionFlag() as preempt, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, tx, schedule = init_state(cfg, model, mesh, total_steps)
    mngr = checkpointing.manager(workdir, cfg.train.keep_checkpoints, cfg.train.checkpoint_every)
    start, restored = checkpointing.restore_latest(mngr, state, data_iterator,
                                                   fallback=cfg.train.checkpoint_fallback)
    if restored is not None:
      state = restored
      log.info("resumed from step %d in %s", start, workdir)
    step_fn = jax.jit(make_train_step(cfg, model, tx, schedule), donate_argnums=(0,))
    t_last = time.perf_counter()
    step = int(state.step)
    skipped_total = jnp.zeros((), jnp.int32)  # summed on device: no host sync per step
    while step < total_steps and not preempt.is_set():
      host_batch = {k: v for k, v in next(data_iterator).items() if k in keys}
      batch = sharding.host_to_global(host_batch, mesh, rules)
      state, metrics = step_fn(state, batch)
      step += 1
      skipped_total = skipped_total + metrics["skipped"]
      if policy == "halt" and int(metrics["skipped"]):
        mngr.wait_until_finished()  # earlier checkpoints complete; this state is never saved
        raise NonFiniteStep(
            f"step {step}: non-finite loss ({float(metrics['loss'])}) or gradient norm "
            f"({float(metrics['grad_norm'])}) with train.on_nonfinite='halt'; the last checkpoint "
            f"in {workdir} holds the state before it. Set train.on_nonfinite='skip' to skip such steps.")
      if step % cfg.train.log_every == 0 or step == total_steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
        now = time.perf_counter()
        metrics["step_time_s"] = (now - t_last) / cfg.train.log_every
        t_last = now
        metrics["step"] = step
        metrics["skipped_steps"] = float(skipped_total)
        history.append(metrics)
        if log_fn:
          log_fn(step, metrics)
      checkpointing.save(mngr, step, state, data_iterator,
                         force=step == total_steps or preempt.is_set())
    mngr.wait_until_finished()
    preempted = preempt.is_set() and step < total_steps
    if preempted and step not in mngr.all_steps():  # SIGTERM before the first step
      checkpointing.save(mngr, step, state, data_iterator, force=True)
      mngr.wait_until_finished()
    export_dir = ""
    if export and not preempted:
      final = state.params()
      if cfg.lora.rank:
        final = lora_lib.merge_lora(final, cfg.lora.alpha / cfg.lora.rank)
      export_dir = model_dir.save(os.path.join(workdir, "export"), final, cfg)
    if preempted:
      log.warning("preempted: checkpoint at step %d in %s; rerun the same command to resume",
                  step, workdir)
  return StageResult(steps=step, final_metrics=history[-1] if history else {}, export_dir=export_dir,
                     history=history, skipped_steps=int(skipped_total), preempted=preempted)
