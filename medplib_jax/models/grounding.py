"""`text_hidden_fcs`: projects the LLM state that predicts `<SEG>` into a SAM prompt embedding."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class GroundingProjector(nn.Module):
  """Linear(D -> D), ReLU, Linear(D -> C): [..., D] -> [..., C] (C = SAM prompt width).

  Reference keys: `model.text_hidden_fcs.0.0.*` (fc1) and `model.text_hidden_fcs.0.2.*` (fc2).
  """
  out_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden):
    width = hidden.shape[-1]
    x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1",
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")))(hidden)
    x = nn.relu(x)
    return nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", None)))(x)
