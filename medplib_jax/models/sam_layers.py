"""Small layers shared by the SAM-Med2D networks: torch-compatible transposed conv, MLPs, init helpers.

Kept apart so the image encoder, prompt encoder and mask decoder files each hold one network.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

default_kernel_init = nn.initializers.lecun_normal()


def partitioned(init_fn, names):
  """`init_fn` with logical-axis names attached (no-ops without a mesh)."""
  return nn.with_logical_partitioning(init_fn, names)


def dense(features, names, name, dtype, param_dtype, use_bias=True):
  """A Dense layer whose kernel [in, out] carries the logical names `names`."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=partitioned(default_kernel_init, names))


def layer_norm(eps, name, dtype, param_dtype):
  """LayerNorm over the last (channel) axis; SAM's LayerNorm2d is this on NHWC."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


class ConvTranspose(nn.Module):
  """torch.nn.ConvTranspose2d(k, stride, padding) on NHWC inputs.

  The kernel [k, k, in, out] is the torch weight [in, out, k, k] spatially flipped, so the layer is
  a dilated convolution: out = (H - 1) * stride - 2 * padding + k.
  """
  features: int
  kernel_size: int
  stride: int
  padding: int = 0
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, H, W, Cin] -> [B, H', W', Cout]
    k = self.kernel_size
    kernel = self.param("kernel", partitioned(default_kernel_init, (None, None, None, None)),
                        (k, k, x.shape[-1], self.features), self.param_dtype)
    kernel = nn.unbox(kernel).astype(self.dtype)
    pad = k - 1 - self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
        lhs_dilation=(self.stride, self.stride), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class MLP(nn.Module):
  """SAM's `MLP`: `depth` Linear layers with ReLU between them (optional final sigmoid)."""
  hidden_dim: int
  out_dim: int
  depth: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [..., D] -> [..., out_dim]
    for i in range(self.depth):
      last = i == self.depth - 1
      x = dense(self.out_dim if last else self.hidden_dim, ("embed", "mlp"), f"layers_{i}",
                self.dtype, self.param_dtype)(x)
      if not last:
        x = nn.relu(x)
    return x


class MLPBlock(nn.Module):
  """SAM's `MLPBlock`: lin1 -> activation -> lin2."""
  mlp_dim: int
  activation: str = "gelu"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [..., D] -> [..., D]
    width = x.shape[-1]
    h = dense(self.mlp_dim, ("embed", "mlp"), "lin1", self.dtype, self.param_dtype)(x)
    h = nn.gelu(h, approximate=False) if self.activation == "gelu" else nn.relu(h)
    return dense(width, ("mlp", "embed"), "lin2", self.dtype, self.param_dtype)(h)
