"""loss.mask_resolution="original" on the host and in a train step: the masks_orig buffer
(data/preprocess.py, data/batch.py), an image too large for it as a bad record, the jitted step."""

import jax
import numpy as np
import pytest
from PIL import Image

from configs.common import model_config
from medplib_jax.config_loading import load_config
from medplib_jax.data import canvas, pipeline, preprocess
from medplib_jax.data.batch import batch_spec, collate, original_mask_hw
from medplib_jax.data.mecovqa import BadRecord, DecodedExample, RawExample
from medplib_jax.data.template import template_texts
from medplib_jax.data.tokenizer import load_tokenizer, train_tokenizer
from medplib_jax.models.medplib import dummy_batch
from test_train_step import jitted_step

LENGTH = 128


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = ["Segment the liver. Sure, it is here. What is shown? Liver."] * 50
  return load_tokenizer(train_tokenizer(texts + template_texts() * 20,
                                        str(tmp_path_factory.mktemp("tok"))))


def _example(hw, with_mask=True):
  image = np.zeros(hw + (3,), np.uint8)
  mask = np.zeros(hw, bool)
  mask[hw[0] // 4: hw[0] // 2, hw[1] // 3: hw[1] - 2] = True
  answer = "Sure, <SEG>." if with_mask else "Liver."
  conv = [{"from": "human", "value": "<image>\nSegment the liver."},
          {"from": "gpt", "value": answer}]
  raw = RawExample("r", conv, b"", [b""] if with_mask else [], [], "G", "ct", "")
  return DecodedExample(raw, image, [mask] if with_mask else [], []), mask


def test_build_sample_carries_the_masks_at_their_original_size(tok):
  cfg = model_config("tiny")
  ex, mask = _example((40, 60))
  s, _ = preprocess.build_sample(ex, tok, cfg, LENGTH, rng=np.random.default_rng(0))
  assert set(s) == set(batch_spec(cfg, LENGTH))  # canvas mode: no masks_orig
  s, _ = preprocess.build_sample(ex, tok, cfg, LENGTH, rng=np.random.default_rng(0),
                                 options=preprocess.PreprocessOptions(mask_hw=64))
  spec = batch_spec(cfg, LENGTH, 64)
  assert set(s) == set(spec)
  assert s["masks_orig"].shape == spec["masks_orig"][0] == (1, 64, 64)
  assert np.array_equal(s["masks_orig"][0, :40, :60], mask)
  assert s["masks_orig"].sum() == mask.sum()
  assert tuple(s["orig_hw"]) == (40, 60)


def test_an_image_larger_than_the_buffer_is_a_named_bad_record(tok, tmp_path):
  cfg = model_config("tiny")
  options = preprocess.PreprocessOptions(mask_hw=50)
  _, mask = _example((40, 60))
  Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "ct_1.png")
  Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "ct_1_mask.png")
  record = {"id": "big", "image": "ct_1.png", "conversations": [
      {"from": "human", "value": "<image>\nSegment the liver."},
      {"from": "gpt", "value": "Sure, <SEG><mask>ct_1_mask.png</mask>."}]}
  with pytest.raises(BadRecord) as e:
    preprocess.build_sample(record, tok, cfg, LENGTH, str(tmp_path), options=options)
  assert e.value.reason == "unreadable_image" and "data.max_mask_hw=50" in str(e.value)
  # the training pipeline skips and counts it by that reason
  prep = pipeline.Preprocessor(tok, cfg, LENGTH, str(tmp_path), True, options)
  marker = prep(record, np.random.default_rng(0))
  assert pipeline.REASON_NAMES[int(marker[pipeline._BAD])] == "unreadable_image"
  # without masks nothing needs the buffer
  vqa, _ = _example((40, 60), with_mask=False)
  s, _ = preprocess.build_sample(vqa, tok, cfg, LENGTH, options=options)
  assert not s["masks_orig"].any()


def test_collate_puts_original_masks_top_left_and_refuses_larger_ones():
  cfg = model_config("tiny")
  value = np.ones((1, 3, 5), bool)
  batch = collate([{"masks_orig": value}, {}], cfg, 8, 0, mask_hw=6)
  assert batch["masks_orig"].shape == (2, 1, 6, 6)
  assert batch["masks_orig"][0, 0, :3, :5].all() and batch["masks_orig"].sum() == 15
  with pytest.raises(ValueError, match="exceed the 4x4 masks_orig buffer"):
    collate([{"masks_orig": value}], cfg, 8, 0, mask_hw=4)
  with pytest.raises(ValueError, match="not in the batch contract"):
    collate([{"masks_orig": value}], cfg, 8, 0)


def test_stage3_step_learns_with_original_size_losses():
  """Stage 3 on 8 devices with loss.mask_resolution="original": the step reads masks_orig (a
  200x300-like 100x150 image in a 160 buffer), its losses are finite and fall."""
  cfg = load_config("configs/stage3_ground.py:tiny", [
      "--config.data.max_length=96", "--config.mesh.data=2", "--config.mesh.fsdp=2",
      "--config.mesh.tensor=2", "--config.optim.warmup_ratio=0.0", "--config.optim.lr=3e-3",
      "--config.loss.mask_resolution=original", "--config.data.max_mask_hw=160"])
  hm = original_mask_hw(cfg)
  assert hm == 160
  rng = np.random.default_rng(0)
  b = dummy_batch(cfg.model, cfg.data.max_length, 8)
  length, s = b["input_ids"].shape[1], cfg.model.sam.image_size
  n_img = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
  b["input_ids"] = rng.integers(3, 900, b["input_ids"].shape).astype(np.int32)
  b["attention_mask"][:, :length - 4] = True
  b["image_start"][:] = 3
  b["labels"][:, 3 + n_img + 6:length - 4] = b["input_ids"][:, 3 + n_img + 6:length - 4]
  b["clip_image"] = rng.normal(size=b["clip_image"].shape).astype(np.float32)
  b["sam_image"] = rng.normal(size=b["sam_image"].shape).astype(np.float32)
  b["seg_positions"][:, 0] = length - 6
  hw = (100, 150)
  gt = np.zeros(hw, bool)
  gt[20:70, 40:120] = True
  b["orig_hw"][:] = hw
  b["sam_resized_hw"][:] = canvas.geometry(hw, s).resized_hw
  b["masks"][:, 0] = canvas.mask_canvas(gt, s)
  b["masks_orig"] = np.zeros((8,) + batch_spec(cfg.model, length, hm)["masks_orig"][0], bool)
  b["masks_orig"][:, 0, :hw[0], :hw[1]] = gt
  with jitted_step(cfg) as (state, step_fn, to_mesh):
    batch = to_mesh(b)
    history = []
    for _ in range(3):
      state, metrics = step_fn(state, batch)
      history.append(jax.device_get(metrics))
  losses = [float(m["loss"]) for m in history]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert float(history[0]["num_masks"]) == 8 and float(history[0]["mask_bce"]) > 0
