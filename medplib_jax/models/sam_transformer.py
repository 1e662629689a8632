"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Matches segment_anything's `TwoWayTransformer` (all LayerNorms eps 1e-5; the first block's
self-attention skips the query positional embedding and *replaces* the tokens rather than adding).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from medplib_jax.models.sam_layers import MLPBlock, dense, layer_norm

DECODER_LN_EPS = 1e-5


class DecoderAttention(nn.Module):
  """Attention with q/k/v projected down to width / downsample_rate, then back out."""
  num_heads: int
  downsample_rate: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, q, k, v):  # q [N, Lq, C], k/v [N, Lk, C] -> [N, Lq, C]
    width = q.shape[-1]
    inner = width // self.downsample_rate
    if inner % self.num_heads:
      raise ValueError(f"{self.num_heads} heads do not divide the attention width {inner}")
    head_dim = inner // self.num_heads

    def project(x, name):
      y = dense(inner, ("embed", "heads"), name, self.dtype, self.param_dtype)(x)
      return y.reshape(y.shape[:-1] + (self.num_heads, head_dim))

    qh, kh, vh = project(q, "q_proj"), project(k, "k_proj"), project(v, "v_proj")
    logits = jnp.einsum("bqnd,bknd->bnqk", qh, kh) * head_dim**-0.5
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bnqk,bknd->bqnd", probs, vh).reshape(q.shape[:-1] + (inner,))
    return dense(width, ("heads", "embed"), "out_proj", self.dtype, self.param_dtype)(out)


class TwoWayBlock(nn.Module):
  """Self-attn (tokens), cross-attn tokens->image, MLP (tokens), cross-attn image->tokens."""
  num_heads: int
  mlp_dim: int
  skip_first_layer_pe: bool
  downsample_rate: int = 2
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: layer_norm(DECODER_LN_EPS, name, self.dtype, self.param_dtype)
    self_attn = DecoderAttention(self.num_heads, 1, name="self_attn", **kw)
    if self.skip_first_layer_pe:
      queries = self_attn(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + self_attn(q, q, queries)
    queries = norm("norm1")(queries)

    q, k = queries + query_pe, keys + key_pe
    queries = norm("norm2")(queries + DecoderAttention(
        self.num_heads, self.downsample_rate, name="cross_attn_token_to_image", **kw)(q, k, keys))
    queries = norm("norm3")(queries + MLPBlock(self.mlp_dim, "relu", name="mlp", **kw)(queries))

    q, k = queries + query_pe, keys + key_pe
    keys = norm("norm4")(keys + DecoderAttention(
        self.num_heads, self.downsample_rate, name="cross_attn_image_to_token", **kw)(k, q, queries))
    return queries, keys


class TwoWayTransformer(nn.Module):
  """tokens [N, T, C], image [N, hw, C], image_pe [N or 1, hw, C] -> (tokens, image) updated."""
  depth: int
  num_heads: int
  mlp_dim: int
  downsample_rate: int = 2
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, image, image_pe):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    queries, keys = tokens, image
    for i in range(self.depth):
      queries, keys = TwoWayBlock(self.num_heads, self.mlp_dim, skip_first_layer_pe=i == 0,
                                  downsample_rate=self.downsample_rate, name=f"layers_{i}",
                                  **kw)(queries, keys, tokens, image_pe)
      queries = nn.with_logical_constraint(queries, ("batch", None, "act_embed"))
      keys = nn.with_logical_constraint(keys, ("batch", None, "act_embed"))
    q, k = queries + tokens, keys + image_pe
    queries = queries + DecoderAttention(self.num_heads, self.downsample_rate,
                                         name="final_attn_token_to_image", **kw)(q, k, keys)
    return layer_norm(DECODER_LN_EPS, "norm_final_attn", self.dtype, self.param_dtype)(queries), keys
