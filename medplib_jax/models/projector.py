"""Vision -> LLM projector of LLaVA (`mm_projector`): `linear` or `mlp{N}x_gelu`.

`mlp2x_gelu` (MedPLIB) is Linear(Dv -> Dl), exact (erf) GELU, Linear(Dl -> Dl). The layers are
named `linear_1` ... `linear_N`; they hold the torch keys `mm_projector.0`, `.2`, ... (the GELUs
sit at the odd indices of the torch `nn.Sequential`). `linear` is one layer, `linear_1`, holding
the torch key `mm_projector` itself.
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def projector_depth(kind: str) -> int:
  """Number of Linear layers of a projector type ('linear' -> 1, 'mlp2x_gelu' -> 2)."""
  if kind == "linear":
    return 1
  match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
  if not match or int(match.group(1)) < 1:
    raise ValueError(f"unknown projector type {kind!r}; use 'linear' or 'mlp<N>x_gelu' (e.g. 'mlp2x_gelu')")
  return int(match.group(1))


class Projector(nn.Module):
  """[B, N, Dv] vision features -> [B, N, out_width] LLM embeddings."""
  kind: str
  out_width: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    depth = projector_depth(self.kind)
    x = x.astype(self.dtype)
    for i in range(depth):
      if i:
        x = jax.nn.gelu(x, approximate=False)
      names = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")
      x = nn.Dense(
          self.out_width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"linear_{i + 1}",
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[-1:]))(x)
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
