"""MedPLIB losses (SPEC.md): next-token CE, per-mask BCE / Dice / focal / IoU-MSE, MoE aux.

Two definitions of the mask losses, chosen by `loss.mask_resolution`:

* ``canvas`` (the default): per mask over the image area of the SAM canvas (the centred padding
  excluded), the low-res logits upsampled bilinearly to the canvas; Dice with LISA's /1000
  scaling, focal from the BCE map, the IoU head regressed onto the IoU of the thresholded mask
  (no gradient to the mask).
* ``original``: MedPLIB's own definition (model/MedPLIB.py `model_forward`). The low-res logits
  are post-processed to the image's original size as `loss.mask_postprocess` says (the two modes
  of infer/masks.py: ``reference``, MedPLIB's `postprocess_masks`, crops the low-res logits at
  offsets computed for the canvas-size image; ``correct`` upsamples to the canvas and crops the
  padding) and resized bilinearly; each mask is then compared with its original-size ground
  truth by MedPLIB's `sigmoid_ce_loss`, `dice_loss` (eps 1e-6, no scaling), `FocalLoss` and
  `MaskIoULoss` (soft IoU, whose gradient reaches the mask). Under `jit` the original size varies
  per sample: logits and ground truth live top-left in an [Hm, Hm] buffer (data.max_mask_hw),
  `orig_hw` says how much of it is real, and the rest is left out of every sum.

Both average over the valid masks of the whole batch, as MedPLIB sums over masks and divides by
their count; a batch without masks contributes exactly zero mask loss.
The default is ``canvas``: fixed shapes and memory whatever the image size ("original" holds an
Hm x Hm buffer per mask and refuses larger images); docs/differences.md gives the measured gap.
"""

import jax
import jax.numpy as jnp

from medplib_jax.data.batch import IGNORE_INDEX

# LISA/MedPLIB's dice_loss divides by 1000 before summing (numerically the same ratio up to eps).
DICE_SCALE = 1000.0
DICE_EPS = 1e-6
MASK_RESOLUTIONS = ("canvas", "original")
MASK_POSTPROCESS = ("reference", "correct")
# MedPLIB's constants: FocalLoss log(p + 1e-12), MaskIoULoss (inter + 1e-7) / (union + 1e-7).
FOCAL_LOG_EPS = 1e-12
SOFT_IOU_EPS = 1e-7


def cross_entropy(logits, labels):
  """Mean next-token CE over supervised positions.

  logits [B, L, V], labels [B, L] (HF convention: logits[:, t] predicts labels[:, t + 1]).
  Returns (loss [], num_supervised []).
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = labels[:, 1:]
  supervised = targets != IGNORE_INDEX
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(supervised, targets, 0)[..., None], axis=-1)[..., 0]
  count = supervised.sum()
  return jnp.where(supervised, nll, 0.0).sum() / jnp.maximum(count, 1), count


def canvas_valid_region(resized_hw, size):
  """[B, 2] image size inside a centred canvas -> bool [B, size, size] (True on the image)."""
  top = (size - resized_hw[:, 0]) // 2
  left = (size - resized_hw[:, 1]) // 2
  r = jnp.arange(size)
  rows = (r[None] >= top[:, None]) & (r[None] < (top + resized_hw[:, 0])[:, None])
  cols = (r[None] >= left[:, None]) & (r[None] < (left + resized_hw[:, 1])[:, None])
  return rows[:, :, None] & cols[:, None, :]


def upsample_logits(low_res, size):
  """[..., h, w] -> [..., size, size] bilinear (torch F.interpolate, align_corners=False)."""
  return jax.image.resize(low_res, low_res.shape[:-2] + (size, size), method="bilinear",
                          antialias=False)


def thresholded_iou(logits, targets, region):
  """[N, H, W] logits, bool targets and region -> [N] IoU of (logits > 0) with the targets."""
  pred = (logits > 0) & region
  inter = (pred & targets).sum((-2, -1))
  union = (pred | (targets & region)).sum((-2, -1))
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 0.0)


def per_mask_losses(logits, targets, region):
  """logits [N, H, W] float, targets [N, H, W] bool, region [N, H, W] bool (pixels that count).

  Returns dict of [N] arrays: bce (mean over pixels), dice (1 - dice coefficient), focal
  (gamma 2, alpha 0.25, mean over pixels) and the IoU of the thresholded prediction.
  """
  logits = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  w = region.astype(jnp.float32)
  npix = jnp.maximum(w.sum((-2, -1)), 1.0)
  bce_map = jnp.maximum(logits, 0) - logits * t + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  bce = (bce_map * w).sum((-2, -1)) / npix
  p = jax.nn.sigmoid(logits) * w
  numerator = 2 * (p / DICE_SCALE * t).sum((-2, -1))
  denominator = (p / DICE_SCALE).sum((-2, -1)) + (t * w / DICE_SCALE).sum((-2, -1))
  dice = 1 - (numerator + DICE_EPS) / (denominator + DICE_EPS)
  p_t = p * t + (1 - p) * (1 - t)
  alpha_t = 0.25 * t + 0.75 * (1 - t)
  focal = ((alpha_t * bce_map * (1 - p_t) ** 2) * w).sum((-2, -1)) / npix
  return dict(bce=bce, dice=dice, focal=focal, iou=thresholded_iou(logits, targets, region))


def mask_losses(mask_logits, iou_pred, masks, seg_valid, resized_hw):
  """Averages per-mask losses over valid masks.

  mask_logits [B, M, h, w] (low-res), iou_pred [B, M], masks [B, M, S, S] bool,
  seg_valid [B, M] bool, resized_hw [B, 2] -> dict of scalars (+ num_masks).
  """
  b, m, size = masks.shape[0], masks.shape[1], masks.shape[-1]
  logits = upsample_logits(mask_logits, size).reshape(b * m, size, size)
  region = jnp.repeat(canvas_valid_region(resized_hw, size), m, axis=0)
  per = per_mask_losses(logits, masks.reshape(b * m, size, size), region)
  valid = seg_valid.reshape(-1).astype(jnp.float32)
  n = valid.sum()
  mean = lambda x: (x * valid).sum() / jnp.maximum(n, 1.0)
  iou_mse = mean((iou_pred.reshape(-1).astype(jnp.float32) - jax.lax.stop_gradient(per["iou"])) ** 2)
  return dict(bce=mean(per["bce"]), dice=mean(per["dice"]), focal=mean(per["focal"]),
              iou=iou_mse, mask_iou=mean(per["iou"]), num_masks=n)


# --- "original": MedPLIB's losses at the original image size --------------------------------------

def _bilinear_taps(start, size, out_size, buffer):
  """One axis of torch F.interpolate(bilinear, align_corners=False) with traced sizes.

  Rows [start, start + size) of an input are resized to out_size rows; start, size, out_size are
  int [N]. Returns i0, i1 (int [N, buffer], input rows) and w1 (float [N, buffer]): output row r
  is (1 - w1) x[i0] + w1 x[i1]. Rows r >= out_size repeat the last input row (callers mask them).
  """
  size = jnp.maximum(size, 1)  # padding rows (no image) have size 0: keep them finite
  scale = size.astype(jnp.float32) / jnp.maximum(out_size, 1).astype(jnp.float32)
  dst = jnp.arange(buffer, dtype=jnp.float32) + 0.5
  src = jnp.maximum(dst[None] * scale[:, None] - 0.5, 0.0)
  below = jnp.floor(src)
  last = (size - 1)[:, None]
  i0 = jnp.minimum(below.astype(jnp.int32), last)
  i1 = jnp.minimum(i0 + 1, last)
  return i0 + start[:, None], i1 + start[:, None], src - below


def crop_resize(x, start, size, out_hw, buffer):
  """Crop then bilinear resize (torch align_corners=False), every size traced.

  x [N, A, B]; start, size, out_hw int [N, 2] (the crop x[start : start + size] per axis, resized
  to out_hw) -> float32 [N, buffer, buffer], the result top-left, the rest filler.
  Gathers rather than jax.image.scale_and_translate: that one reads the rows beside the crop
  where torch clamps to the crop's edge.
  """
  r0, r1, wr = _bilinear_taps(start[:, 0], size[:, 0], out_hw[:, 0], buffer)
  c0, c1, wc = _bilinear_taps(start[:, 1], size[:, 1], out_hw[:, 1], buffer)

  def one(a, r0, r1, wr, c0, c1, wc):
    rows = a[r0] * (1 - wr)[:, None] + a[r1] * wr[:, None]
    return rows[:, c0] * (1 - wc) + rows[:, c1] * wc

  return jax.vmap(one)(x.astype(jnp.float32), r0, r1, wr, c0, c1, wc)


def _python_slice(top, stop, length):
  """[top, stop) with Python slice semantics on an axis of `length` (negative = from the end)."""
  clip = lambda i: jnp.where(i < 0, jnp.maximum(i + length, 0), jnp.minimum(i, length))
  start = clip(top)
  return start, jnp.maximum(clip(stop) - start, 0)


def reference_crop(low_res_hw, resized_hw):
  """MedPLIB's `postprocess_masks` crop of [.., Lh, Lw] low-res logits (infer/masks.py
  reference_crop): pad = L - resized, top = pad // 2, rows [top, top + resized) as a Python slice
  (the resized size is the canvas's, so pad is negative for all but tiny images).

  resized_hw int [N, 2] -> (start, size) int [N, 2].
  """
  starts, sizes = [], []
  for axis, length in enumerate(low_res_hw):
    top = (length - resized_hw[:, axis]) // 2
    start, size = _python_slice(top, top + resized_hw[:, axis], length)
    starts.append(start)
    sizes.append(size)
  return jnp.stack(starts, -1), jnp.stack(sizes, -1)


def original_size_logits(low_res, resized_hw, orig_hw, canvas_size, buffer, postprocess):
  """low_res [N, h, w] logits -> float32 [N, buffer, buffer]: the mask at its original size
  (orig_hw [N, 2]) top-left, post-processed as infer/masks.py `postprocess_logits(mode=...)`."""
  if postprocess == "reference":
    start, size = reference_crop(low_res.shape[-2:], resized_hw)
    return crop_resize(low_res, start, size, orig_hw, buffer)
  if postprocess == "correct":
    canvas = upsample_logits(low_res.astype(jnp.float32), canvas_size)
    start = (canvas_size - resized_hw) // 2
    return crop_resize(canvas, start, resized_hw, orig_hw, buffer)
  raise ValueError(f"loss.mask_postprocess={postprocess!r}: expected one of {MASK_POSTPROCESS}")


def original_region(orig_hw, buffer):
  """orig_hw int [N, 2] -> bool [N, buffer, buffer], True on the top-left orig_hw pixels."""
  r = jnp.arange(buffer)
  rows = r[None] < orig_hw[:, :1]
  cols = r[None] < orig_hw[:, 1:]
  return rows[:, :, None] & cols[:, None, :]


def reference_per_mask_losses(logits, targets, region, iou_pred):
  """MedPLIB's per-mask losses. logits [N, H, W] float, targets / region [N, H, W] bool,
  iou_pred [N] -> dict of [N]: bce (sigmoid_ce_loss), dice (dice_loss), focal (FocalLoss),
  iou (MaskIoULoss: (soft IoU - iou_pred)^2) and mask_iou (IoU of the thresholded mask)."""
  logits = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  w = region.astype(jnp.float32)
  total = lambda x: (x * w).sum((-2, -1))
  npix = jnp.maximum(w.sum((-2, -1)), 1.0)
  bce_map = jnp.maximum(logits, 0) - logits * t + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p = jax.nn.sigmoid(logits)
  inter, p_sum, t_sum = total(p * t), total(p), total(t)
  dice = 1 - (2 * inter + DICE_EPS) / (p_sum + t_sum + DICE_EPS)
  focal_map = (-0.25 * t * (1 - p) ** 2 * jnp.log(p + FOCAL_LOG_EPS)
               - 0.75 * (1 - t) * p ** 2 * jnp.log(1 - p + FOCAL_LOG_EPS))
  soft_iou = (inter + SOFT_IOU_EPS) / (p_sum + t_sum - inter + SOFT_IOU_EPS)
  return dict(bce=total(bce_map) / npix, dice=dice, focal=total(focal_map) / npix,
              iou=(soft_iou - iou_pred.astype(jnp.float32)) ** 2,
              mask_iou=thresholded_iou(logits, targets, region))


def original_mask_losses(mask_logits, iou_pred, masks_orig, seg_valid, resized_hw, orig_hw,
                         canvas_size, postprocess="reference"):
  """MedPLIB's mask losses at the original size, averaged over valid masks.

  mask_logits [B, M, h, w] (low-res), iou_pred [B, M], masks_orig [B, M, Hm, Hm] bool (each
  ground truth top-left), seg_valid [B, M] bool, resized_hw / orig_hw [B, 2] (the image on the
  canvas_size canvas / at its original size) -> dict of scalars (+ num_masks), as mask_losses.
  """
  b, m, buffer = masks_orig.shape[0], masks_orig.shape[1], masks_orig.shape[-1]
  per_mask = lambda x: jnp.repeat(x, m, axis=0)
  orig = per_mask(orig_hw)
  logits = original_size_logits(mask_logits.reshape((b * m,) + mask_logits.shape[2:]),
                                per_mask(resized_hw), orig, canvas_size, buffer, postprocess)
  per = reference_per_mask_losses(logits, masks_orig.reshape(b * m, buffer, buffer),
                                  original_region(orig, buffer), iou_pred.reshape(-1))
  valid = seg_valid.reshape(-1).astype(jnp.float32)
  n = valid.sum()
  mean = lambda x: (x * valid).sum() / jnp.maximum(n, 1.0)
  return dict(bce=mean(per["bce"]), dice=mean(per["dice"]), focal=mean(per["focal"]),
              iou=mean(per["iou"]), mask_iou=mean(per["mask_iou"]), num_masks=n)


def batch_mask_losses(outputs, batch, loss_cfg):
  """The mask losses `loss_cfg.mask_resolution` names, from the model outputs and the batch."""
  resolution = loss_cfg.mask_resolution
  if resolution == "canvas":
    return mask_losses(outputs["mask_logits"], outputs["iou_pred"], batch["masks"],
                       outputs["seg_valid"], batch["sam_resized_hw"])
  if resolution != "original":
    raise ValueError(f"loss.mask_resolution={resolution!r}: expected one of {MASK_RESOLUTIONS}")
  if "masks_orig" not in batch:
    raise ValueError("loss.mask_resolution='original' needs batches carrying masks_orig: build "
                     "the data with mask_hw=data.max_mask_hw (data/batch.py original_mask_hw)")
  return original_mask_losses(outputs["mask_logits"], outputs["iou_pred"], batch["masks_orig"],
                              outputs["seg_valid"], batch["sam_resized_hw"], batch["orig_hw"],
                              batch["masks"].shape[-1], loss_cfg.mask_postprocess)


def total_loss(outputs, batch, weights, aux_loss_coef):
  """Weighted sum of every component; returns (loss, metrics dict of scalars).

  weights: the `loss` config (ce / bce / dice / focal / iou weights, mask_resolution and
  mask_postprocess).
  """
  ce, n_tokens = cross_entropy(outputs["logits"], batch["labels"])
  masks = batch_mask_losses(outputs, batch, weights)
  loss = (weights.ce * ce + weights.bce * masks["bce"] + weights.dice * masks["dice"]
          + weights.focal * masks["focal"] + weights.iou * masks["iou"]
          + aux_loss_coef * outputs["moe_aux_loss"])
  metrics = dict(loss=loss, ce=ce, supervised_tokens=n_tokens, mask_bce=masks["bce"],
                 mask_dice=masks["dice"], mask_focal=masks["focal"], mask_iou_mse=masks["iou"],
                 train_mask_iou=masks["mask_iou"], num_masks=masks["num_masks"],
                 moe_aux_loss=outputs["moe_aux_loss"])
  return loss, metrics
