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
from medplib_jax.models.llama import LlamaForCausalLM, inference_layout, init_cache  # noqa: E402

CFG = dict(vocab_size=1000, width=512, depth=4, num_heads=8, num_kv_heads=8, head_dim=64,
           mlp_dim=1408, norm_eps=1e-5, rope_theta=10000.0, max_length=512, scan_layers=True,
           remat_policy="none", kernels="auto")
CACHE, FILLED = 256, 128  # cache slots, and how many already hold the prompt
NOTES = (
    "Both models are initialised in the training layout (scanned layers, stacked experts) and "
    "converted with llama.inference_layout, as MedPLIB.from_pretrained does: layers unrolled, "
    "experts split into their own params. A decode step has <= moe.decode_max_tokens (8) "
    "tokens, so both dispatch modes take the decode path: each expert runs under a lax.cond "
    "taken only when a token is routed to it, so a step reads only the routed experts' weights. "
    "'one expert' batches route every token to the same expert (a zero router: ties go to "
    "expert 0), as a batch of one task does with a trained router; 'mixed' batches hold distinct "
    "tokens under a random router, so both experts are read: that step moves more weight bytes "
    "than the dense one (see weight_bytes_bound) and cannot reach the goal on a memory-bound "
    "device.")


def decode_step_fn(moe_cfg, batch, one_expert=False):
  """A jitted one-token decode step on a cache with FILLED prompt tokens, in the inference
  layout; returns a thunk running one step."""
  cfg = ml_collections.ConfigDict(CFG)
  # Distinct tokens per row, so a mixed batch routes to both experts as real traffic does.
  ids = jax.random.randint(jax.random.key(1), (batch, 1), 3, CFG["vocab_size"])
  trained = LlamaForCausalLM(cfg, moe_cfg, None)
  params = nn.unbox(jax.jit(trained.init)(jax.random.key(0), ids))["params"]
  if one_expert:
    params["layers"]["mlp"]["router"]["kernel"] = jnp.zeros_like(
        params["layers"]["mlp"]["router"]["kernel"])
  llm_cfg, moe_cfg, params = inference_layout(cfg, moe_cfg, params)
  model = LlamaForCausalLM(llm_cfg, moe_cfg, None)
  cache = init_cache(llm_cfg, batch, CACHE)
  cache = dict(cache, mask=cache["mask"].at[:, :FILLED].set(True),
               index=jnp.asarray(FILLED, jnp.int32), lengths=jnp.full((batch,), FILLED, jnp.int32))

  def apply(p, c):
    out = model.apply({"params": p}, ids, cache=c)
    return out["cache"], out["logits"]

  # The cache is donated and fed back, so the step updates it in place as `generate` does
  # (a copy of the whole cache per step would dominate batch 8). Each call fills one more slot.
  step = jax.jit(apply, donate_argnums=1)
  state = {"cache": cache}

  def run():
    state["cache"], logits = step(params, state["cache"])
    jax.block_until_ready(logits)
  return run


def weight_bytes_bound():
  """(attention + 2 experts' FFN + head) / (attention + 1 FFN + head) fp32 weight bytes: the
  memory-bound ratio of a step that reads both experts."""
  d, f, v, depth = CFG["width"], CFG["mlp_dim"], CFG["vocab_size"], CFG["depth"]
  attn, ffn, head = 4 * d * d, 3 * d * f, 2 * v * d / depth
  return (attn + 2 * ffn + head) / (attn + ffn + head)


def main():
  timings, ratios = {}, {}
  cases = {"batch1": (1, False), "batch8_one_expert": (8, True), "batch8_mixed": (8, False)}
  for case, (batch, one_expert) in cases.items():
    fns = {"dense": decode_step_fn(common.moe_config(1), batch)}
    for dispatch in ("dropless", "capacity"):
      moe = common.moe_config(2)
      moe.dispatch = dispatch
      fns[f"moe_{dispatch}"] = decode_step_fn(moe, batch, one_expert)
    t = compare(fns, reps=20, warmup=2)
    timings[case] = t
    for name in fns:
      if name != "dense":
        ratios[f"{case}_{name}"] = t[name]["median_s"] / t["dense"]["median_s"]
  best = {case: min(ratios[f"{case}_moe_dropless"], ratios[f"{case}_moe_capacity"]) for case in cases}
  ratio = max(best["batch1"], best["batch8_one_expert"])
  path = write_result(
      "moe_decode",
      what="one decode step (1 new token, cache 128/256 filled), LLaMA width 512 depth 4 mlp 1408, "
           "2-expert top-1 MoE vs dense FFN, inference layout, fp32 CPU, one XLA compute thread",
      command="python -m bench.bench_moe_decode",
      inputs=dict(**CFG, cache=CACHE, filled=FILLED, cases=cases),
      timings=timings, ratio=ratio,
      ratio_means="MoE decode-step time / dense decode-step time, best dispatch mode, worst of "
                  "batch 1 and batch 8 routed to one expert (batch 8 mixed: see ratios)",
      goal="<= 1.05",
      extra={"ratios": ratios, "best_per_case": best,
             "weight_bytes_bound_two_experts": weight_bytes_bound(), "notes": NOTES})
  print(path, f"ratio={ratio:.3f}", {k: round(v, 3) for k, v in ratios.items()},
        f"bound(two experts)={weight_bytes_bound():.2f}")


if __name__ == "__main__":
  main()
