"""Region encoder and pixel prompts: torch grid_sample / interpolate references and hand-worked values."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from configs.common import LOGICAL_AXIS_RULES
from medplib_jax.data.prompts import (PromptError, box_mask, point_mask, polygon_mask, prompt_mask,
                                      region_grid, region_grids, stroke_mask)
from medplib_jax.models.region import bilinear_sample, region_tokens, sample_mask_cells
from medplib_jax.sharding import make_mesh

torch.set_num_threads(1)


def test_bilinear_sample_matches_torch_grid_sample():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  grid = rng.uniform(-1.1, 1.1, size=(2, 40, 2)).astype(np.float32)  # some outside: zeros padding
  grid[:, :4] = [[-1, -1], [1, 1], [-1, 1], [1, -1]]  # exact corners
  ref = torch.nn.functional.grid_sample(
      torch.from_numpy(features.transpose(0, 3, 1, 2).copy()), torch.from_numpy(grid[:, :, None]),
      mode="bilinear", padding_mode="zeros", align_corners=True)
  ref = ref.numpy()[..., 0].transpose(0, 2, 1)
  ours = np.asarray(jax.jit(bilinear_sample)(features, grid))
  np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


# Hand-worked region tokens. Features on a 4x4 grid (as a 56 px canvas with 14 px patches):
# channel 0 = 10 * row + col (catches transposed axes), channel 1 = row^2 (bilinear != exact).
# MedPLIB reads cell (r, c) at pixel position (r, c) * (G - 1) / G = 0.75 * (r, c).
G, CLIP, D = 4, 56, 2
_rows, _cols = np.meshgrid(np.arange(G), np.arange(G), indexing="ij")
FEATURES = np.stack([10.0 * _rows + _cols, _rows ** 2.0], -1).astype(np.float32)


def _tokens(masks, max_points=512, key=0):
  grids = np.stack([region_grid(m, CLIP, G) for m in masks])[None]
  tokens, valid = region_tokens(jnp.asarray(FEATURES)[None], jnp.asarray(grids),
                                jax.random.key(key), max_points)
  return np.asarray(tokens[0]), np.asarray(valid[0]), grids[0]


def test_region_tokens_point_box_polygon_by_hand():
  point = point_mask((CLIP, CLIP), x=30, y=30, radius=3)  # pixels 27..33: only cell (2, 2) at 28
  box = box_mask((CLIP, CLIP), (0, 14, 41, 27))  # rows 14..27 -> row 1; cols 0..41 -> cols 0..2
  # Triangle x + y <= 41: cells (r, c) with 14 (r + c) <= 41 -> r + c <= 2, six cells.
  polygon = polygon_mask((CLIP, CLIP), [(0, 0), (41, 0), (0, 41)])
  tokens, valid, grids = _tokens([point, box, polygon])
  assert grids[0].sum() == 1 and grids[0][2, 2]
  np.testing.assert_array_equal(np.argwhere(grids[1]), [[1, 0], [1, 1], [1, 2]])
  np.testing.assert_array_equal(np.argwhere(grids[2]),
                                [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0]])
  expected = np.array([
      # point: (1.5, 1.5) -> 10*1.5 + 1.5; row^2 between rows 1 and 2 -> (1 + 4) / 2
      [16.5, 2.5],
      # box: row 0.75, cols 0, .75, 1.5 -> 7.5 + 0.75; row^2 at 0.75 -> 0.75
      [8.25, 0.75],
      # polygon: mean row = mean col = 0.75 * 4/6 -> 11 * 0.5; row^2 at 0, 0, 0, .75, .75, 1.5
      [5.5, (0.75 + 0.75 + 2.5) / 6],
  ], np.float32)
  np.testing.assert_allclose(tokens, expected, atol=1e-5)
  assert valid.all()


def test_region_grid_resize_and_centred_pad():
  """A 28x56 image fills rows 14..41 of the 56 canvas -> patch rows 1 and 2."""
  full = box_mask((28, 56), (0, 0, 55, 27))
  grid = region_grid(full, CLIP, G)
  np.testing.assert_array_equal(grid, np.isin(np.arange(G), [1, 2])[:, None] & np.ones(G, bool))


def test_region_grid_downsampling_matches_torch_nearest():
  mask = np.random.default_rng(0).random((336, 336)) > 0.7
  ref = torch.nn.functional.interpolate(torch.from_numpy(mask[None, None].astype(np.float32)),
                                        size=(24, 24), mode="nearest")[0, 0].numpy() > 0
  np.testing.assert_array_equal(region_grid(mask, 336, 24), ref)


def test_empty_region_gives_zero_token_and_invalid():
  masks = np.zeros((1, 2, G, G), bool)
  masks[0, 1, 3, 3] = True
  tokens, valid = region_tokens(jnp.asarray(FEATURES)[None], jnp.asarray(masks), jax.random.key(0), 8)
  assert np.isfinite(np.asarray(tokens)).all()
  np.testing.assert_array_equal(np.asarray(tokens[0, 0]), 0.0)
  np.testing.assert_array_equal(np.asarray(valid), [[False, True]])
  # Gradients through an empty region are finite too.
  grad = jax.grad(lambda f: region_tokens(f, jnp.asarray(masks), jax.random.key(0), 8)[0].sum())(
      jnp.asarray(FEATURES)[None])
  assert np.isfinite(np.asarray(grad)).all()


def test_subsampling_draws_distinct_mask_cells():
  masks = np.zeros((1, 1, G, G), bool)
  cells = [(0, 1), (1, 3), (2, 0), (2, 2), (3, 1), (3, 3)]
  for r, c in cells:
    masks[0, 0, r, c] = True
  grid, valid = sample_mask_cells(jnp.asarray(masks), jax.random.key(3), 4)
  assert grid.shape == (1, 1, 4, 2) and np.asarray(valid).all()
  drawn = {(int(round((y + 1) / 2 * G)), int(round((x + 1) / 2 * G))) for x, y in np.asarray(grid[0, 0])}
  assert len(drawn) == 4 and drawn <= set(cells)
  # The token is the mean over exactly the drawn cells.
  tokens, _ = region_tokens(jnp.asarray(FEATURES)[None], jnp.asarray(masks), jax.random.key(3), 4)
  pos = [(0.75 * r, 0.75 * c) for r, c in drawn]
  expected = [np.mean([10 * r + c for r, c in pos]),
              np.mean([np.floor(r) ** 2 * (1 - r % 1) + np.ceil(r) ** 2 * (r % 1) for r, _ in pos])]
  np.testing.assert_allclose(np.asarray(tokens[0, 0]), expected, atol=1e-5)
  # Fewer cells than max_points: all are kept, the rest invalid.
  _, valid = sample_mask_cells(jnp.asarray(masks), jax.random.key(3), 10)
  assert int(np.asarray(valid).sum()) == len(cells)


def test_region_tokens_sharded_equals_unsharded():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(8, 6, 6, 16)).astype(np.float32)
  masks = rng.random((8, 2, 6, 6)) > 0.5
  masks[3, 1] = False
  fn = jax.jit(lambda f, m, k: region_tokens(f, m, k, max_points=10))
  key = jax.random.key(7)
  expected = jax.tree.map(np.asarray, fn(features, masks, key))
  mesh = make_mesh({"data": -1})
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    shard = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"))))
    tokens, valid = fn(shard(features), shard(masks), key)
    assert len(tokens.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(tokens), expected[0], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(valid), expected[1])


def test_point_square_is_clipped_at_the_border():
  m = point_mask((100, 80), x=5, y=90)
  rows, cols = np.nonzero(m)
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (70, 99, 0, 25)


def test_stroke_png_and_array(tmp_path):
  mask = np.zeros((30, 40), bool)
  mask[5:9, 10:30] = True
  path = str(tmp_path / "stroke.png")
  Image.fromarray(mask.astype(np.uint8) * 255).save(path)
  np.testing.assert_array_equal(stroke_mask(path, (30, 40)), mask)
  rgba = np.zeros((30, 40, 4), np.uint8)
  rgba[mask] = (255, 0, 0, 255)
  Image.fromarray(rgba).save(tmp_path / "rgba.png")
  np.testing.assert_array_equal(stroke_mask(str(tmp_path / "rgba.png"), (30, 40)), mask)
  np.testing.assert_array_equal(prompt_mask((30, 40), {"stroke": mask.astype(np.uint8)}), mask)


@pytest.mark.parametrize("make, match", [
    (lambda: point_mask((50, 60), 60, 10), r"point prompt \(x=60, y=10\)"),
    (lambda: box_mask((50, 60), (10, 20, 5, 30)), r"box prompt \(10, 20, 5, 30\) is degenerate"),
    (lambda: box_mask((50, 60), (10, 20, 15, 50)), r"box prompt \(10, 20, 15, 50\) reaches outside"),
    (lambda: polygon_mask((50, 60), [(1, 1), (5, 5)]), r"polygon prompt .* at least 3"),
    (lambda: polygon_mask((50, 60), [(1, 1), (5, 5), (9, 9)]), r"polygon prompt .*degenerate \(zero area\)"),
    (lambda: polygon_mask((50, 60), [(1, 1), (70, 5), (9, 20)]), r"polygon prompt .* outside"),
    (lambda: stroke_mask(np.zeros((50, 60)), (50, 60)), r"stroke prompt array\(50, 60\) is empty"),
    (lambda: stroke_mask(np.ones((40, 60)), (50, 60)), r"stroke prompt .* 60x40 .* 60x50"),
    (lambda: prompt_mask((50, 60), {"scribble": 1}), r"prompt kind 'scribble'"),
    (lambda: region_grids([np.ones((4, 4))] * 2, 56, 4, 1), r"2 region prompts"),
])
def test_bad_prompts_are_named(make, match):
  with pytest.raises(PromptError, match=match):
    make()
