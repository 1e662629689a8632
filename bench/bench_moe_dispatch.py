"""MoE FFN forward at inference: capacity vs dropless dispatch vs one dense SwiGLU FFN of the
same width (the FLOPs of one expert per token). 2 experts, top-1, eval capacity factor 2.0,
fp32 CPU, 2048 tokens.

Run: .venv/bin/python -m bench.bench_moe_dispatch  -> bench/results/moe_dispatch.json
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from bench.harness import compare, write_result  # noqa: E402
from configs.common import moe_config  # noqa: E402
from medplib_jax.models.moe import MoeFeedForward  # noqa: E402

BATCH, LENGTH, WIDTH, MLP = 4, 512, 512, 1408


class DenseSwiGLU(nn.Module):
  """The FFN one expert computes: down(silu(x @ gate) * (x @ up))."""

  @nn.compact
  def __call__(self, x):
    gate = nn.Dense(MLP, use_bias=False, name="gate_proj")(x)
    up = nn.Dense(MLP, use_bias=False, name="up_proj")(x)
    return nn.Dense(WIDTH, use_bias=False, name="down_proj")(nn.silu(gate) * up)


def timed(module, x, *args):
  params = jax.jit(module.init, static_argnums=tuple(range(2, 2 + len(args))))(
      jax.random.key(0), x, *args)
  step = jax.jit(lambda p, x: module.apply(p, x, *args))
  return lambda: jax.block_until_ready(step(params, x))


def main():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((BATCH, LENGTH, WIDTH)), jnp.float32)
  fns = {"dense": timed(DenseSwiGLU(), x)}
  llm = ml_collections.ConfigDict(dict(width=WIDTH, mlp_dim=MLP, kernels="auto"))
  for dispatch in ("capacity", "dropless"):
    moe = moe_config(2)
    moe.dispatch = dispatch
    fns[f"moe_{dispatch}"] = timed(MoeFeedForward(llm, moe, None), x, True)
  timings = compare(fns, reps=10, warmup=2)
  ratios = {name: timings[name]["median_s"] / timings["dense"]["median_s"]
            for name in fns if name != "dense"}
  path = write_result(
      "moe_dispatch",
      what=f"MoE FFN forward, {BATCH * LENGTH} tokens, width {WIDTH}, mlp {MLP}, 2 experts top-1, "
           "eval (capacity factor 2.0), fp32 CPU; vs one dense SwiGLU FFN",
      command="python -m bench.bench_moe_dispatch",
      inputs=dict(batch=BATCH, length=LENGTH, width=WIDTH, mlp_dim=MLP, num_experts=2, top_k=1),
      timings=timings, ratio=min(ratios.values()),
      ratio_means="MoE FFN time / dense FFN time, best dispatch mode (1.0 = one expert's cost)",
      goal="dropless close to 1; capacity pays for E * C >= 2T buffer rows at eval factor 2.0",
      extra={"ratios": ratios})
  print(path, {k: round(v, 3) for k, v in ratios.items()})


if __name__ == "__main__":
  main()
