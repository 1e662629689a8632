"""MedPLIB losses (SPEC.md): next-token CE, per-mask BCE / Dice / focal / IoU-MSE, MoE aux.

Mask losses are computed per mask over the image area of the SAM canvas (the centred padding is
excluded, as the reference computes them at the original resolution), then averaged over the
valid masks of the whole batch. A batch without masks contributes exactly zero mask loss.
"""

import jax
import jax.numpy as jnp

from medplib_jax.data.batch import IGNORE_INDEX

# LISA/MedPLIB's dice_loss divides by 1000 before summing (numerically the same ratio up to eps).
DICE_SCALE = 1000.0
DICE_EPS = 1e-6


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
  pred = (logits > 0) & region
  inter = (pred & targets).sum((-2, -1))
  union = (pred | (targets & region)).sum((-2, -1))
  iou = jnp.where(union > 0, inter / jnp.maximum(union, 1), 0.0)
  return dict(bce=bce, dice=dice, focal=focal, iou=iou)


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


def total_loss(outputs, batch, weights, aux_loss_coef):
  """Weighted sum of every component; returns (loss, metrics dict of scalars)."""
  ce, n_tokens = cross_entropy(outputs["logits"], batch["labels"])
  masks = mask_losses(outputs["mask_logits"], outputs["iou_pred"], batch["masks"],
                      outputs["seg_valid"], batch["sam_resized_hw"])
  loss = (weights.ce * ce + weights.bce * masks["bce"] + weights.dice * masks["dice"]
          + weights.focal * masks["focal"] + weights.iou * masks["iou"]
          + aux_loss_coef * outputs["moe_aux_loss"])
  metrics = dict(loss=loss, ce=ce, supervised_tokens=n_tokens, mask_bce=masks["bce"],
                 mask_dice=masks["dice"], mask_focal=masks["focal"], mask_iou_mse=masks["iou"],
                 train_mask_iou=masks["mask_iou"], num_masks=masks["num_masks"],
                 moe_aux_loss=outputs["moe_aux_loss"])
  return loss, metrics
