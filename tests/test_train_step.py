"""One train step of every stage on the tiny config over 8 fake devices."""

import contextlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from medplib_jax import sharding
from medplib_jax.config_loading import load_config
from medplib_jax.models.medplib import dummy_batch
from medplib_jax.train import trainer

STAGES = {1: "configs/stage1_align.py", 2: "configs/stage2_vqa.py", 3: "configs/stage3_ground.py",
          4: "configs/stage4_moe.py"}


@contextlib.contextmanager
def jitted_step(cfg, total_steps=100):
  """Inside cfg's mesh and logical-axis rules: (initial TrainState, jitted train step, a function
  putting a host batch on the mesh)."""
  mesh = sharding.make_mesh(cfg.mesh)
  model = trainer.build_model(cfg)
  rules = sharding.rules_tuple(cfg.logical_axis_rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, tx, schedule = trainer.init_state(cfg, model, mesh, total_steps=total_steps)
    yield (state, jax.jit(trainer.make_train_step(cfg, model, tx, schedule)),
           lambda batch: sharding.host_to_global(batch, mesh, rules))


def fixed_batch(cfg, batch_size=8, seed=0):
  """A random but well-formed batch: an image, a region, one <SEG> with its mask, supervised answer."""
  rng = np.random.default_rng(seed)
  b = dummy_batch(cfg.model, cfg.data.max_length, batch_size)
  length = b["input_ids"].shape[1]
  n_img = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
  b["input_ids"] = rng.integers(3, 900, b["input_ids"].shape).astype(np.int32)
  b["attention_mask"][:, : length - 4] = True
  b["image_start"][:] = 3
  b["labels"][:] = -100
  answer = slice(3 + n_img + 6, length - 4)
  b["labels"][:, answer] = b["input_ids"][:, answer]
  b["clip_image"] = rng.normal(size=b["clip_image"].shape).astype(np.float32)
  b["sam_image"] = rng.normal(size=b["sam_image"].shape).astype(np.float32)
  b["sam_resized_hw"][:] = cfg.model.sam.image_size
  b["region_positions"][:, 0] = 3 + n_img + 2
  g = b["region_masks"].shape[-1]
  b["region_masks"][:, 0, g // 4: g // 2, g // 4: g // 2] = True
  b["seg_positions"][:, 0] = length - 6
  s = cfg.model.sam.image_size
  b["masks"][:, 0, s // 4: 3 * s // 4, s // 8: s // 2] = True
  return b


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_step_learns_and_respects_the_frozen_set(stage):
  cfg = load_config(f"{STAGES[stage]}:tiny", [
      "--config.data.max_length=96", "--config.mesh.data=2", "--config.mesh.fsdp=2",
      f"--config.mesh.expert={2 if stage == 4 else 1}",
      f"--config.mesh.tensor={1 if stage == 4 else 2}", "--config.optim.warmup_ratio=0.0",
      "--config.optim.lr=3e-3"])
  with jitted_step(cfg) as (state, step_fn, to_mesh):
    before = jax.device_get(state.params())
    batch = to_mesh(fixed_batch(cfg))
    losses = []
    for _ in range(4):
      state, metrics = step_fn(state, batch)
      losses.append(float(metrics["loss"]))
    after = jax.device_get(state.params())
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
  mask = trainer.stage_trainable_mask(cfg, before)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
  flat_mask, flat_changed = trainer.flat(mask), trainer.flat(changed)
  frozen_changed = [k for k, m in flat_mask.items() if not m and flat_changed[k]]
  assert not frozen_changed, frozen_changed
  assert any(flat_changed[k] for k, m in flat_mask.items() if m)
  assert flat_mask["vision/pre_layrnorm/scale"] is False
  if stage == 1:
    assert {k.split("/")[0] for k, m in flat_mask.items() if m} == {"projector"}
  if stage == 3:
    decoder = [m for k, m in flat_mask.items() if k.startswith("sam/mask_decoder/")]
    assert decoder and all(decoder)
    assert not any(m for k, m in flat_mask.items() if k.startswith("sam/image_encoder"))


def test_gradient_accumulation_equals_one_step_on_the_whole_batch():
  """optim.grad_accum_steps=2 over 2 micro-batches gives the loss, gradient norm and updated
  params of one step on the whole batch (nothing random: no dropout; the region mask is
  smaller than max_points, so every point is taken)."""
  results = []
  for accum in (1, 2):
    cfg = load_config(f"{STAGES[2]}:tiny", [
        "--config.data.max_length=80", "--config.mesh.data=2", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2", "--config.lora.dropout=0.0", "--config.optim.warmup_ratio=0.0",
        f"--config.optim.grad_accum_steps={accum}"])
    with jitted_step(cfg) as (state, step_fn, to_mesh):
      state, metrics = step_fn(state, to_mesh(fixed_batch(cfg, seed=3)))
      results.append((jax.device_get(metrics), jax.device_get(state.trainable)))
  (whole, whole_params), (accumulated, accumulated_params) = results
  for name in ("loss", "grad_norm"):
    np.testing.assert_allclose(accumulated[name], whole[name], rtol=1e-5, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               accumulated_params, whole_params)
