"""Pixel-grounding metrics: per-sample IoU and Dice (mIoU / mDice), LISA's gIoU / cIoU and
BiomedParse's per-object median Dice, overall and per modality.

Masks arrive binary (thresholding -- 0.1 on the sigmoid in the reference setting -- happens
upstream). Everything is computed from pixel counts: per ground-truth mask (an *object*) its
intersection I = |P & G| and union U = |P | G| with the prediction paired to it, at the original
image size. From those:
* per sample IoU (mode's formula below; 0 when the union is empty) and Dice = 2 IoU / (1 + IoU);
  mIoU / mDice are plain means over samples (what MedPLIB reports);
* gIoU (LISA): the mean over objects of I / U, an empty union counting 1 (LISA's "no-object
  target"); cIoU (LISA): sum of I / sum of U over the whole set;
* median Dice (BiomedParse): the median over objects of 2 I / (I + U) = 2|P & G| / (|P| + |G|),
  1 for an empty union.
All are reported x100, overall and by modality (the image file name up to its first "_": ct,
mr, x, dermoscopy, ...).

A sample may carry several masks ([N, H, W]), and the pairing follows the mode:
* ``"reference"`` reproduces the reference loop: the first predicted mask is compared with all
  N ground-truth masks at once (IoU = sum of the N intersections / sum of the N unions); LISA's
  gIoU / cIoU keep their epsilons (I / (U + 1e-5), sum I / (sum U + 1e-10)).
* ``"correct"`` pairs predicted mask n with ground-truth mask n (a missing prediction is an
  empty mask) and averages the N IoUs; gIoU / cIoU without epsilons.
With one mask per sample, as in MeCoVQA-G, both pairings give the same counts.
"""

import collections
import os
from collections.abc import Iterable

import numpy as np

MODES = ("reference", "correct")
LISA_IOU_EPS, LISA_CIOU_EPS = 1e-5, 1e-10  # LISA's validate(): acc_iou and iou_class


def _as_mask(mask, name: str) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.integer):
    raise ValueError(f"{name} must be a boolean (or 0/1 integer) mask, got dtype {mask.dtype}; "
                     "threshold the probabilities before scoring")
  return mask != 0


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"unknown metric mode {mode!r}; use one of {MODES}")


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


def mask_counts(pred_mask, gt_mask, mode: str = "correct") -> tuple[list[int], list[int]]:
  """Per ground-truth mask, the pixel counts (intersections, unions) with the prediction the
  mode pairs it with (see the module docstring). `pred_mask` None: nothing was decoded.

  Shapes: [H, W] each, or [N, H, W] for a sample with N masks; returns two lists of N ints.
  """
  _check_mode(mode)
  gt = _as_mask(gt_mask, "gt_mask")
  if gt.ndim not in (2, 3):
    raise ValueError(f"gt_mask must be [H, W] or [N, H, W], got {gt.shape}")
  gt = gt[None] if gt.ndim == 2 else gt
  if pred_mask is None:
    preds = np.zeros((0,) + gt.shape[1:], bool)
  else:
    pred = _as_mask(pred_mask, "pred_mask")
    if pred.ndim not in (2, 3):
      raise ValueError(f"pred_mask must be [H, W] or [N, H, W], got {pred.shape}")
    preds = pred[None] if pred.ndim == 2 else pred
    if preds.shape[1:] != gt.shape[1:]:
      raise ValueError(f"pred_mask shape {pred.shape} does not match gt_mask shape {gt.shape}")
  intersections, unions = [], []
  for n in range(gt.shape[0]):
    k = 0 if mode == "reference" else n
    p = preds[k] if k < preds.shape[0] else np.zeros_like(gt[n])
    intersections.append(int(np.logical_and(p, gt[n]).sum()))
    unions.append(int(np.logical_or(p, gt[n]).sum()))
  return intersections, unions


def iou_from_counts(intersections, unions, mode: str = "correct") -> float:
  """The sample IoU from its per-mask counts: reference sum I / sum U, correct the mean of
  I_n / U_n; an empty union scores 0."""
  _check_mode(mode)
  if len(intersections) != len(unions) or not unions:
    raise ValueError(f"need as many intersections as unions (at least one), got "
                     f"{len(intersections)} and {len(unions)}")
  if mode == "reference":
    total = sum(unions)
    return sum(intersections) / total if total else 0.0
  return sum(i / u if u else 0.0 for i, u in zip(intersections, unions)) / len(unions)


def sample_iou(pred_mask, gt_mask, mode: str = "correct") -> float:
  """IoU of one sample. `pred_mask` None means nothing was decoded (IoU 0).

  Shapes: [H, W] each, or [N, H, W] for a sample with N masks (see the module docstring).
  """
  return iou_from_counts(*mask_counts(pred_mask, gt_mask, mode), mode)


def object_iou(intersection: int, union: int, mode: str = "correct") -> float:
  """One object's IoU as LISA's gIoU counts it: an empty union is a found "no-object" (1)."""
  if mode == "reference":
    return intersection / (union + LISA_IOU_EPS) + (1.0 if union == 0 else 0.0)
  return intersection / union if union else 1.0


def object_dice(intersection: int, union: int) -> float:
  """One object's Dice 2 I / (I + U) (= 2|P & G| / (|P| + |G|)); 1 for an empty union."""
  return 2.0 * intersection / (intersection + union) if union else 1.0


class GroundingAccumulator:
  """Collects samples; `result()` gives mIoU / mDice / gIoU / cIoU / median Dice (x100)
  overall and per modality.

  add(pred_mask, gt_mask, modality) scores masks; add_counts(intersections, unions, modality)
  takes the per-mask pixel counts of a sample (as `mask_counts` gives them); add_iou(iou,
  modality) takes a bare sample IoU (one object, no counts: cIoU is then None).
  """

  def __init__(self, mode: str = "correct"):
    _check_mode(mode)
    self.mode = mode
    # Per sample: (IoU, intersections or None, unions or None).
    self._samples: list[tuple] = []
    self._by_modality: dict[str, list[tuple]] = collections.defaultdict(list)

  def _add(self, sample: tuple, modality: str) -> float:
    self._samples.append(sample)
    self._by_modality[str(modality)].append(sample)
    return sample[0]

  def add(self, pred_mask, gt_mask, modality: str) -> float:
    """Adds one sample; returns its IoU (a fraction)."""
    return self.add_counts(*mask_counts(pred_mask, gt_mask, self.mode), modality)

  def add_counts(self, intersections, unions, modality: str) -> float:
    intersections, unions = [int(i) for i in intersections], [int(u) for u in unions]
    iou = iou_from_counts(intersections, unions, self.mode)
    return self._add((iou, intersections, unions), modality)

  def add_iou(self, iou: float, modality: str) -> float:
    return self._add((float(iou), None, None), modality)

  def result(self) -> dict:
    """{"mode", "miou", "mdice", "giou", "ciou", "median_dice", "num_samples", "num_objects",
    "by_modality": {m: the same without "mode"}}; means are None when no sample was added."""
    return {"mode": self.mode, **summary(self._samples, self.mode),
            "by_modality": {m: summary(v, self.mode) for m, v in sorted(self._by_modality.items())}}


def summary(samples: list[tuple], mode: str = "correct") -> dict:
  """Metrics (x100) of samples given as (IoU, intersections | None, unions | None)."""
  if not samples:
    return {"miou": None, "mdice": None, "giou": None, "ciou": None, "median_dice": None,
            "num_samples": 0, "num_objects": 0}
  ious = [s[0] for s in samples]
  object_ious, object_dices, total_i, total_u, counted = [], [], 0, 0, True
  for iou, intersections, unions in samples:
    if intersections is None:  # a bare IoU: one object, no pixel counts
      object_ious.append(iou)
      object_dices.append(dice_from_iou(iou))
      counted = False
      continue
    object_ious += [object_iou(i, u, mode) for i, u in zip(intersections, unions)]
    object_dices += [object_dice(i, u) for i, u in zip(intersections, unions)]
    total_i, total_u = total_i + sum(intersections), total_u + sum(unions)
  if not counted:
    ciou = None
  elif mode == "reference":
    ciou = 100.0 * total_i / (total_u + LISA_CIOU_EPS)
  else:
    ciou = 100.0 * total_i / total_u if total_u else 100.0
  return {"miou": 100.0 * sum(ious) / len(ious),
          "mdice": 100.0 * sum(dice_from_iou(i) for i in ious) / len(ious),
          "giou": 100.0 * sum(object_ious) / len(object_ious),
          "ciou": ciou,
          "median_dice": 100.0 * float(np.median(object_dices)),
          "num_samples": len(samples), "num_objects": len(object_ious)}


def grounding_metrics(samples: Iterable[tuple], mode: str = "correct") -> dict:
  """`samples`: (pred_mask, gt_mask, modality) triples; returns `GroundingAccumulator.result()`."""
  acc = GroundingAccumulator(mode)
  for pred, gt, modality in samples:
    acc.add(pred, gt, modality)
  return acc.result()
