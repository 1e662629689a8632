"""Synthetic MeCoVQA: small, learnable, deterministic data for `make demo` and the tests.

`write_synthetic(out_dir, n, seed)` draws `n` images in the styles of the 8 MeCoVQA modalities,
each holding 1-3 named structures (disjoint, each >= 5 % of the image) with binary masks, and
writes MeCoVQA-format JSON per split:

* closed VQA ("C", CLOSED): the modality; is there a lesion?; is there a <structure>?
* open VQA ("C", OPEN): where is the <structure>? (3x3 grid of the mask centroid); which
  structure is the largest?
* region VQA ("R"): the structure under a point / box / free-form region (a PNG region mask,
  named as `<region>regions/....png</region>` in the question; always inside the structure);
* grounding ("G"): "segment the <structure>" -> "Sure, the <structure> is <SEG><mask>...</mask>.".

Each modality has three structure classes (one a lesion) with a characteristic shape, intensity
or colour and texture, so every answer can be read off the image (or the region), and the
answer vocabulary is small. Image i depends only on (seed, i): growing `n` keeps earlier images.
See docs/synthetic_data.md.
"""

import collections
import dataclasses
import json
import math
import os
import re
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

MODALITIES = ("ct", "mr", "x", "ultrasound", "dermoscopy", "endoscopy", "fundus", "microscopy")
# The answer to "what modality": the file-name prefix except for X-ray.
MODALITY_ANSWER = {m: m for m in MODALITIES} | {"x": "x-ray"}
REGION_KINDS = ("point", "box", "free")
MIN_MASK_FRACTION = 0.05     # every structure covers at least this share of the image
POINT_HALF_SIZE = 20         # a point prompt is the square +/- 20 px around it (shrunk to fit)
_PNG = {"compress_level": 1}  # fast; zlib output is still deterministic

QUESTIONS = {
    "modality": ("What is the modality of this image?", "Which imaging modality was used?"),
    "lesion": ("Is there a lesion in this image?", "Does this image show any abnormality?"),
    "presence": ("Is there a {name} in this image?", "Can you see a {name} in this image?"),
    "where": ("Where is the {name} in this image?", "Where is the {name} located?"),
    "largest": ("What is the largest structure in this image?",),
    "point": ("What structure does the point <region>{path}</region> mark?",),
    "box": ("What structure is inside the box <region>{path}</region>?",),
    "free": ("What is the structure in the region <region>{path}</region>?",),
    "grounding": ("Please segment the {name} in this image.", "Can you segment the {name}?"),
    "grounding_lesion": ("Please segment the lesion in this image.",),
}
GROUNDING_ANSWER = "Sure, the {name} is <SEG><mask>{path}</mask>."


# ---------------------------------------------------------------------------------------------
# Texture helpers


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
  """Zero-mean, roughly unit-variance noise correlated over `cell` pixels, [h, w] float32."""
  gh, gw = max(2, int(math.ceil(h / cell)) + 1), max(2, int(math.ceil(w / cell)) + 1)
  coarse = rng.standard_normal((gh, gw)).astype(np.float32)
  field = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))
  return field / max(float(field.std()), 1e-3)


def _dots(rng: np.random.Generator, h: int, w: int, density: float, size: int) -> np.ndarray:
  """Scattered blobs of about `size` px (cell nuclei, specular highlights), [h, w] bool."""
  seeds = rng.random((h, w)) < density
  return ndimage.maximum_filter(seeds, size=size)


def _ellipse_field(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
  ys, xs = np.ogrid[:h, :w]
  return np.sqrt(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2).astype(np.float32)


def _value(colour, shape_hw) -> np.ndarray:
  return np.broadcast_to(np.asarray(colour, np.float32), shape_hw + (np.size(colour),)).copy()


# ---------------------------------------------------------------------------------------------
# Structure classes: shape parameters + appearance


@dataclasses.dataclass(frozen=True)
class StructureClass:
  """One named structure: its outline statistics and how its inside looks.

  The outline is a star-shaped curve around an ellipse with axis ratio in `aspect`, boundary
  harmonics up to `wobble`, an optional bean-like `dent`, or a `crescent`. `paint(rn, u, v, rng)`
  returns the colour [h, w, C] inside a window, given the normalised radius `rn` (< 1 inside) and
  the shape-frame coordinates u (major axis) and v.
  """
  name: str
  is_lesion: bool
  paint: Callable
  aspect: tuple[float, float] = (1.0, 1.3)
  wobble: float = 0.05
  dent: float = 0.0
  crescent: bool = False
  edge: float = 0.08          # width of the soft boundary in units of rn
  angle: tuple[float, float] = (0.0, math.pi)


def _flat(colour, amp=0.0, cell=6.0):
  def paint(rn, u, v, rng):
    out = _value(colour, rn.shape)
    if amp:
      out += amp * _smooth_noise(rng, *rn.shape, cell)[..., None]
    return out
  return paint


def _rim(inner, rim, at, amp=0.0):
  """Homogeneous inside with a different band where rn > `at` (cortex, wall, ring)."""
  def paint(rn, u, v, rng):
    out = np.where((rn > at)[..., None], _value(rim, rn.shape), _value(inner, rn.shape))
    if amp:
      out += amp * _smooth_noise(rng, *rn.shape, 4.0)[..., None]
    return out
  return paint


def _core(outer, core, at, amp=0.0):
  """A different core where rn < `at` (renal sinus, optic cup, gland lumen)."""
  return _rim(core, outer, at, amp)


def _striped(base, amp, period):
  """Stripes across the major axis (cerebellar folia)."""
  def paint(rn, u, v, rng):
    return _value(base, rn.shape) + amp * np.sin(2 * math.pi * u * period)[..., None]
  return paint


def _blotched(base, dark, light, light_at):
  """Irregular dark blotches and a lighter rim (pigmented lesion, tumour nests)."""
  def paint(rn, u, v, rng):
    out = _value(base, rn.shape)
    blotch = _smooth_noise(rng, *rn.shape, 5.0) > 0.5
    out[blotch] = np.asarray(dark, np.float32)
    out[rn > light_at] = np.asarray(light, np.float32)
    return out
  return paint


def _speckled(base, spot, density):
  """Base colour with many small spots (calcified mass, crowded tumour nuclei)."""
  def paint(rn, u, v, rng):
    out = _value(base, rn.shape)
    out[_dots(rng, *rn.shape, density, 3)] = np.asarray(spot, np.float32)
    return out
  return paint


def _highlighted(base, highlight):
  """A raised lesion lit from the scope: a specular spot towards its top."""
  def paint(rn, u, v, rng):
    out = _value(base, rn.shape) + 10 * _smooth_noise(rng, *rn.shape, 4.0)[..., None]
    ys = np.linspace(-1, 1, rn.shape[0])[:, None]
    spot = (rn < 0.35) & (ys < 0.1)
    out[spot] = np.asarray(highlight, np.float32)
    return out
  return paint


_VERTICAL = (math.pi / 2 - 0.25, math.pi / 2 + 0.25)

STRUCTURES: dict[str, tuple[StructureClass, ...]] = {
    "ct": (
        StructureClass("liver", False, _flat(150, 5, 10), aspect=(1.3, 1.8), wobble=0.12),
        StructureClass("kidney", False, _rim(185, 215, 0.7), aspect=(1.5, 2.0), dent=0.35),
        StructureClass("tumor", True, _flat(60, 4), aspect=(1.0, 1.2), wobble=0.1, edge=0.2),
    ),
    "mr": (
        StructureClass("ventricle", False, _flat(25), aspect=(2.5, 3.5), wobble=0.08),
        StructureClass("cerebellum", False, _striped(150, 25, 2.5), aspect=(1.2, 1.6)),
        StructureClass("tumor", True, _rim(225, 255, 0.8), aspect=(1.0, 1.3), wobble=0.25),
    ),
    "x": (
        StructureClass("lung", False, _flat(35, 6, 8), aspect=(1.6, 2.2), angle=_VERTICAL),
        StructureClass("heart", False, _flat(155, 4), aspect=(1.0, 1.3), wobble=0.15),
        StructureClass("mass", True, _speckled(215, 250, 0.05), aspect=(1.0, 1.2), wobble=0.3),
    ),
    "ultrasound": (
        StructureClass("kidney", False, _core(150, 210, 0.45), aspect=(1.6, 2.2), dent=0.25),
        StructureClass("vessel", False, _rim(45, 190, 0.8), aspect=(3.0, 4.5), wobble=0.03,
                       angle=(-0.4, 0.4)),
        StructureClass("cyst", True, _rim(4, 170, 0.9), aspect=(1.0, 1.3), wobble=0.05),
    ),
    "dermoscopy": (
        StructureClass("melanoma", True, _blotched((95, 60, 45), (55, 32, 28), (140, 100, 80), 0.85),
                       aspect=(1.0, 1.4), wobble=0.35),
        StructureClass("vessel", False, _flat((195, 50, 60), 8), aspect=(3.5, 5.0), wobble=0.04),
        StructureClass("bubble", False, _rim((248, 248, 248), (120, 110, 110), 0.88),
                       aspect=(1.0, 1.2), wobble=0.02),
    ),
    "endoscopy": (
        StructureClass("lumen", False, _flat((25, 8, 8), 4), aspect=(1.0, 1.4), wobble=0.15,
                       edge=0.3),
        StructureClass("polyp", True, _highlighted((230, 140, 95), (255, 250, 245)),
                       aspect=(1.0, 1.3), wobble=0.08),
        StructureClass("fold", False, _flat((245, 190, 175), 6), aspect=(1.2, 1.8), crescent=True),
    ),
    "fundus": (
        StructureClass("optic disc", False, _core((250, 215, 120), (255, 245, 200), 0.4),
                       aspect=(1.0, 1.2), wobble=0.03),
        StructureClass("macula", False, _flat((135, 40, 12), 4), aspect=(1.0, 1.2), edge=0.3),
        StructureClass("hemorrhage", True, _flat((75, 6, 6), 6), aspect=(1.0, 1.5), wobble=0.35),
    ),
    "microscopy": (
        StructureClass("gland", False, _core((150, 80, 170), (250, 245, 250), 0.65),
                       aspect=(1.2, 1.8), wobble=0.12),
        StructureClass("vessel", False, _flat((215, 50, 70), 10), aspect=(2.5, 4.0), wobble=0.06),
        StructureClass("tumor", True, _speckled((95, 40, 135), (55, 15, 85), 0.08),
                       aspect=(1.0, 1.4), wobble=0.3),
    ),
}


# ---------------------------------------------------------------------------------------------
# Modality backgrounds (field of view + tissue) and acquisition noise


def _bg_ct(rng, h, w):
  rn = _ellipse_field(h, w, h * rng.uniform(0.49, 0.53), w / 2, h * rng.uniform(0.44, 0.48),
                      w * rng.uniform(0.45, 0.48))
  img = _value(5.0, (h, w))
  body = rn < 1
  img[body] = 105 + 6 * _smooth_noise(rng, h, w, 20)[body][:, None]
  img[(rn > 0.93) & body] = 65                     # subcutaneous fat
  return img, rn < 0.91


def _finish_ct(img, fov, rng):
  noise = rng.standard_normal(img.shape[:2]).astype(np.float32)
  noise = (noise + np.roll(noise, 1, 0) + np.roll(noise, 1, 1)) / math.sqrt(3)  # correlated
  return img + 9 * noise[..., None]


def _bg_mr(rng, h, w):
  rn = _ellipse_field(h, w, h / 2, w / 2, h * rng.uniform(0.44, 0.48), w * rng.uniform(0.44, 0.48))
  img = _value(0.0, (h, w))
  head = rn < 1
  img[head] = 105 + 10 * _smooth_noise(rng, h, w, 8)[head][:, None]
  img[(rn > 0.9) & (rn < 0.94)] = 30               # skull
  img[(rn >= 0.94) & head] = 175                   # scalp fat (bright in T1)
  return img, rn < 0.88


def _finish_mr(img, fov, rng):
  h, w = img.shape[:2]
  bias = 1 + 0.08 * _smooth_noise(rng, h, w, max(h, w) / 2)
  re_, im = (rng.standard_normal((2, h, w)) * 7).astype(np.float32)
  return np.sqrt((img[..., 0] * bias + re_) ** 2 + im ** 2)[..., None]   # Rician magnitude


def _bg_x(rng, h, w):
  ys, xs = np.ogrid[:h, :w]
  side = np.abs(xs / w - 0.5) * 2                  # brighter soft tissue towards the sides
  ribs = 10 * np.sin(2 * math.pi * ys / rng.uniform(14, 22) + rng.uniform(0, 6))
  img = (85 + 50 * side ** 2 + ribs + 5 * _smooth_noise(rng, h, w, 16))[..., None]
  fov = np.zeros((h, w), bool)
  fov[int(0.03 * h):int(0.97 * h), int(0.03 * w):int(0.97 * w)] = True
  return img.astype(np.float32), fov


def _finish_x(img, fov, rng):
  quantum = rng.standard_normal(img.shape).astype(np.float32)
  return img + 0.9 * np.sqrt(np.maximum(img, 0) + 1) * quantum


def _bg_ultrasound(rng, h, w):
  ys, xs = np.ogrid[:h, :w]
  ay, ax = -0.08 * h, w / 2
  radius = np.sqrt((ys - ay) ** 2 + (xs - ax) ** 2)
  angle = np.arctan2(xs - ax, ys - ay)
  half = math.radians(rng.uniform(38, 48))
  fov_all = (np.abs(angle) < half) & (radius > 0.15 * h) & (radius < 1.05 * h)
  depth = np.clip((radius - 0.15 * h) / h, 0, 1)
  layers = 12 * _smooth_noise(rng, h, w, 10)
  img = np.where(fov_all, 100 * (1 - 0.35 * depth) + layers, 0)[..., None].astype(np.float32)
  fov = (np.abs(angle) < half - 0.06) & (radius > 0.2 * h) & (radius < h)
  return img, fov


def _finish_ultrasound(img, fov, rng):
  h, w = img.shape[:2]
  re_, im = rng.standard_normal((2, h, w)).astype(np.float32)
  speckle = np.hypot(re_, im)
  speckle = (speckle + np.roll(speckle, 1, 1)) / 2 / 1.2533   # laterally elongated, mean ~1
  out = img * speckle[..., None]
  out[img <= 0] = 0
  return out


def _bg_colour(rng, h, w, colour, var, fov_scale):
  rn = _ellipse_field(h, w, h / 2, w / 2, h * fov_scale, w * fov_scale)
  img = _value(colour, (h, w)) + var * _smooth_noise(rng, h, w, 24)[..., None]
  img *= np.clip(1.25 - 0.45 * rn, 0, 1)[..., None]   # vignetting
  img[rn >= 1] = 0
  return img, rn < 0.92


def _bg_dermoscopy(rng, h, w):
  img, fov = _bg_colour(rng, h, w, (222, 172, 150), 12, 0.58)
  img += 5 * _smooth_noise(rng, h, w, 2)[..., None]   # skin grain
  return img, fov


def _bg_endoscopy(rng, h, w):
  img, fov = _bg_colour(rng, h, w, (190, 92, 80), 20, 0.56)
  img[_dots(rng, h, w, 0.0015, 3) & fov] = 255        # specular highlights
  return img, fov


def _bg_fundus(rng, h, w):
  img, fov = _bg_colour(rng, h, w, (205, 88, 36), 10, 0.5)
  vessels = Image.new("L", (w, h))
  draw = ImageDraw.Draw(vessels)
  for _ in range(int(rng.integers(4, 7))):
    x0, y0 = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    heading, points = rng.uniform(0, 2 * math.pi), [(x0, y0)]
    for _ in range(12):
      heading += rng.normal(0, 0.25)
      x0, y0 = x0 + 0.06 * w * math.cos(heading), y0 + 0.06 * h * math.sin(heading)
      points.append((x0, y0))
    draw.line(points, fill=255, width=int(rng.integers(2, 4)))
  on_vessel = (np.asarray(vessels) > 0) & (img[..., 0] > 0)
  img[on_vessel] *= 0.6
  return img, fov


def _bg_microscopy(rng, h, w):
  img = _value((236, 178, 206), (h, w)) + 8 * _smooth_noise(rng, h, w, 12)[..., None]
  img[_dots(rng, h, w, 0.004, 3)] = (115, 55, 150)    # scattered stromal nuclei
  return img, np.ones((h, w), bool)


def _finish_colour(img, fov, rng):
  return img + 3 * rng.standard_normal(img.shape).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ModalityStyle:
  background: Callable   # (rng, h, w) -> (image [h, w, C] float, field of view [h, w] bool)
  finish: Callable       # (image, fov, rng) -> image with acquisition noise


STYLES = {
    "ct": ModalityStyle(_bg_ct, _finish_ct),
    "mr": ModalityStyle(_bg_mr, _finish_mr),
    "x": ModalityStyle(_bg_x, _finish_x),
    "ultrasound": ModalityStyle(_bg_ultrasound, _finish_ultrasound),
    "dermoscopy": ModalityStyle(_bg_dermoscopy, _finish_colour),
    "endoscopy": ModalityStyle(_bg_endoscopy, _finish_colour),
    "fundus": ModalityStyle(_bg_fundus, _finish_colour),
    "microscopy": ModalityStyle(_bg_microscopy, _finish_colour),
}


# ---------------------------------------------------------------------------------------------
# Placing structures


@dataclasses.dataclass
class Structure:
  cls: StructureClass
  mask: np.ndarray        # [H, W] bool
  area: int
  centroid_xy: tuple[float, float]


def _shape_window(cls, rng, area, free):
  """Samples one outline of about `area` px: (window slices, rn, u, v), or None when it cannot
  fit or a quick probe of points surely inside it hits a pixel that is not `free` [H, W] bool."""
  h, w = free.shape
  ratio = rng.uniform(*cls.aspect)
  a = math.sqrt(area * ratio / math.pi) * (1.5 if cls.crescent else 1.0)   # semi-axes
  b = a / ratio
  theta = rng.uniform(*cls.angle)
  amps = rng.uniform(0, cls.wobble, 3) / np.arange(2, 5)
  phases = rng.uniform(0, 2 * math.pi, 3)
  ext_y = abs(a * math.sin(theta)) + abs(b * math.cos(theta))
  ext_x = abs(a * math.cos(theta)) + abs(b * math.sin(theta))
  # The window holds rn < 1.15: the mask plus the keep-out margin around it.
  ext_y, ext_x = ext_y * (1 + amps.sum()) * 1.15 + 2, ext_x * (1 + amps.sum()) * 1.15 + 2
  if 2 * ext_y >= h or 2 * ext_x >= w:
    return None
  cy, cx = rng.uniform(ext_y, h - ext_y), rng.uniform(ext_x, w - ext_x)
  # Points at this fraction of the axes lie inside the outline whatever its harmonics and dent.
  reach = max(0.0, 0.9 * (1 - amps.sum() - cls.dent))
  probes = [(0.0, 0.0)] + [(sa * reach * a, sb * reach * b) for sa, sb in
                           ((1, 0), (-1, 0), (0, 1), (0, -1))]
  for pu, pv in probes if not cls.crescent else ():
    py = int(cy + pu * math.sin(theta) + pv * math.cos(theta))
    px = int(cx + pu * math.cos(theta) - pv * math.sin(theta))
    if not free[py, px]:
      return None
  y0, y1 = int(cy - ext_y), int(math.ceil(cy + ext_y))
  x0, x1 = int(cx - ext_x), int(math.ceil(cx + ext_x))
  dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
  dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
  u = (dx * math.cos(theta) + dy * math.sin(theta)) / a
  v = (-dx * math.sin(theta) + dy * math.cos(theta)) / b
  rho, phi = np.hypot(u, v), np.arctan2(v, u)
  radius = 1 + sum(np.float32(amp) * np.cos(k * phi + np.float32(ph))
                   for k, amp, ph in zip((2, 3, 4), amps, phases))
  if cls.dent:
    off = np.angle(np.exp(1j * (phi - math.pi / 2)))       # dent on the +v side
    radius = radius - cls.dent * np.exp(-off ** 2 / (2 * 0.4 ** 2))
  rn = rho / radius
  if cls.crescent:
    inner = np.hypot(u - 0.55, v * 1.1) / 0.85               # bite taken out of one side
    rn = np.maximum(rn, 2 - inner)
  return (slice(y0, y1), slice(x0, x1)), rn.astype(np.float32), u, v


def _place(classes, rng, fov, h, w):
  """Non-overlapping outlines inside the field of view; drops a class that does not fit."""
  occupied = np.zeros((h, w), bool)
  placed = []
  min_area = MIN_MASK_FRACTION * h * w
  for cls in classes:
    for attempt in range(40):
      target = rng.uniform(0.06, 0.12) * h * w * (0.98 ** attempt)
      got = _shape_window(cls, rng, max(target, 1.05 * min_area), fov & ~occupied)
      if got is None:
        continue
      win, rn, u, v = got
      inside = rn < 1
      if inside.sum() < min_area:
        continue
      if (occupied[win] & (rn < 1.15)).any() or ((rn < 1.1) & ~fov[win]).any():
        continue
      occupied[win] |= rn < 1.15
      placed.append((cls, win, rn, u, v))
      break
  return placed


# ---------------------------------------------------------------------------------------------
# Region prompts (always inside the structure)


def _region_prompt(mask, kind, rng):
  """A point square, a box or a free-form blob inside `mask` [H, W] bool -> [H, W] bool."""
  d = ndimage.distance_transform_cdt(np.pad(mask, 1), metric="chessboard")[1:-1, 1:-1]
  dmax = int(d.max())
  ys, xs = np.nonzero(d >= max(2, min(POINT_HALF_SIZE + 1, dmax // 2)))
  pick = int(rng.integers(len(ys)))
  py, px = int(ys[pick]), int(xs[pick])
  half = min(POINT_HALF_SIZE, int(d[py, px]) - 1)
  region = np.zeros_like(mask)
  if kind == "point":
    region[py - half:py + half + 1, px - half:px + half + 1] = True
    return region
  if kind == "box":
    # Start from the largest centred square, then stretch one way while the box stays inside.
    y0, y1, x0, x1 = py - half, py + half + 1, px - half, px + half + 1
    grow_x = rng.random() < 0.5
    for _ in range(int(rng.integers(0, 2 * half + 2))):
      ny0, ny1, nx0, nx1 = (y0, y1, x0 - 1, x1 + 1) if grow_x else (y0 - 1, y1 + 1, x0, x1)
      if min(ny0, nx0) < 0 or ny1 > mask.shape[0] or nx1 > mask.shape[1]:
        break
      if not mask[ny0:ny1, nx0:nx1].all():
        break
      y0, y1, x0, x1 = ny0, ny1, nx0, nx1
    region[y0:y1, x0:x1] = True
    return region
  # free-form: a wobbly blob around the point, clipped to the structure's interior
  radius = max(3.0, d[py, px] * rng.uniform(1.0, 2.0))
  yy, xx = np.ogrid[:mask.shape[0], :mask.shape[1]]
  phi = np.arctan2(yy - py, xx - px)
  boundary = radius * (1 + 0.3 * np.cos(2 * phi + rng.uniform(0, 6)) +
                       0.15 * np.cos(3 * phi + rng.uniform(0, 6)))
  region = (np.hypot(yy - py, xx - px) < boundary) & (d >= 2)
  region[py - 1:py + 2, px - 1:px + 2] = True       # keep the seed, so it is never empty
  return region


# ---------------------------------------------------------------------------------------------
# One image and its questions


def where_answer(centroid_xy, hw) -> str:
  """3x3 grid position of a centroid: "top left", ..., "center", ..., "bottom right"."""
  fx, fy = centroid_xy[0] / hw[1], centroid_xy[1] / hw[0]
  col = "left" if fx < 1 / 3 else ("right" if fx > 2 / 3 else "center")
  row = "top" if fy < 1 / 3 else ("bottom" if fy > 2 / 3 else "middle")
  return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def _near_grid_line(centroid_xy, hw, margin=0.03):
  f = (centroid_xy[0] / hw[1], centroid_xy[1] / hw[0])
  return any(abs(c - t) < margin for c in f for t in (1 / 3, 2 / 3))


def _image_size(rng):
  long_side = int(rng.integers(128, 321))
  aspect = float(np.exp(rng.uniform(math.log(0.6), math.log(1.6))))   # width / height
  if aspect >= 1:
    return max(96, int(round(long_side / aspect))), long_side
  return long_side, max(96, int(round(long_side * aspect)))


def _choose_classes(modality, rng):
  """1-3 distinct classes; a lesion is present in about half the images."""
  classes = STRUCTURES[modality]
  lesions = [c for c in classes if c.is_lesion]
  normal = [c for c in classes if not c.is_lesion]
  with_lesion = rng.random() < 0.5
  k = int(rng.integers(1, 4))
  pool_normal = k - 1 if with_lesion else min(k, len(normal))
  chosen = [normal[i] for i in rng.permutation(len(normal))[:pool_normal]]
  if with_lesion:
    chosen.append(lesions[int(rng.integers(len(lesions)))])
  return [chosen[i] for i in rng.permutation(len(chosen))]


def render_image(seed: int, index: int):
  """Draws image `index` of dataset `seed`: (modality, image [H, W, 3] uint8, structures)."""
  rng = np.random.default_rng([seed, index])
  modality = MODALITIES[index % len(MODALITIES)]
  h, w = _image_size(rng)
  style = STYLES[modality]
  img, fov = style.background(rng, h, w)
  classes, placed = _choose_classes(modality, rng), []
  while not placed:   # rare: nothing fitted; draw fresh outlines until one does
    placed = _place(classes, rng, fov, h, w)
  structures = []
  for cls, win, rn, u, v in placed:
    alpha = np.clip((1.0 - rn) / cls.edge + 0.5, 0, 1)[..., None]  # 0.5 on the mask boundary
    img[win] = img[win] * (1 - alpha) + cls.paint(rn, u, v, rng) * alpha
    mask = np.zeros((h, w), bool)
    mask[win] = rn < 1
    ys, xs = np.nonzero(mask)
    structures.append(Structure(cls, mask, int(mask.sum()), (float(xs.mean()), float(ys.mean()))))
  img = np.clip(np.rint(style.finish(img, fov, rng)), 0, 255).astype(np.uint8)
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  return modality, img, structures


def _turns(question, answer):
  return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


def _records(index, modality, hw, structures, paths, rng):
  """All question/answer records for one image; `paths` holds its relative file names."""
  out = []

  def add(kind, task, answer_type, question, answer, **extra):
    out.append({"id": f"{index:06d}_{len(out)}", "image": paths["image"],
                "conversations": _turns(question, answer), "answer_type": answer_type,
                "modality": modality, "task": task, "question_type": kind, **extra})

  def template(kind):
    options = QUESTIONS[kind]
    return options[int(rng.integers(len(options)))]

  names = [s.cls.name for s in structures]
  add("modality", "C", "CLOSED", template("modality"), MODALITY_ANSWER[modality])
  if rng.random() < 0.5:
    lesion = any(s.cls.is_lesion for s in structures)
    add("lesion", "C", "CLOSED", template("lesion"), "yes" if lesion else "no")
  else:
    vocab = [c.name for c in STRUCTURES[modality]]
    absent = [n for n in vocab if n not in names]
    present = not absent or rng.random() < 0.5
    name = (names if present else absent)[int(rng.integers(len(names if present else absent)))]
    add("presence", "C", "CLOSED", template("presence").format(name=name),
        "yes" if present else "no", structure=name)

  by_area = sorted(range(len(structures)), key=lambda j: -structures[j].area)
  distinct_largest = (len(structures) >= 2 and
                      structures[by_area[0]].area >= 1.25 * structures[by_area[1]].area)
  clear = [j for j, s in enumerate(structures) if not _near_grid_line(s.centroid_xy, hw)]
  if distinct_largest and (not clear or rng.random() < 0.5):
    j = by_area[0]
    add("largest", "C", "OPEN", template("largest"), names[j], structure=names[j],
        structure_mask=paths["masks"][j])
  else:
    pool = clear or list(range(len(structures)))
    j = pool[int(rng.integers(len(pool)))]
    add("where", "C", "OPEN", template("where").format(name=names[j]),
        where_answer(structures[j].centroid_xy, hw), structure=names[j],
        structure_mask=paths["masks"][j])

  for j, s in enumerate(structures):
    kind = paths["region_kinds"][j]
    add(kind, "R", "OPEN", template(kind).format(path=paths["regions"][j]), s.cls.name,
        structure=s.cls.name, structure_mask=paths["masks"][j], region_kind=kind)
  for j, s in enumerate(structures):
    lesion_phrase = s.cls.is_lesion and rng.random() < 0.5
    question = template("grounding_lesion" if lesion_phrase else "grounding").format(name=s.cls.name)
    add("grounding", "G", "OPEN", question,
        GROUNDING_ANSWER.format(name=s.cls.name, path=paths["masks"][j]), structure=s.cls.name)
  return out


def _save_png(array, path):
  Image.fromarray(array).save(path, format="PNG", **_PNG)


def _write_image(out_dir, seed, index):
  modality, img, structures = render_image(seed, index)
  # Question sampling has its own stream, so the pictures do not depend on the question mix.
  rng = np.random.default_rng([seed, index, 1])
  stem = f"{modality}_{index:06d}"
  paths = {"image": f"images/{stem}.png", "masks": [], "regions": [], "region_kinds": []}
  _save_png(img, os.path.join(out_dir, paths["image"]))
  for j, s in enumerate(structures):
    kind = REGION_KINDS[int(rng.integers(len(REGION_KINDS)))]
    region = _region_prompt(s.mask, kind, rng)
    paths["masks"].append(f"masks/{stem}_{j}.png")
    paths["regions"].append(f"regions/{stem}_{j}.png")
    paths["region_kinds"].append(kind)
    _save_png(s.mask.astype(np.uint8) * 255, os.path.join(out_dir, paths["masks"][-1]))
    _save_png(region.astype(np.uint8) * 255, os.path.join(out_dir, paths["regions"][-1]))
  return _records(index, modality, img.shape[:2], structures, paths, rng)


# ---------------------------------------------------------------------------------------------
# Public API


def write_synthetic(out_dir, n: int, seed: int,
                    splits=(("train", 0.8), ("val", 0.1), ("test", 0.1))) -> dict[str, str]:
  """Writes `n` synthetic images with their questions; returns {split: path of its JSON}.

  Files: out_dir/images/<modality>_<index>.png (RGB), out_dir/masks/<stem>_<j>.png and
  out_dir/regions/<stem>_<j>.png (binary 0/255, image-sized), out_dir/<split>.json (MeCoVQA
  list, paths relative to out_dir, which is the image root) and out_dir/meta.json. Images are
  split (not questions), so no test image is seen in training. Same (n, seed) -> same bytes.
  """
  if n < 1:
    raise ValueError(f"synthetic data: n must be >= 1, got {n}")
  names = [name for name, _ in splits]
  fractions = np.array([f for _, f in splits], np.float64)
  if len(set(names)) != len(names) or (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6:
    raise ValueError(f"synthetic data: splits must have distinct names and fractions summing to 1, "
                     f"got {splits}")
  for sub in ("images", "masks", "regions"):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  order = np.random.default_rng([seed, 2**31 - 1]).permutation(n)
  bounds = np.rint(np.cumsum(fractions) * n).astype(int)
  split_of = {}
  for name, lo, hi in zip(names, np.concatenate([[0], bounds[:-1]]), bounds):
    split_of.update({int(i): name for i in order[lo:hi]})

  per_split = {name: [] for name in names}
  for index in range(n):
    per_split[split_of[index]].extend(_write_image(out_dir, seed, index))

  json_paths = {}
  for name, records in per_split.items():
    json_paths[name] = os.path.join(out_dir, f"{name}.json")
    with open(json_paths[name], "w") as f:
      json.dump(records, f, indent=1)
  meta = {"generator": "medplib_jax.data.synth", "seed": seed, "n": n,
          "images_per_split": {k: sum(v == k for v in split_of.values()) for k in names},
          "records_per_split": {k: len(v) for k, v in per_split.items()},
          "structures": {m: [c.name for c in cs] for m, cs in STRUCTURES.items()},
          "lesions": {m: [c.name for c in cs if c.is_lesion] for m, cs in STRUCTURES.items()}}
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return json_paths


_PATH_IN_TAG = re.compile(r"<mask>.*?</mask>|(?<=<region>).*?(?=</region>)")


def synth_corpus_texts(json_paths) -> list[str]:
  """Every conversation turn's text, as the model will see it (mask paths removed, region paths
  removed but their tags kept), for training the tiny demo tokenizer."""
  texts = []
  for path in json_paths:
    with open(path) as f:
      for record in json.load(f):
        texts.extend(_PATH_IN_TAG.sub("", turn["value"]) for turn in record["conversations"])
  return texts


def _answer(record) -> str:
  return next(t["value"] for t in record["conversations"] if t["from"] == "gpt").strip().lower()


def chance_levels(json_path) -> dict:
  """Accuracies of answer-prior baselines on one split, to print beside the demo's results.

  closed_vqa: answer each closed question type (modality / lesion / presence) with its most
  frequent answer in this file (closed_vqa_by_type: per type); closed_vqa_modality_prior: the same per (type, modality), as a
  model that knows only the modality would; region_vqa / region_vqa_modality_prior: likewise for
  region questions; grounding_mdice_full_image: mean Dice of predicting the whole image.
  """
  with open(json_path) as f:
    records = json.load(f)

  def majority_accuracy(rows, key):
    groups = collections.defaultdict(collections.Counter)
    for r in rows:
      groups[key(r)][_answer(r)] += 1
    return (sum(max(c.values()) for c in groups.values()) / len(rows)) if rows else float("nan")

  closed = [r for r in records if r.get("answer_type") == "CLOSED"]
  region = [r for r in records if r.get("task") == "R"]
  grounding = [r for r in records if r.get("task") == "G"]
  root = os.path.dirname(os.path.abspath(json_path))
  dice = []
  for r in grounding:
    answer = next(t["value"] for t in r["conversations"] if t["from"] == "gpt")
    rel = re.search(r"<mask>(.*?)</mask>", answer).group(1)
    with Image.open(os.path.join(root, rel)) as m:
      fg = int((np.asarray(m) >= 1).sum())
      dice.append(2 * fg / (fg + m.size[0] * m.size[1]))
  return {
      "closed_vqa": majority_accuracy(closed, lambda r: r["question_type"]),
      "closed_vqa_by_type": {
          kind: majority_accuracy([r for r in closed if r["question_type"] == kind], lambda r: 0)
          for kind in sorted({r["question_type"] for r in closed})},
      "closed_vqa_modality_prior": majority_accuracy(
          closed, lambda r: (r["question_type"], r["modality"])),
      "region_vqa": majority_accuracy(region, lambda r: "region"),
      "region_vqa_modality_prior": majority_accuracy(region, lambda r: r["modality"]),
      "grounding_mdice_full_image": float(np.mean(dice)) if dice else float("nan"),
      "n_closed": len(closed), "n_region": len(region), "n_grounding": len(grounding),
  }
