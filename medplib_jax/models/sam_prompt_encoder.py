"""SAM prompt encoder: random-Fourier positions, point / box / dense-mask prompts, extra sparse tokens.

Matches segment_anything's `PromptEncoder` (and MedPLIB's variant, which appends the `<SEG>`
projection to the sparse tokens). Point labels: 1 foreground, 0 background, -1 padding / "not a
point". Coordinates are canvas pixels (x, y); the +0.5 pixel-centre shift is applied here.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from medplib_jax.models.sam_layers import layer_norm, partitioned

MASK_LN_EPS = 1e-6


class MaskDownscaling(nn.Module):
  """Dense mask prompt [N, 4h, 4w] -> [N, h, w, C]: two stride-2 convs with LN2d + GELU, then 1x1."""
  mask_in_chans: int
  embed_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, masks):
    conv_init = partitioned(nn.initializers.lecun_normal(), (None, None, None, None))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_init)
    x = masks[..., None].astype(self.dtype)
    x = nn.Conv(self.mask_in_chans // 4, (2, 2), strides=(2, 2), padding="VALID", name="conv1", **kw)(x)
    x = nn.gelu(layer_norm(MASK_LN_EPS, "norm1", self.dtype, self.param_dtype)(x), approximate=False)
    x = nn.Conv(self.mask_in_chans, (2, 2), strides=(2, 2), padding="VALID", name="conv2", **kw)(x)
    x = nn.gelu(layer_norm(MASK_LN_EPS, "norm2", self.dtype, self.param_dtype)(x), approximate=False)
    return nn.Conv(self.embed_dim, (1, 1), name="conv3", **kw)(x)


class PromptEncoder(nn.Module):
  """Embeds prompts for N masks at once. Params: pe_gaussian [2, C/2], point_embeddings [4, C]
  (negative, positive, box top-left, box bottom-right), not_a_point_embed [C], no_mask_embed [C]."""
  config: object
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    c = cfg.prompt_embed_dim
    emb_init = partitioned(nn.initializers.normal(1.0), (None, "embed"))
    # A frozen buffer in the reference (scale 1.0); a param here so checkpoints carry it.
    self.pe_gaussian = self.param("pe_gaussian", emb_init, (2, c // 2), self.param_dtype)
    self.point_embeddings = self.param("point_embeddings", emb_init, (4, c), self.param_dtype)
    self.not_a_point_embed = self.param("not_a_point_embed",
                                        partitioned(nn.initializers.normal(1.0), ("embed",)), (c,),
                                        self.param_dtype)
    self.no_mask_embed = self.param("no_mask_embed",
                                    partitioned(nn.initializers.normal(1.0), ("embed",)), (c,),
                                    self.param_dtype)
    self.mask_downscaling = MaskDownscaling(cfg.mask_in_chans, c, self.dtype,
                                            self.param_dtype)

  @property
  def grid(self) -> int:
    return self.config.image_size // self.config.patch_size

  def _fourier(self, unit_xy):
    """Positions in [0, 1]^2, [..., 2] (x, y) -> [..., C]: sin/cos of 2*pi*(2p-1) @ G."""
    proj = (2.0 * unit_xy.astype(jnp.float32) - 1.0) @ self.pe_gaussian.astype(jnp.float32)
    proj = 2.0 * math.pi * proj
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)

  def dense_pe(self):
    """Positional encoding of the image-embedding grid, [h, w, C] (pixel centres)."""
    centres = (jnp.arange(self.grid, dtype=jnp.float32) + 0.5) / self.grid
    xy = jnp.stack(jnp.meshgrid(centres, centres, indexing="xy"), axis=-1)  # [h, w, (x, y)]
    return self._fourier(xy).astype(self.dtype)

  def embed_points(self, coords, labels, pad: bool):
    """coords [N, P, 2] canvas px, labels [N, P] -> [N, P(+1), C]; pad appends a (0,0) label -1 point."""
    coords = coords.astype(jnp.float32) + 0.5
    labels = labels.astype(jnp.int32)
    if pad:
      coords = jnp.concatenate([coords, jnp.zeros_like(coords[:, :1])], axis=1)
      labels = jnp.concatenate([labels, -jnp.ones_like(labels[:, :1])], axis=1)
    emb = self._fourier(coords / self.config.image_size)
    lab = labels[..., None]
    emb = jnp.where(lab == -1, self.not_a_point_embed, emb)
    emb = emb + jnp.where(lab == 0, self.point_embeddings[0], 0.0)
    emb = emb + jnp.where(lab == 1, self.point_embeddings[1], 0.0)
    return emb

  def embed_boxes(self, boxes):
    """boxes [N, 4] (x0, y0, x1, y1) canvas px -> two corner tokens [N, 2, C]."""
    corners = (boxes.astype(jnp.float32) + 0.5).reshape(-1, 2, 2)
    emb = self._fourier(corners / self.config.image_size)
    return emb + self.point_embeddings[2:4]

  def __call__(self, num_prompts: int, points=None, boxes=None, mask_inputs=None,
               extra_sparse=None):
    """-> (sparse [N, T, C], dense [N, h, w, C]); sparse = points, box corners, extra tokens."""
    c = self.config.prompt_embed_dim
    sparse = [jnp.zeros((num_prompts, 0, c), jnp.float32)]
    if points is not None:
      coords, labels = points
      sparse.append(self.embed_points(coords, labels, pad=boxes is None))
    if boxes is not None:
      sparse.append(self.embed_boxes(boxes))
    if extra_sparse is not None:
      sparse.append(extra_sparse.astype(jnp.float32))
    sparse = jnp.concatenate(sparse, axis=1).astype(self.dtype)
    if mask_inputs is not None:
      dense = self.mask_downscaling(mask_inputs)
    else:
      dense = jnp.broadcast_to(self.no_mask_embed.astype(self.dtype),
                               (num_prompts, self.grid, self.grid, c))
    return sparse, dense
