"""The assembled MedPLIB: static-shape splicing and a full tiny forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medplib_jax.config_loading import load_config
from medplib_jax.data.batch import collate
from medplib_jax.models.medplib import gather_seg_states, splice_image, splice_regions
from medplib_jax.checkpoint import model_dir, pretrained
from medplib_jax.models import medplib
from medplib_jax.train import trainer


def test_splice_image_writes_the_slots_only():
  embeds = jnp.zeros((2, 7, 3))
  image = jnp.arange(2 * 3 * 3, dtype=jnp.float32).reshape(2, 3, 3) + 1
  out = np.asarray(splice_image(embeds, image, jnp.array([2, -1])))
  np.testing.assert_array_equal(out[0, 2:5], np.asarray(image[0]))
  assert not out[0, :2].any() and not out[0, 5:].any()
  assert not out[1].any()  # no image in sample 1


def test_splice_regions_and_invalid_regions():
  embeds = jnp.full((1, 5, 2), -1.0)
  tokens = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])
  out = np.asarray(splice_regions(embeds, tokens, jnp.array([[3, 1]]), jnp.array([[True, False]])))
  np.testing.assert_array_equal(out[0, 3], [1.0, 2.0])
  np.testing.assert_array_equal(out[0, 1], [-1.0, -1.0])  # invalid region leaves the slot alone


def test_gather_seg_states_takes_the_position_before():
  hidden = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1)
  states, valid = gather_seg_states(hidden, jnp.array([[4, -1]]))
  np.testing.assert_array_equal(np.asarray(states)[0, :, 0], [3.0, 0.0])
  np.testing.assert_array_equal(np.asarray(valid), [[True, False]])


def test_tiny_forward_shapes_and_finiteness():
  cfg = load_config("configs/stage4_moe.py:tiny", ["--config.data.max_length=96"])
  model = trainer.build_model(cfg)
  batch = medplib.dummy_batch(cfg.model, cfg.data.max_length, batch_size=2)
  rng = np.random.default_rng(0)
  batch["input_ids"] = rng.integers(0, 1000, batch["input_ids"].shape).astype(np.int32)
  batch["attention_mask"][:] = True
  batch["image_start"][:] = 5
  batch["clip_image"] = rng.normal(size=batch["clip_image"].shape).astype(np.float32)
  batch["sam_image"] = rng.normal(size=batch["sam_image"].shape).astype(np.float32)
  batch["seg_positions"][:, 0] = 90
  rngs = {"params": jax.random.key(0), **{s: jax.random.key(1) for s in medplib.RNG_STREAMS}}
  variables = jax.jit(model.init)(rngs, batch)
  out = jax.jit(model.apply)(variables, batch)
  v = cfg.model.llm.vocab_size
  low_res = 4 * cfg.model.sam.image_size // cfg.model.sam.patch_size  # x4 upscaling of the grid
  assert out["logits"].shape == (2, 96, v)
  assert out["mask_logits"].shape == (2, 1, low_res, low_res)
  assert np.isfinite(np.asarray(out["logits"])).all()
  assert np.isfinite(np.asarray(out["mask_logits"])).all()
  assert np.asarray(out["seg_valid"]).tolist() == [[True], [True]]


def test_right_and_left_collated_batches_give_the_same_outputs():
  """The same two samples padded right (training) and left (generation): every real token's
  logits and each <SEG>'s mask are the same; a tower with another feature count is refused."""
  cfg = load_config("configs/stage3_ground.py:tiny", ["--config.data.max_length=96"])
  model = trainer.build_model(cfg)
  n_img = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
  g, sc, ss = (cfg.model.vision.image_size // cfg.model.vision.patch_size,
               cfg.model.vision.image_size, cfg.model.sam.image_size)
  rng = np.random.default_rng(0)
  region = np.zeros((g, g), bool)
  region[2:5, 3:7] = True
  samples = []
  for n, seg in ((n_img + 20, n_img + 15), (n_img + 9, n_img + 6)):
    ids = rng.integers(3, 1000, n).astype(np.int32)
    samples.append({"input_ids": ids, "labels": ids, "image_start": 2,
                    "region_positions": [n_img + 4], "region_masks": [region],
                    "seg_positions": [seg], "masks": [np.ones((ss, ss), bool)],
                    "clip_image": rng.normal(size=(sc, sc, 3)).astype(np.float32),
                    "sam_image": rng.normal(size=(ss, ss, 3)).astype(np.float32)})
  right = collate(samples, cfg.model, 96, 0, padding="right")
  left = collate(samples, cfg.model, 96, 0, padding="left")
  rngs = {"params": jax.random.key(0), **{s: jax.random.key(1) for s in medplib.RNG_STREAMS}}
  variables = jax.jit(model.init)(rngs, right)
  apply = jax.jit(model.apply)
  out_r, out_l = apply(variables, right), apply(variables, left)
  for row, sample in enumerate(samples):
    n = len(sample["input_ids"])
    np.testing.assert_allclose(np.asarray(out_l["logits"][row, 96 - n:]),
                               np.asarray(out_r["logits"][row, :n]), atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(out_l["mask_logits"]), np.asarray(out_r["mask_logits"]),
                             atol=2e-4, rtol=1e-4)
  features = jnp.zeros((2, n_img - 1, cfg.model.vision.width))
  with pytest.raises(ValueError, match="image slots"):
    model.apply(variables, right, features, method=medplib.MedPLIB.multimodal_embeddings)


def test_stage1_inherits_pretrained_components_from_model_dirs(tmp_path):
  cfg = load_config("configs/stage1_align.py:tiny", [
      f"--config.init.sam={tmp_path / 'sam'}", f"--config.init.clip={tmp_path / 'clip'}"])
  abstract = trainer.flat(trainer.sharding.strip_boxes(medplib.abstract_variables(trainer.build_model(cfg), cfg.data.max_length)["params"]))
  rng = np.random.default_rng(0)
  fake = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in abstract.items()
          if k.startswith(("sam/", "vision/"))}
  for name, prefix in (("sam", "sam/"), ("clip", "vision/")):
    tree = trainer.traverse_util.unflatten_dict({k: v for k, v in fake.items() if k.startswith(prefix)}, sep="/")
    model_dir.save_params(str(tmp_path / name), tree)
  inherited = pretrained.load(cfg)
  assert set(inherited) == set(fake)
  for k in fake:
    np.testing.assert_array_equal(np.asarray(inherited[k]), fake[k])


def test_model_dir_config_fills_fields_it_lacks_from_its_stage_defaults(tmp_path):
  """A config.json written before a field existed loads with that field's stage default (so
  every field is read by attribute); what it holds is kept; one without stage / size is named."""
  import json
  cfg = load_config("configs/stage4_moe.py:tiny", ["--config.data.max_length=77"])
  stored = json.loads(cfg.to_json_best_effort())
  del stored["model"]["llm"]["kernels"], stored["data"]["overflow"], stored["train"]
  (tmp_path / "config.json").write_text(json.dumps(stored))
  loaded = model_dir.load_config(str(tmp_path))
  assert loaded.model.llm.kernels == "auto" and loaded.data.overflow == "skip"
  assert loaded.train.on_nonfinite == "skip" and loaded.data.max_length == 77
  del stored["stage"]
  (tmp_path / "config.json").write_text(json.dumps(stored))
  with pytest.raises(ValueError, match="config.json: no 'stage'"):
    model_dir.load_config(str(tmp_path))
