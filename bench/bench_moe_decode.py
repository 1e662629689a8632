"""One KV-cache decode step: LLaMA with 2-expert top-1 MoE FFNs vs the same model with one dense
FFN per layer (CPU, fp32, width 512). Both MoE dispatch modes are timed; at inference top-1
routing should cost about one dense FFN.

Run: .venv/bin/python -m bench.bench_moe_decode  -> bench/results/moe_decode.json
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compute thread: steadier timings on a shared machine.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from bench.harness import compare, write_result  # noqa: E402
from configs import common  # noqa: E402
from medplib_jax.models.llama import LlamaForCausalLM, init_cache  # noqa: E402

CFG = dict(vocab_size=1000, width=512, depth=4, num_heads=8, num_kv_heads=8, head_dim=64,
           mlp_dim=1408, norm_eps=1e-5, rope_theta=10000.0, max_length=512, scan_layers=True,
           remat_policy="none")
CACHE, FILLED = 256, 128  # cache slots, and how many already hold the prompt
NOTES = (
    "A decode step has <= moe.decode_max_tokens (8) tokens, so both dispatch modes take the "
    "decode path: each expert runs under a lax.cond taken only when a token is routed to it, so "
    "a batch-1 step reads one expert's weights. Batch 8 with distinct tokens routes to both "
    "experts, so it inherently reads both (2x the FFN weights of the dense model). On XLA:CPU "
    "the expert's slice of the stacked [E, D, F] weights (and the scanned layer's slice of the "
    "[layers, E, D, F] stack) is copied before each dot, so the CPU step still pays extra weight "
    "traffic over the dense model, whose per-layer weights feed the dots directly.")


def decode_step_fn(moe_cfg, batch):
  """A jitted one-token decode step on a cache with FILLED prompt tokens, and its inputs."""
  cfg = ml_collections.ConfigDict(CFG)
  model = LlamaForCausalLM(cfg, moe_cfg, None)
  # Distinct tokens per row, so a batch routes to both experts as real traffic does.
  ids = jax.random.randint(jax.random.key(1), (batch, 1), 3, CFG["vocab_size"])
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), ids))
  cache = init_cache(cfg, batch, CACHE)
  cache = dict(cache, mask=cache["mask"].at[:, :FILLED].set(True),
               index=jnp.asarray(FILLED, jnp.int32), lengths=jnp.full((batch,), FILLED, jnp.int32))
  step = jax.jit(lambda p, c: model.apply(p, ids, cache=c)["logits"])
  return lambda: jax.block_until_ready(step(params, cache))


def main():
  timings, ratios = {}, {}
  for batch in (1, 8):
    fns = {"dense": decode_step_fn(common.moe_config(1), batch)}
    for dispatch in ("dropless", "capacity"):
      moe = common.moe_config(2)
      moe.dispatch = dispatch
      fns[f"moe_{dispatch}"] = decode_step_fn(moe, batch)
    t = compare(fns, reps=20, warmup=2)
    timings[f"batch{batch}"] = t
    for name in fns:
      if name != "dense":
        ratios[f"batch{batch}_{name}"] = t[name]["median_s"] / t["dense"]["median_s"]
  best = {b: min(ratios[f"batch{b}_moe_dropless"], ratios[f"batch{b}_moe_capacity"]) for b in (1, 8)}
  ratio = max(best.values())
  path = write_result(
      "moe_decode",
      what="one decode step (1 new token, cache 128/256 filled), LLaMA width 512 depth 4 mlp 1408, "
           "2-expert top-1 MoE vs dense FFN, fp32 CPU, one XLA compute thread",
      command="python -m bench.bench_moe_decode",
      inputs=dict(**CFG, cache=CACHE, filled=FILLED, batches=[1, 8]),
      timings=timings, ratio=ratio,
      ratio_means="MoE decode-step time / dense decode-step time, best dispatch mode, worst batch",
      goal="<= 1.05", extra={"ratios": ratios, "notes": NOTES})
  print(path, f"ratio={ratio:.3f}", {k: round(v, 3) for k, v in ratios.items()})


if __name__ == "__main__":
  main()
