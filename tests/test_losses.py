"""Loss functions against torch and worked examples; the original-size mask buffer they read."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medplib_jax.data import canvas
from medplib_jax.infer.masks import postprocess_logits
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


# --- loss.mask_resolution="original": MedPLIB's losses at the original size ---------------------

CANVAS, LOW_RES, BUFFER = 256, 64, 320  # the 7B SAM canvas, its 64 x 64 logits, data.max_mask_hw


def _ellipse(hw, cy, cx, ry, rx):
  yy, xx = np.mgrid[:hw[0], :hw[1]]
  return ((yy - hw[0] * cy) / (hw[0] * ry)) ** 2 + ((xx - hw[1] * cx) / (hw[1] * rx)) ** 2 < 1


def _two_images(hws, seed=3):
  """Two samples of sizes hws, the first with two masks, the second with one and an empty slot:
  smooth random low-res logits, elliptic ground truths at the original size, in the original
  and canvas layouts."""
  rng = np.random.default_rng(seed)
  gts = [[_ellipse(hws[0], .45, .55, .2, .25), _ellipse(hws[0], .3, .3, .15, .1)],
         [_ellipse(hws[1], .5, .4, .3, .2)]]
  coarse = torch.tensor(rng.normal(size=(4, 1, 8, 8)).astype(np.float32))
  low = 3 * F.interpolate(coarse, (LOW_RES, LOW_RES), mode="bilinear", align_corners=False).numpy()
  low = (low + 0.5 * rng.normal(size=low.shape)).astype(np.float32).reshape(2, 2, LOW_RES, LOW_RES)
  masks_orig = np.zeros((2, 2, BUFFER, BUFFER), bool)
  masks = np.zeros((2, 2, CANVAS, CANVAS), bool)
  for b, sample in enumerate(gts):
    for k, gt in enumerate(sample):
      masks_orig[b, k, :gt.shape[0], :gt.shape[1]] = gt
      masks[b, k] = canvas.mask_canvas(gt, CANVAS)
  geos = [canvas.geometry(hw, CANVAS) for hw in hws]
  return dict(low=low, iou_pred=rng.uniform(size=(2, 2)).astype(np.float32), gts=gts, geos=geos,
              valid=np.array([[True, True], [True, False]]), masks_orig=masks_orig, masks=masks,
              resized_hw=np.array([g.resized_hw for g in geos], np.int32),
              orig_hw=np.array(hws, np.int32))


# 200x300 / 300x200: the logits are upsampled to the original size; 40x60 / 50x30: downsampled.
IMAGE_PAIRS = {"non_square": ((200, 300), (300, 200)), "small": ((40, 60), (50, 30))}


@pytest.fixture(scope="module")
def non_square():
  return _two_images(IMAGE_PAIRS["non_square"])


@pytest.fixture(scope="module", params=sorted(IMAGE_PAIRS))
def images(request):
  return _two_images(IMAGE_PAIRS[request.param])


def _torch_postprocess(low, geo, postprocess):
  """[1, 1, L, L] -> [1, 1, H, W]: MedPLIB's postprocess_masks ("reference") or the canvas crop."""
  if postprocess == "correct":
    low = F.interpolate(low, (geo.size, geo.size), mode="bilinear", align_corners=False)
    rows = slice(geo.pad_top, geo.pad_top + geo.resized_hw[0])
    cols = slice(geo.pad_left, geo.pad_left + geo.resized_hw[1])
  else:
    pad_h, pad_w = low.shape[-2] - geo.resized_hw[0], low.shape[-1] - geo.resized_hw[1]
    rows = slice(pad_h // 2, pad_h // 2 + low.shape[-2] - pad_h)
    cols = slice(pad_w // 2, pad_w // 2 + low.shape[-1] - pad_w)
  return F.interpolate(low[:, :, rows, cols], geo.orig_hw, mode="bilinear", align_corners=False)


def _torch_reference_losses(data, low, postprocess):
  """MedPLIB's model_forward mask losses (model/MedPLIB.py) written out in torch: one pred mask
  per <SEG>, sigmoid_ce_loss / dice_loss / FocalLoss / MaskIoULoss, summed, / num_masks."""
  bce = dice = focal = iou = 0
  num_masks = 0
  for b, sample in enumerate(data["gts"]):
    for k, gt in enumerate(sample):
      pred = _torch_postprocess(low[b:b + 1, k:k + 1], data["geos"][b], postprocess)[:, 0]
      target = torch.tensor(gt, dtype=torch.float32)[None]
      loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
      bce = bce + loss.flatten(1, 2).mean(1).sum() / (1 + 1e-8)
      p, t = pred.sigmoid().view(1, -1), target.view(1, -1)
      dice = dice + (1 - (2 * (p * t).sum(-1) + 1e-6) / (p.sum(-1) + t.sum(-1) + 1e-6)).mean()
      p = pred.sigmoid()
      pos = -0.25 * target * (1 - p) ** 2 * torch.log(p + 1e-12)
      neg = -0.75 * (1 - target) * p ** 2 * torch.log(1 - p + 1e-12)
      focal = focal + (pos.sum() + neg.sum()) / (target.numel() + 1e-12)
      inter = (p * target).sum()
      soft_iou = (inter + 1e-7) / (p.sum() + target.sum() - inter + 1e-7)
      iou = iou + ((soft_iou - torch.tensor(data["iou_pred"][b, k:k + 1])) ** 2).mean()
      num_masks += 1
  return {name: v / (num_masks + 1e-8) for name, v in
          dict(bce=bce, dice=dice, focal=focal, iou=iou).items()}


def _original(data, low, postprocess):
  fn = jax.jit(lambda *a: losses.original_mask_losses(*a, canvas_size=CANVAS,
                                                      postprocess=postprocess))
  return fn(low, data["iou_pred"], data["masks_orig"], data["valid"], data["resized_hw"],
            data["orig_hw"])


@pytest.mark.parametrize("postprocess", ["reference", "correct"])
def test_original_mode_equals_medplib_losses_in_torch(images, postprocess):
  """Values and gradients (w.r.t. the low-res logits) of every mask loss, one jitted function
  for both image sizes."""
  data = images
  weights = dict(bce=2.0, dice=0.5, focal=1.0, iou=0.3)
  low_t = torch.tensor(data["low"], requires_grad=True)
  expected = _torch_reference_losses(data, low_t, postprocess)
  sum(w * expected[k] for k, w in weights.items()).backward()
  got = _original(data, jnp.asarray(data["low"]), postprocess)
  assert float(got["num_masks"]) == 3
  for name in weights:
    np.testing.assert_allclose(float(got[name]), expected[name].item(), rtol=1e-5, err_msg=name)

  def weighted(low):
    out = _original(data, low, postprocess)
    return sum(w * out[k] for k, w in weights.items())

  grad = np.asarray(jax.grad(weighted)(jnp.asarray(data["low"])))
  expected_grad = low_t.grad.numpy()
  assert not grad[1, 1].any()  # the empty mask slot gets no gradient
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5 * np.abs(expected_grad).max())


@pytest.mark.parametrize("postprocess", ["reference", "correct"])
def test_original_size_logits_match_the_host_postprocessing(images, postprocess):
  """The traced crop-and-resize equals infer/masks.py postprocess_logits (the evaluation's)."""
  data = images
  low = data["low"].reshape(4, LOW_RES, LOW_RES)
  got = np.asarray(losses.original_size_logits(
      jnp.asarray(low), jnp.asarray(np.repeat(data["resized_hw"], 2, 0)),
      jnp.asarray(np.repeat(data["orig_hw"], 2, 0)), CANVAS, BUFFER, postprocess))
  for i in range(4):
    geo = data["geos"][i // 2]
    h, w = geo.orig_hw
    expected = postprocess_logits(low[i:i + 1], geo, postprocess)[0]
    np.testing.assert_allclose(got[i, :h, :w], expected, rtol=1e-5, atol=2e-5)


def test_canvas_and_original_modes_differ_on_a_non_square_image(non_square):
  """The definitions differ by the resampling (canvas vs original pixels, LISA's vs MedPLIB's
  Dice eps) and, with MedPLIB's post-processing, by its misplaced crop."""
  data = non_square
  canvas_out = losses.mask_losses(jnp.asarray(data["low"]), jnp.asarray(data["iou_pred"]),
                                  jnp.asarray(data["masks"]), jnp.asarray(data["valid"]),
                                  jnp.asarray(data["resized_hw"]))
  rel = {}
  for postprocess in ("correct", "reference"):
    out = _original(data, jnp.asarray(data["low"]), postprocess)
    rel[postprocess] = {k: abs(float(out[k]) / float(canvas_out[k]) - 1) for k in ("bce", "dice")}
  for name, r in rel["correct"].items():
    assert 1e-5 < r < 1e-2, (name, r)
  assert rel["reference"]["bce"] > 1e-2, rel


def test_total_loss_takes_the_mask_losses_the_config_names(non_square):
  data = non_square
  outputs = dict(logits=jnp.zeros((2, 3, 5)), mask_logits=jnp.asarray(data["low"]),
                 iou_pred=jnp.asarray(data["iou_pred"]), seg_valid=jnp.asarray(data["valid"]),
                 moe_aux_loss=jnp.zeros(()))
  batch = dict(labels=jnp.full((2, 3), -100), masks=jnp.asarray(data["masks"]),
               masks_orig=jnp.asarray(data["masks_orig"]), sam_resized_hw=data["resized_hw"],
               orig_hw=data["orig_hw"])
  cfg = ml_collections.ConfigDict(dict(ce=1.0, bce=1.0, dice=0.0, focal=0.0, iou=0.0,
                                       mask_resolution="canvas", mask_postprocess="reference"))
  expected = {"canvas": losses.mask_losses(outputs["mask_logits"], outputs["iou_pred"],
                                           batch["masks"], outputs["seg_valid"],
                                           batch["sam_resized_hw"])["bce"],
              "original": _original(data, outputs["mask_logits"], "reference")["bce"]}
  for resolution, bce in expected.items():
    cfg.mask_resolution = resolution
    _, metrics = losses.total_loss(outputs, batch, cfg, 0.0)
    np.testing.assert_allclose(float(metrics["mask_bce"]), float(bce), rtol=1e-6)
  with pytest.raises(ValueError, match="needs batches carrying masks_orig"):
    losses.total_loss(outputs, {k: v for k, v in batch.items() if k != "masks_orig"}, cfg, 0.0)
  cfg.mask_resolution = "full"
  with pytest.raises(ValueError, match="expected one of"):
    losses.total_loss(outputs, batch, cfg, 0.0)
