"""Host-side image geometry shared by the CLIP and SAM inputs: resize the longest side, pad centred.

Both canvases follow SPEC.md: the longest side is resized with SAM's `ResizeLongestSide` rounding
(`int(x * scale + 0.5)`), then the image is padded *centred* to a square (the CLIP canvas with the
CLIP mean colour, the SAM canvas with zeros after normalisation). `CanvasGeometry` records where
the original image sits, so prompts can be mapped in and masks mapped back out.
"""

import dataclasses

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
SAM_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
SAM_STD = np.array([58.395, 57.12, 57.375], np.float32)


@dataclasses.dataclass(frozen=True)
class CanvasGeometry:
  """Where an (H, W) original lies on a `size` x `size` canvas."""
  orig_hw: tuple[int, int]
  resized_hw: tuple[int, int]
  pad_top: int
  pad_left: int
  size: int

  @property
  def scale(self) -> float:
    return self.size / max(self.orig_hw)

  def to_canvas(self, xy: np.ndarray) -> np.ndarray:
    """Maps original-image (x, y) coordinates [..., 2] onto the canvas."""
    xy = np.asarray(xy, np.float32)
    sx = self.resized_hw[1] / self.orig_hw[1]
    sy = self.resized_hw[0] / self.orig_hw[0]
    return np.stack([xy[..., 0] * sx + self.pad_left, xy[..., 1] * sy + self.pad_top], axis=-1)


def resized_shape(hw: tuple[int, int], target: int) -> tuple[int, int]:
  """SAM's ResizeLongestSide.get_preprocess_shape: longest side -> target, rounding half up."""
  h, w = hw
  scale = target / max(h, w)
  return int(h * scale + 0.5), int(w * scale + 0.5)


def geometry(hw: tuple[int, int], size: int) -> CanvasGeometry:
  rh, rw = resized_shape(hw, size)
  return CanvasGeometry(tuple(hw), (rh, rw), (size - rh) // 2, (size - rw) // 2, size)


def _resize(array: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
  if array.shape[:2] == tuple(hw):
    return array
  return np.asarray(Image.fromarray(array).resize((hw[1], hw[0]), resample=resample))


def _pad(array: np.ndarray, geo: CanvasGeometry, fill) -> np.ndarray:
  out = np.empty((geo.size, geo.size) + array.shape[2:], array.dtype)
  out[...] = fill
  rh, rw = geo.resized_hw
  out[geo.pad_top:geo.pad_top + rh, geo.pad_left:geo.pad_left + rw] = array
  return out


def clip_canvas(image: np.ndarray, size: int) -> tuple[np.ndarray, CanvasGeometry]:
  """uint8 RGB [H, W, 3] -> CLIP-normalised float32 [size, size, 3] (mean-colour centred pad)."""
  geo = geometry(image.shape[:2], size)
  # SAM's ResizeLongestSide (torchvision resize of a PIL image: bilinear), as the reference.
  resized = _resize(image, geo.resized_hw, Image.BILINEAR)
  mean_colour = tuple(int(v * 255) for v in CLIP_MEAN)  # as LLaVA's expand2square
  canvas = _pad(resized, geo, mean_colour).astype(np.float32) / 255.0
  return (canvas - CLIP_MEAN) / CLIP_STD, geo


def sam_canvas(image: np.ndarray, size: int) -> tuple[np.ndarray, CanvasGeometry]:
  """uint8 RGB [H, W, 3] -> SAM-normalised float32 [size, size, 3], zero (post-norm) centred pad."""
  geo = geometry(image.shape[:2], size)
  resized = _resize(image, geo.resized_hw, Image.BILINEAR).astype(np.float32)
  return _pad((resized - SAM_MEAN) / SAM_STD, geo, 0.0), geo


def mask_canvas(mask: np.ndarray, size: int) -> np.ndarray:
  """Binary [H, W] mask -> bool [size, size] on the same centred canvas (nearest resize)."""
  geo = geometry(mask.shape[:2], size)
  resized = _resize(np.asarray(mask, bool).astype(np.uint8), geo.resized_hw, Image.NEAREST)
  return _pad(resized, geo, 0).astype(bool)
