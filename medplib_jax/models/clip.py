"""CLIP vision transformer (the LLaVA/MedPLIB image encoder), with HF `CLIPVisionModel` numerics.

patch conv (no bias) -> [CLS; patches] + learned positions -> pre_layrnorm -> encoder layers
(LN -> MHA with biases -> residual; LN -> MLP with quick-GELU -> residual). LLaVA reads the
hidden state of one layer (`select_layer`, -2 = output of the second-to-last layer) and drops
CLS, so only the layers up to that one are built and run: with depth 24 and select_layer -2 the
tower holds 23 layers. `post_layernorm` of HF CLIP is never used by LLaVA and is not built.

Parameter names follow HF (`patch_embedding`, `class_embedding`, `position_embedding`,
`pre_layrnorm`, `layers/{layer_norm1, self_attn/{q,k,v,out}_proj, layer_norm2, mlp/{fc1, fc2}}`),
the layers stacked on a leading `layers` axis by `nn.scan`, so weight import is checkable name by
name (see `medplib_jax.checkpoint.clip`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_ACT = ("batch", "length", "act_embed")


def num_computed_layers(depth: int, select_layer: int) -> int:
  """How many encoder layers produce HF `hidden_states[select_layer]` (index 0 = embeddings)."""
  index = select_layer if select_layer >= 0 else depth + 1 + select_layer
  if not 0 <= index <= depth:
    raise ValueError(f"vision select_layer={select_layer} is out of range for depth {depth}")
  return index


def num_image_tokens(config) -> int:
  """Patch features the tower returns per image (CLS dropped): (image_size / patch_size) ** 2.

  The data package cannot import models: the sample builder makes as many image slots from the
  same geometry (data/batch.py `patch_grid`), and models/medplib.py checks the two agree.
  """
  return (config.image_size // config.patch_size) ** 2


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def _dense(features, names, dtype, param_dtype, name):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[-1:]))


def _layer_norm(eps, dtype, param_dtype, name):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


class ClipAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v/out projections. [B, L, D] -> [B, L, D]."""
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, length, width = x.shape
    head_dim = width // self.num_heads

    def heads(name):
      y = _dense(width, ("embed", "heads"), self.dtype, self.param_dtype, name)(x)
      y = y.reshape(b, length, self.num_heads, head_dim)
      return nn.with_logical_constraint(y, ("batch", "length", "act_heads", "act_kv"))

    q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
    # Softmax in float32 as HF does, whatever the compute dtype.
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, width)
    return _dense(width, ("heads", "embed"), self.dtype, self.param_dtype, "out_proj")(out)


class ClipMlp(nn.Module):
  """fc1 -> quick-GELU -> fc2. [B, L, D] -> [B, L, D]."""
  mlp_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = quick_gelu(_dense(self.mlp_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "fc1")(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
    return _dense(width, ("mlp", "embed"), self.dtype, self.param_dtype, "fc2")(h)


class ClipEncoderLayer(nn.Module):
  """One pre-LN transformer block; written as a scan body: (x, None) -> (x, None)."""
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, _):
    ln = lambda name: _layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name)
    x = x + ClipAttention(self.num_heads, self.dtype, self.param_dtype, name="self_attn")(
        ln("layer_norm1")(x))
    x = x + ClipMlp(self.mlp_dim, self.dtype, self.param_dtype, name="mlp")(ln("layer_norm2")(x))
    return nn.with_logical_constraint(x, _ACT), None


class ClipVisionTower(nn.Module):
  """CLIP ViT features for LLaVA: images [B, S, S, 3] (CLIP-normalised, NHWC) -> [B, G*G, width].

  `config` needs image_size, patch_size, width, depth, num_heads, mlp_dim, layer_norm_eps,
  select_layer (configs/common.py `vision_config`). G = image_size // patch_size.
  """
  config: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    c = self.config
    b = images.shape[0]
    if images.shape[1:] != (c.image_size, c.image_size, 3):
      raise ValueError(f"vision tower expects images [B, {c.image_size}, {c.image_size}, 3], "
                       f"got {images.shape}")
    n = num_image_tokens(c)
    patches = nn.Conv(
        c.width, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
        padding="VALID", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 (None, None, None, "embed")),
        name="patch_embedding")(images.astype(self.dtype))
    patches = patches.reshape(b, n, c.width)
    class_embedding = self.param(
        "class_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",)),
        (c.width,), self.param_dtype)
    position_embedding = self.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        (n + 1, c.width), self.param_dtype)
    cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (b, 1, c.width))
    x = jnp.concatenate([cls, patches], axis=1) + position_embedding.astype(self.dtype)
    x = nn.with_logical_constraint(x, _ACT)
    x = _layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "pre_layrnorm")(x)

    n_layers = num_computed_layers(c.depth, c.select_layer)
    if n_layers:
      layers = nn.scan(
          ClipEncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
          length=n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = layers(c.num_heads, c.mlp_dim, c.layer_norm_eps, self.dtype, self.param_dtype,
                    name="layers")(x, None)
    return nn.with_logical_constraint(x[:, 1:], _ACT)
