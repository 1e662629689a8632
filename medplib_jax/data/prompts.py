"""Pixel-level prompts -> region masks on the original image -> region masks on the CLIP patch grid.

A prompt is given in original-image pixel coordinates, (x, y) = (column, row):

* point (x, y): the square of +/- `radius` (20) pixels around it, clipped to the image, as the
  reference demo does;
* box (x0, y0, x1, y1): the pixels x0..x1, y0..y1 inclusive (the reference demo indexes rows with
  x, i.e. transposes the box; here it is oriented correctly);
* polygon [(x, y), ...]: the filled polygon (outline included);
* stroke / mask: a PNG path or an array of the image size; nonzero pixels (or, for a PNG with
  transparency, its non-transparent pixels) form the region.

`region_grid` then moves a mask onto the CLIP canvas exactly as the reference moves region masks:
SAM's `ResizeLongestSide` (PIL bilinear on the 0/1 mask) + centred zero pad to `clip_size`, then
nearest down-sampling to the patch grid with `src = floor(dst * clip_size / grid)`
(`F.interpolate(mode='nearest')`, cv2 INTER_NEAREST).
"""

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from medplib_jax.data.canvas import geometry


class PromptError(ValueError):
  """A prompt that is outside the image, degenerate, or unreadable; the message names it."""


def _check_hw(hw) -> tuple[int, int]:
  h, w = (int(v) for v in hw)
  if h <= 0 or w <= 0:
    raise PromptError(f"image size {hw} must be positive (height, width)")
  return h, w


def point_mask(hw, x, y, radius: int = 20) -> np.ndarray:
  """bool [H, W]: the (2 * radius + 1)-pixel square around pixel (x, y), clipped to the image."""
  h, w = _check_hw(hw)
  if not (0 <= x < w and 0 <= y < h):
    raise PromptError(f"point prompt (x={x}, y={y}) lies outside the {w}x{h} (WxH) image")
  col, row = int(np.floor(x)), int(np.floor(y))
  mask = np.zeros((h, w), bool)
  mask[max(0, row - radius):min(h, row + radius + 1), max(0, col - radius):min(w, col + radius + 1)] = True
  return mask


def box_mask(hw, box) -> np.ndarray:
  """bool [H, W]: pixels x0..x1 (columns) and y0..y1 (rows), inclusive."""
  h, w = _check_hw(hw)
  if len(box) != 4:
    raise PromptError(f"box prompt {tuple(box)} must be (x0, y0, x1, y1)")
  x0, y0, x1, y1 = (int(np.floor(v)) for v in box)
  if x1 < x0 or y1 < y0:
    raise PromptError(f"box prompt {tuple(box)} is degenerate: need x0 <= x1 and y0 <= y1")
  if x0 < 0 or y0 < 0 or x1 >= w or y1 >= h:
    raise PromptError(f"box prompt {tuple(box)} reaches outside the {w}x{h} (WxH) image "
                      f"(pixel coordinates 0..{w - 1}, 0..{h - 1})")
  mask = np.zeros((h, w), bool)
  mask[y0:y1 + 1, x0:x1 + 1] = True
  return mask


def polygon_mask(hw, vertices) -> np.ndarray:
  """bool [H, W]: the filled polygon through vertices [(x, y), ...] (at least 3, non-zero area)."""
  h, w = _check_hw(hw)
  pts = np.asarray(vertices, np.float64)
  if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3:
    raise PromptError(f"polygon prompt {np.asarray(vertices).tolist()} needs at least 3 (x, y) vertices")
  if (pts < 0).any() or (pts[:, 0] > w - 1).any() or (pts[:, 1] > h - 1).any():
    raise PromptError(f"polygon prompt {pts.tolist()} has vertices outside the {w}x{h} (WxH) image")
  x, y = pts[:, 0], pts[:, 1]
  area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
  if area == 0:
    raise PromptError(f"polygon prompt {pts.tolist()} is degenerate (zero area)")
  canvas = Image.new("L", (w, h), 0)
  ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts.tolist()], fill=1, outline=1)
  return np.asarray(canvas) > 0


def stroke_mask(path_or_array, hw) -> np.ndarray:
  """bool [H, W] from a stroke / mask PNG (path) or array of the image size."""
  h, w = _check_hw(hw)
  name = path_or_array if isinstance(path_or_array, str) else f"array{np.shape(path_or_array)}"
  if isinstance(path_or_array, str):
    try:
      with Image.open(path_or_array) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
          alpha = np.asarray(im.convert("RGBA"))[..., 3]
          mask = alpha > 0 if alpha.min() < 255 else np.asarray(im.convert("L")) >= 1
        else:
          mask = np.asarray(im.convert("L")) >= 1
    except OSError as e:
      raise PromptError(f"stroke prompt {name}: not a readable image ({e})") from e
  else:
    array = np.asarray(path_or_array)
    if array.ndim == 3:
      array = array.max(axis=-1)
    if array.ndim != 2:
      raise PromptError(f"stroke prompt {name} must be [H, W] or [H, W, C]")
    mask = array >= 1 if array.dtype != bool else array
  if mask.shape != (h, w):
    raise PromptError(f"stroke prompt {name} is {mask.shape[1]}x{mask.shape[0]} but the image "
                      f"is {w}x{h} (WxH)")
  if not mask.any():
    raise PromptError(f"stroke prompt {name} is empty (no nonzero pixel)")
  return mask


def prompt_mask(hw, prompt: Mapping) -> np.ndarray:
  """Dispatches {'point': (x, y)} | {'box': (x0, y0, x1, y1)} | {'polygon': [...]} |
  {'stroke': path_or_array} to the functions above -> bool [H, W]."""
  if len(prompt) != 1:
    raise PromptError(f"prompt {dict(prompt)} must have exactly one of point, box, polygon, stroke")
  (kind, value), = prompt.items()
  if kind == "point":
    return point_mask(hw, *value)
  if kind == "box":
    return box_mask(hw, value)
  if kind == "polygon":
    return polygon_mask(hw, value)
  if kind == "stroke":
    return stroke_mask(value, hw)
  raise PromptError(f"prompt kind {kind!r} is not one of point, box, polygon, stroke")


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output cell of torch `F.interpolate(mode='nearest')`."""
  return np.minimum(np.floor(np.arange(out_size) * (in_size / out_size)).astype(np.int64), in_size - 1)


def region_grid(mask, clip_size: int, grid: int) -> np.ndarray:
  """bool [H, W] region mask on the original image -> bool [grid, grid] on the CLIP patch grid."""
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise PromptError(f"region mask must be [H, W], got shape {mask.shape}")
  geo = geometry(mask.shape, clip_size)
  rh, rw = geo.resized_hw
  resized = (mask != 0).astype(np.uint8)
  if resized.shape != (rh, rw):
    # The reference resizes the uint8 0/1 mask with PIL bilinear (torchvision's default).
    resized = np.asarray(Image.fromarray(resized).resize((rw, rh), Image.BILINEAR))
  canvas = np.zeros((clip_size, clip_size), bool)
  canvas[geo.pad_top:geo.pad_top + rh, geo.pad_left:geo.pad_left + rw] = resized >= 1
  index = nearest_indices(clip_size, grid)
  return canvas[np.ix_(index, index)]


def region_grids(masks: Sequence[np.ndarray], clip_size: int, grid: int, max_regions: int) -> np.ndarray:
  """Up to `max_regions` masks -> bool [max_regions, grid, grid] (missing regions all False)."""
  if len(masks) > max_regions:
    raise PromptError(f"{len(masks)} region prompts given but the model takes at most {max_regions}")
  out = np.zeros((max_regions, grid, grid), bool)
  for i, m in enumerate(masks):
    out[i] = region_grid(m, clip_size, grid)
  return out
