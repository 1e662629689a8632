"""Region encoder: one feature token per region mask, sampled from the CLIP patch-feature map.

MedPLIB (`extract_region_feature`) takes up to `max_points` nonzero cells of the region mask on
the patch grid, normalises their (row, col) by the grid size to [0, 1), samples the
`region_fea_adapter` features there with `grid_sample(align_corners=True)` and averages them.
The normalisation by G (not G - 1) means cell (r, c) is read at (r, c) * (G - 1) / G, i.e.
slightly towards the top-left; that is the reference numerics and is kept.

Bilinear sampling is written as separable "hat" weights, w(t) = max(0, 1 - |t - i|) per axis:
exactly torch's bilinear weights with zero padding, and dense (no gathers), so the mean over
sampled points folds into one [G, G] weight map per region and one einsum with the features.
Everything has static shapes: points are a fixed-size top-k draw plus a validity mask.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def _hat_weights(pos, size):
  """Bilinear weights of fractional pixel positions [...] onto cells 0..size-1 -> [..., size]."""
  cells = jnp.arange(size, dtype=pos.dtype)
  return jnp.maximum(0.0, 1.0 - jnp.abs(pos[..., None] - cells))


def _unnormalise(grid, size):
  """grid_sample align_corners=True: -1 -> pixel 0, +1 -> pixel size - 1."""
  return (grid + 1.0) * 0.5 * (size - 1)


def bilinear_sample(features, grid):
  """`torch.nn.functional.grid_sample(align_corners=True, padding_mode='zeros')` at points.

  features [B, H, W, D]; grid [B, P, 2] as (x, y) in [-1, 1] (outside reads zeros) -> [B, P, D].
  """
  _, h, w, _ = features.shape
  wy = _hat_weights(_unnormalise(grid[..., 1], h), h)  # [B, P, H]
  wx = _hat_weights(_unnormalise(grid[..., 0], w), w)  # [B, P, W]
  return jnp.einsum("bph,bpw,bhwd->bpd", wy, wx, features.astype(jnp.float32))


def sample_mask_cells(region_masks, key, max_points):
  """Draws up to `max_points` nonzero cells of each mask uniformly without replacement.

  region_masks [B, R, H, W] bool -> (grid [B, R, P, 2] as (x, y) in grid_sample coordinates,
  valid [B, R, P] bool), P = min(max_points, H * W). A mask with at most P cells keeps all of
  them (as the reference `rand_sample`); padding points are invalid and sit at (-1, -1).
  """
  b, r, h, w = region_masks.shape
  num_points = min(max_points, h * w)
  flat = region_masks.reshape(b, r, h * w)
  # Random scores in [0, 1) for set cells, -1 for unset: top-k picks a uniform random subset.
  scores = jnp.where(flat, jax.random.uniform(key, flat.shape), -1.0)
  top, index = jax.lax.top_k(scores, num_points)
  valid = top >= 0.0
  rows = (index // w).astype(jnp.float32)
  cols = (index % w).astype(jnp.float32)
  # Reference coordinates: nonzero index / mask size in [0, 1), then 2p - 1.
  grid = jnp.stack([2.0 * cols / w - 1.0, 2.0 * rows / h - 1.0], axis=-1)
  grid = jnp.where(valid[..., None], grid, -1.0)
  return grid, valid


def region_weights(grid, valid, h, w):
  """Mean-over-valid-points bilinear weight map per region.

  grid [B, R, P, 2], valid [B, R, P] -> (weights [B, R, H, W] summing to 1 over the grid for a
  non-empty region and to 0 for an empty one, count [B, R] of valid points).
  """
  wy = _hat_weights(_unnormalise(grid[..., 1], h), h) * valid[..., None]  # [B, R, P, H]
  wx = _hat_weights(_unnormalise(grid[..., 0], w), w)  # [B, R, P, W]
  count = valid.sum(-1)
  weights = jnp.einsum("brph,brpw->brhw", wy, wx) / jnp.maximum(count, 1)[..., None, None]
  return weights, count


def region_tokens(features, region_masks, key, max_points=512):
  """One token per region: mean of bilinear samples at up to `max_points` mask cells.

  features [B, G, G, D] (the region-adapter output on the patch grid); region_masks [B, R, G, G]
  bool; key: PRNG key for the cell draw -> (tokens [B, R, D] in features.dtype, valid [B, R]).
  An empty mask gives a zero token and valid=False.
  """
  b, h, w, _ = features.shape
  if region_masks.shape[0] != b or region_masks.shape[2:] != (h, w):
    raise ValueError(f"region masks {region_masks.shape} do not fit features {features.shape}: "
                     "expected [B, R, G, G] on the feature grid")
  grid, valid = sample_mask_cells(region_masks, key, max_points)
  weights, count = region_weights(grid, valid, h, w)
  # grid_sample runs in float32 in the reference (bf16 unsupported there); so do we.
  tokens = jnp.einsum("brhw,bhwd->brd", weights, features.astype(jnp.float32))
  tokens = nn.with_logical_constraint(tokens.astype(features.dtype), ("batch", None, "act_embed"))
  return tokens, count > 0
