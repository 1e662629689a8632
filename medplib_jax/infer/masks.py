"""Low-resolution SAM mask logits -> masks at the original image size.

Two modes (SPEC.md, Evaluation):
* ``correct``: upsample [N, 4h, 4w] logits to the model input size (the SAM canvas), crop the
  centred padding, resize bilinearly to the original size.
* ``reference``: MedPLIB's `postprocess_masks`: the crop is taken from the *low-res* logits using
  offsets computed for the 256-px canvas (pad = 64 - resized, pad_top = pad // 2, Python slice
  semantics with negative starts), then resized to the original size. For square images both modes
  agree; for non-square ones the reference mask is shifted and stretched.
Bilinear resizing matches torch `F.interpolate(mode="bilinear", align_corners=False)` (no
antialiasing), so both modes are reproducible against the reference.
All of it runs on the host in NumPy: every image has its own size, and per-shape XLA kernels
(eager jnp ops) recompile for each new size.
"""

import numpy as np

from medplib_jax.data.canvas import CanvasGeometry

MODES = ("correct", "reference")
REFERENCE_THRESHOLD = 0.1  # the reference evaluation thresholds sigmoid(logits) at 0.1


def _axis_weights(in_size: int, out_size: int):
  """torch's align_corners=False source indices and weights for one axis."""
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  i0 = np.floor(src).astype(np.int32)
  i0 = np.minimum(i0, in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0).astype(np.float32)
  return i0, i1, w1


def resize_bilinear(x, out_hw: tuple[int, int]):
  """[..., H, W] -> [..., out_h, out_w], as torch F.interpolate(bilinear, align_corners=False)."""
  x = np.asarray(x, np.float32)
  h, w = x.shape[-2:]
  if (h, w) == tuple(out_hw):
    return x
  r0, r1, rw = _axis_weights(h, out_hw[0])
  c0, c1, cw = _axis_weights(w, out_hw[1])
  rows = x[..., r0, :] * (1 - rw)[:, None] + x[..., r1, :] * rw[:, None]
  return rows[..., c0] * (1 - cw) + rows[..., c1] * cw


def reference_crop(low_res_hw: tuple[int, int], geometry: CanvasGeometry) -> tuple[slice, slice]:
  """The rows/cols MedPLIB keeps from [.., Lh, Lw] logits (offsets from the canvas-size resize)."""
  crops = []
  for size, resized in zip(low_res_hw, geometry.resized_hw):
    pad = size - resized  # negative when the logits are smaller than the resized image
    top = pad // 2
    start, stop, _ = slice(top, top + size - pad).indices(size)
    crops.append(slice(start, stop))
  return crops[0], crops[1]


def postprocess_logits(low_res, geometry: CanvasGeometry, mode: str = "correct"):
  """low_res [N, 4h, 4w] (or [4h, 4w]) logits on the SAM canvas -> float logits [N, H, W] (original)."""
  if mode not in MODES:
    raise ValueError(f"unknown post-processing mode {mode!r}; choose one of {MODES}")
  low_res = np.asarray(low_res, np.float32)
  if mode == "correct":
    canvas = resize_bilinear(low_res, (geometry.size, geometry.size))
    rh, rw = geometry.resized_hw
    cropped = canvas[..., geometry.pad_top:geometry.pad_top + rh,
                     geometry.pad_left:geometry.pad_left + rw]
  else:
    rows, cols = reference_crop(low_res.shape[-2:], geometry)
    cropped = low_res[..., rows, cols]
  return resize_bilinear(cropped, geometry.orig_hw)


def mask_probabilities(logits) -> np.ndarray:
  """float32 sigmoid(logits), same shape."""
  logits = np.asarray(logits, np.float32)
  with np.errstate(over="ignore"):  # exp overflows to inf for very negative logits: sigmoid 0
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-logits))


def masks_from_logits(logits, threshold_prob: float = 0.5):
  """Binary masks: sigmoid(logits) > threshold_prob (the reference evaluation uses 0.1)."""
  return mask_probabilities(logits) > np.float32(threshold_prob)


def mask_rle(mask) -> dict:
  """Row-major run lengths of a bool [H, W] mask, starting with a run of False."""
  flat = np.asarray(mask, bool).ravel()
  change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat.size and flat[0]:
    counts = [0] + counts
  return {"size": list(np.shape(mask)), "counts": counts}
