"""Pixel-grounding metrics: per-sample IoU and Dice, their means overall and per modality.

Masks arrive binary (thresholding -- 0.1 on the sigmoid in the reference setting -- happens
upstream). Per sample IoU = |P & G| / |P | G| (0 when the union is empty) and
Dice = 2 IoU / (1 + IoU); mIoU / mDice are plain means over samples, reported x100, overall and
by modality (the image file name up to its first "_": ct, mr, x, dermoscopy, ...).

A sample may carry several masks ([N, H, W]):
* ``"reference"`` reproduces the reference loop: the first predicted mask is compared with all
  N ground-truth masks at once (intersections and unions summed over the N pairs).
* ``"correct"`` pairs predicted mask n with ground-truth mask n (a missing prediction is an
  empty mask) and averages the N IoUs.
With one mask per sample, as in MeCoVQA-G, both give the same number.
"""

import collections
import os
from collections.abc import Iterable

import numpy as np

MODES = ("reference", "correct")


def _as_mask(mask, name: str) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.integer):
    raise ValueError(f"{name} must be a boolean (or 0/1 integer) mask, got dtype {mask.dtype}; "
                     "threshold the probabilities before scoring")
  return mask != 0


def mask_iou(pred_mask, gt_mask) -> float:
  """IoU of two binary masks of the same shape ([H, W] or [N, H, W], summed over all pixels)."""
  pred, gt = _as_mask(pred_mask, "pred_mask"), _as_mask(gt_mask, "gt_mask")
  if pred.shape != gt.shape:
    raise ValueError(f"pred_mask shape {pred.shape} differs from gt_mask shape {gt.shape}")
  union = int(np.logical_or(pred, gt).sum())
  return int(np.logical_and(pred, gt).sum()) / union if union else 0.0


def dice_from_iou(iou: float) -> float:
  """Dice of a single mask pair from its IoU: 2 IoU / (1 + IoU)."""
  return 2.0 * iou / (1.0 + iou)


def modality_from_path(image_path: str) -> str:
  """"…/ct_00012_liver.png" -> "ct": the file name up to its first underscore."""
  return os.path.basename(str(image_path)).split("_")[0]


def sample_iou(pred_mask, gt_mask, mode: str = "correct") -> float:
  """IoU of one sample. `pred_mask` None means nothing was decoded (IoU 0).

  Shapes: [H, W] each, or [N, H, W] for a sample with N masks (see the module docstring).
  """
  if mode not in MODES:
    raise ValueError(f"unknown metric mode {mode!r}; use one of {MODES}")
  if pred_mask is None:
    return 0.0
  pred, gt = _as_mask(pred_mask, "pred_mask"), _as_mask(gt_mask, "gt_mask")
  if gt.ndim not in (2, 3) or pred.ndim not in (2, 3):
    raise ValueError(f"masks must be [H, W] or [N, H, W], got pred_mask {pred.shape}, "
                     f"gt_mask {gt.shape}")
  gt = gt[None] if gt.ndim == 2 else gt
  preds = pred[None] if pred.ndim == 2 else pred
  if preds.shape[1:] != gt.shape[1:]:
    raise ValueError(f"pred_mask shape {pred.shape} does not match gt_mask shape {gt.shape}")
  if mode == "reference":
    first = np.broadcast_to(preds[0], gt.shape)
    union = int(np.logical_or(first, gt).sum())
    return int(np.logical_and(first, gt).sum()) / union if union else 0.0
  ious = []
  for n in range(gt.shape[0]):
    p = preds[n] if n < preds.shape[0] else np.zeros_like(gt[n])
    ious.append(mask_iou(p, gt[n]))
  return sum(ious) / len(ious)


class GroundingAccumulator:
  """Collects per-sample IoU / Dice; `result()` gives the means (x100) overall and per modality."""

  def __init__(self, mode: str = "correct"):
    if mode not in MODES:
      raise ValueError(f"unknown metric mode {mode!r}; use one of {MODES}")
    self.mode = mode
    self._by_modality: dict[str, list[float]] = collections.defaultdict(list)
    self._ious: list[float] = []

  def add(self, pred_mask, gt_mask, modality: str) -> float:
    """Adds one sample; returns its IoU (a fraction)."""
    iou = sample_iou(pred_mask, gt_mask, self.mode)
    self._ious.append(iou)
    self._by_modality[str(modality)].append(iou)
    return iou

  def result(self) -> dict:
    """{"mode", "miou", "mdice", "num_samples", "by_modality": {m: {"miou", "mdice",
    "num_samples"}}}; means are None when no sample was added."""
    return {"mode": self.mode, **_summary(self._ious),
            "by_modality": {m: _summary(v) for m, v in sorted(self._by_modality.items())}}


def _summary(ious: list[float]) -> dict:
  if not ious:
    return {"miou": None, "mdice": None, "num_samples": 0}
  return {"miou": 100.0 * sum(ious) / len(ious),
          "mdice": 100.0 * sum(dice_from_iou(i) for i in ious) / len(ious),
          "num_samples": len(ious)}


def grounding_metrics(samples: Iterable[tuple], mode: str = "correct") -> dict:
  """`samples`: (pred_mask, gt_mask, modality) triples; returns `GroundingAccumulator.result()`."""
  acc = GroundingAccumulator(mode)
  for pred, gt, modality in samples:
    acc.add(pred, gt, modality)
  return acc.result()
