"""Loss functions against torch and worked examples."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medplib_jax.train import losses


def test_cross_entropy_matches_torch_with_ignored_positions():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
  labels = np.array([[-100, -100, 3, 4, -100, 7], [-100, 1, 2, -100, -100, -100]], np.int32)
  got, count = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  expected = F.cross_entropy(torch.tensor(logits[:, :-1]).reshape(-1, 11),
                             torch.tensor(labels[:, 1:]).reshape(-1).long(), ignore_index=-100)
  assert int(count) == 5
  np.testing.assert_allclose(float(got), expected.item(), rtol=1e-6)


def test_bce_dice_focal_match_torch_formulas():
  rng = np.random.default_rng(1)
  logits = rng.normal(scale=3, size=(3, 8, 8)).astype(np.float32)
  targets = rng.random((3, 8, 8)) > 0.6
  region = np.ones((3, 8, 8), bool)
  got = losses.per_mask_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(region))
  lt, tt = torch.tensor(logits), torch.tensor(targets, dtype=torch.float32)
  bce = F.binary_cross_entropy_with_logits(lt, tt, reduction="none").mean((1, 2))
  p = lt.sigmoid()
  dice = 1 - (2 * (p * tt).sum((1, 2)) + 1e-6 * 1000) / (p.sum((1, 2)) + tt.sum((1, 2)) + 1e-6 * 1000)
  ce = F.binary_cross_entropy_with_logits(lt, tt, reduction="none")
  p_t = p * tt + (1 - p) * (1 - tt)
  focal = (ce * (1 - p_t) ** 2 * (0.25 * tt + 0.75 * (1 - tt))).mean((1, 2))
  np.testing.assert_allclose(np.asarray(got["bce"]), bce.numpy(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got["dice"]), dice.numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got["focal"]), focal.numpy(), rtol=1e-5)


def test_dice_worked_example_and_padding_excluded():
  # 2x2 image area inside a 4x4 canvas; a perfect +-10 logit prediction on the image area, and
  # a confident wrong prediction on the padding which must not count.
  logits = np.full((1, 4, 4), 10.0, np.float32)
  targets = np.zeros((1, 4, 4), bool)
  targets[0, 1:3, 1:3] = True
  region = np.asarray(losses.canvas_valid_region(jnp.array([[2, 2]]), 4))
  assert region.sum() == 4 and region[0, 1:3, 1:3].all()
  got = losses.per_mask_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(region))
  s = 1 / (1 + np.exp(-10.0))
  np.testing.assert_allclose(float(got["dice"][0]), 1 - (8 * s + 1e-3) / (4 * s + 4 + 1e-3), atol=1e-7)
  np.testing.assert_allclose(float(got["iou"][0]), 1.0)
  np.testing.assert_allclose(float(got["bce"][0]), np.log1p(np.exp(-10.0)), rtol=1e-5)


def test_samples_without_masks_give_zero_mask_loss():
  out = losses.mask_losses(jnp.zeros((2, 1, 4, 4)), jnp.zeros((2, 1)), jnp.zeros((2, 1, 16, 16), bool),
                           jnp.zeros((2, 1), bool), jnp.array([[16, 16], [8, 16]]))
  for name in ("bce", "dice", "focal", "iou"):
    assert float(out[name]) == 0.0 and np.isfinite(float(out[name]))
  assert float(out["num_masks"]) == 0


@pytest.mark.parametrize("valid", [[True, False], [True, True]])
def test_mask_losses_average_over_valid_masks_only(valid):
  rng = np.random.default_rng(2)
  low = rng.normal(size=(2, 1, 4, 4)).astype(np.float32)
  masks = rng.random((2, 1, 16, 16)) > 0.5
  hw = jnp.array([[16, 16], [16, 16]])
  out = losses.mask_losses(jnp.asarray(low), jnp.zeros((2, 1)), jnp.asarray(masks),
                           jnp.asarray(np.array(valid)[:, None]), hw)
  up = F.interpolate(torch.tensor(low), size=(16, 16), mode="bilinear", align_corners=False)
  bce = F.binary_cross_entropy_with_logits(up, torch.tensor(masks, dtype=torch.float32),
                                           reduction="none").mean((1, 2, 3)).numpy()
  expected = bce[np.array(valid)].mean()
  np.testing.assert_allclose(float(out["bce"]), expected, rtol=1e-5)
