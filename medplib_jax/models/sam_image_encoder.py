"""SAM / SAM-Med2D image encoder: a ViT with windowed + global attention, adapters, and a conv neck.

Numerics follow segment_anything's `ImageEncoderViT` (and SAM-Med2D's adapter variant):
block = x + attn(norm1 x), then x + mlp(norm2 x) [+ adapter(norm2 x)]; windowed blocks pad the
token grid with zeros to a multiple of the window *after* norm1 and attend over the padded window
without masking (as the reference does). Blocks are grouped by their repeating pattern
(windowed, ..., windowed, global) and the groups are scanned, so stacked block parameters carry a
leading `layers` axis of length `num_groups`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medplib_jax.models.sam_layers import ConvTranspose, MLPBlock, dense, layer_norm, partitioned

ENCODER_LN_EPS = 1e-6  # ViT norms and the neck's LayerNorm2d
ADAPTER_LN_EPS = 1e-5  # SAM-Med2D's Adapter_Layer uses a default nn.LayerNorm


def block_pattern(config) -> tuple[int, int]:
  """(period, num_groups): block i = group i // period, position i % period.

  Scanning needs every group to look the same: each period ends in its one global-attention
  block (SAM ViT-B/L/H and SAM-Med2D all have this shape). Otherwise one group holds every block.
  """
  depth, glob = config.depth, tuple(config.global_attn_indexes)
  if not glob or not config.window_size:
    return 1, depth  # all blocks alike
  if depth % len(glob) == 0:
    period = depth // len(glob)
    if glob == tuple(range(period - 1, depth, period)):
      return period, len(glob)
  return depth, 1


def block_window(config, position: int) -> int:
  """Window size of the block at `position` inside a group (0 = global attention)."""
  return 0 if position in tuple(config.global_attn_indexes) else config.window_size


def _relative_index(size: int) -> np.ndarray:
  """[size, size] index into a (2*size-1)-row table: q - k + size - 1 (equal q and k sizes)."""
  coords = np.arange(size)
  return coords[:, None] - coords[None, :] + size - 1


class EncoderAttention(nn.Module):
  """Multi-head self-attention over a [B, H, W, C] grid with decomposed relative positions."""
  num_heads: int
  input_size: int  # side of the grid this attention sees (window, or the whole token grid)
  use_rel_pos: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, H, W, C]
    b, h, w, c = x.shape
    head_dim = c // self.num_heads
    qkv = dense(3 * c, ("embed", "heads"), "qkv", self.dtype, self.param_dtype)(x)
    qkv = qkv.reshape(b, h * w, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, nH, hd]
    logits = jnp.einsum("bqnd,bknd->bnqk", q * head_dim**-0.5, k)
    if self.use_rel_pos:
      if (h, w) != (self.input_size, self.input_size):
        raise ValueError(f"relative positions were sized for a {self.input_size}x{self.input_size} "
                         f"grid but the attention sees {h}x{w}")
      table = (2 * self.input_size - 1, head_dim)
      rel_pos_h = self.param("rel_pos_h", partitioned(nn.initializers.zeros, (None, "kv")), table,
                             self.param_dtype).astype(self.dtype)
      rel_pos_w = self.param("rel_pos_w", partitioned(nn.initializers.zeros, (None, "kv")), table,
                             self.param_dtype).astype(self.dtype)
      rel_h_table = rel_pos_h[_relative_index(h)]  # [H, Hk, hd]
      rel_w_table = rel_pos_w[_relative_index(w)]  # [W, Wk, hd]
      q_grid = q.reshape(b, h, w, self.num_heads, head_dim)  # unscaled q, as the reference
      rel_h = jnp.einsum("bhwnc,hkc->bnhwk", q_grid, rel_h_table)
      rel_w = jnp.einsum("bhwnc,wkc->bnhwk", q_grid, rel_w_table)
      logits = logits.reshape(b, self.num_heads, h, w, h, w)
      logits = logits + rel_h[..., :, None] + rel_w[..., None, :]
      logits = logits.reshape(b, self.num_heads, h * w, h * w)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, h, w, c)
    return dense(c, ("heads", "embed"), "proj", self.dtype, self.param_dtype)(out)


def window_partition(x, window: int):
  """[B, H, W, C] -> ([B * nWin, window, window, C], (Hp, Wp)), zero-padding H, W up to the window."""
  b, h, w, c = x.shape
  pad_h, pad_w = (-h) % window, (-w) % window
  x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  hp, wp = h + pad_h, w + pad_w
  x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows, window: int, padded_hw, hw):
  """Inverse of `window_partition`, dropping the padding: -> [B, H, W, C]."""
  hp, wp = padded_hw
  c = windows.shape[-1]
  b = windows.shape[0] // ((hp // window) * (wp // window))
  x = windows.reshape(b, hp // window, wp // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hp, wp, c)[:, :hw[0], :hw[1]]


class Adapter(nn.Module):
  """SAM-Med2D `Adapter_Layer`: channel gate, then a stride-2 conv / transposed-conv pair, skip, LN.

  gate = sigmoid(W2 relu(W1 avgpool(x))); s = relu(convT4x4s2(relu(conv3x3s2(gate * x))));
  out = LayerNorm(x + s). No biases anywhere but the LayerNorm.
  """
  hidden_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, H, W, C]
    c = x.shape[-1]
    pooled = x.mean(axis=(1, 2))  # [B, C]
    gate = dense(self.hidden_dim, ("embed", "mlp"), "channel_down", self.dtype, self.param_dtype,
                 use_bias=False)(pooled)
    gate = dense(c, ("mlp", "embed"), "channel_up", self.dtype, self.param_dtype,
                 use_bias=False)(nn.relu(gate))
    gated = x * nn.sigmoid(gate)[:, None, None, :]
    spatial = nn.Conv(c, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="spatial_down",
                      kernel_init=partitioned(nn.initializers.lecun_normal(),
                                              (None, None, None, None)))(gated)
    spatial = ConvTranspose(c, 4, 2, padding=1, use_bias=False, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="spatial_up")(nn.relu(spatial))
    return layer_norm(ADAPTER_LN_EPS, "norm", self.dtype, self.param_dtype)(x + nn.relu(spatial))


class EncoderBlock(nn.Module):
  """One ViT block (windowed when `window` > 0, global otherwise), with the optional adapter."""
  config: object
  window: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, H, W, C]
    cfg = self.config
    grid = cfg.image_size // cfg.patch_size
    h, w = x.shape[1:3]
    y = layer_norm(ENCODER_LN_EPS, "norm1", self.dtype, self.param_dtype)(x)
    if self.window:
      y, padded_hw = window_partition(y, self.window)
    y = EncoderAttention(cfg.num_heads, self.window or grid, cfg.use_rel_pos, self.dtype,
                         self.param_dtype, name="attn")(y)
    if self.window:
      y = window_unpartition(y, self.window, padded_hw, (h, w))
    x = x + y
    y = layer_norm(ENCODER_LN_EPS, "norm2", self.dtype, self.param_dtype)(x)
    out = x + MLPBlock(cfg.mlp_dim, "gelu", self.dtype, self.param_dtype, name="mlp")(y)
    if cfg.adapter:
      out = out + Adapter(cfg.adapter_dim, self.dtype, self.param_dtype, name="adapter")(y)
    return nn.with_logical_constraint(out, ("batch", None, None, "act_embed"))


class BlockGroup(nn.Module):
  """`period` consecutive blocks; the scanned unit (carry = the token grid)."""
  config: object
  period: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, _):
    for j in range(self.period):
      x = EncoderBlock(self.config, block_window(self.config, j), self.dtype, self.param_dtype,
                       name=f"block_{j}")(x)
    return x, None


class Neck(nn.Module):
  """Conv1x1 -> LayerNorm2d -> Conv3x3 -> LayerNorm2d, no conv biases: [B,h,w,width] -> [B,h,w,out]."""
  out_chans: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv_init = partitioned(nn.initializers.lecun_normal(), (None, None, "embed", None))
    x = nn.Conv(self.out_chans, (1, 1), use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=conv_init, name="conv1")(x)
    x = layer_norm(ENCODER_LN_EPS, "norm1", self.dtype, self.param_dtype)(x)
    x = nn.Conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=conv_init, name="conv2")(x)
    return layer_norm(ENCODER_LN_EPS, "norm2", self.dtype, self.param_dtype)(x)


class ImageEncoder(nn.Module):
  """SAM-normalised images [B, S, S, 3] (NHWC) -> image embeddings [B, S/16, S/16, out_chans]."""
  config: object
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    cfg = self.config
    if images.shape[1:3] != (cfg.image_size, cfg.image_size):
      raise ValueError(f"SAM image encoder expects {cfg.image_size}x{cfg.image_size} images, "
                       f"got {images.shape[1]}x{images.shape[2]}")
    p, grid = cfg.patch_size, cfg.image_size // cfg.patch_size
    x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="patch_embed",
                kernel_init=partitioned(nn.initializers.lecun_normal(),
                                        (None, None, None, "embed")))(images.astype(self.dtype))
    pos_embed = self.param("pos_embed", partitioned(nn.initializers.zeros,
                                                    (None, None, None, "embed")),
                           (1, grid, grid, cfg.width), self.param_dtype)
    x = nn.with_logical_constraint(x + pos_embed.astype(self.dtype),
                                   ("batch", None, None, "act_embed"))
    period, num_groups = block_pattern(cfg)
    groups = nn.scan(BlockGroup, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=num_groups, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = groups(cfg, period, self.dtype, self.param_dtype, name="blocks")(x, None)
    return Neck(cfg.out_chans, self.dtype, self.param_dtype, name="neck")(x)
