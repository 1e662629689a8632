"""Prefill + greedy decode throughput: our jitted KV-cache `generate` vs transformers' torch
`generate`, on the same random LLaMA weights (CPU, fp32).

Run: .venv/bin/python -m bench.bench_generate  -> bench/results/generate.json
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compute thread for XLA (and torch below): a like-for-like comparison on a shared machine.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bench.harness import compare, write_result  # noqa: E402
from configs import common  # noqa: E402
from medplib_jax.checkpoint.llama import load_llama  # noqa: E402
from medplib_jax.infer.generate import generate  # noqa: E402
from medplib_jax.models.llama import LlamaForCausalLM  # noqa: E402

SIZE = dict(vocab_size=2000, width=256, depth=4, num_heads=8, num_kv_heads=8, mlp_dim=688)
BATCH, PROMPT, NEW = 4, 64, 32
PAD, NEVER_EOS = 0, -1  # an eos id no row can produce: every row decodes all NEW tokens


def build():
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=SIZE["vocab_size"], hidden_size=SIZE["width"], intermediate_size=SIZE["mlp_dim"],
      num_hidden_layers=SIZE["depth"], num_attention_heads=SIZE["num_heads"],
      num_key_value_heads=SIZE["num_kv_heads"], rms_norm_eps=1e-5, rope_theta=10000.0,
      max_position_embeddings=512, tie_word_embeddings=False)).eval()
  cfg = ml_collections.ConfigDict(dict(
      **SIZE, head_dim=SIZE["width"] // SIZE["num_heads"], norm_eps=1e-5, rope_theta=10000.0,
      max_length=512, scan_layers=False, remat_policy="none", kernels="auto"))  # the inference layout
  params, _ = load_llama({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
  return hf, LlamaForCausalLM(cfg, common.moe_config(1), None), {"params": jax.device_put(params)}


def main():
  torch.set_num_threads(1)
  hf, model, variables = build()
  rng = np.random.default_rng(0)
  lengths = rng.integers(PROMPT // 2, PROMPT + 1, size=BATCH)
  ids = np.full((BATCH, PROMPT), PAD, np.int64)
  mask = np.zeros((BATCH, PROMPT), bool)
  for row, n in enumerate(lengths):  # left padding, as transformers expects
    ids[row, PROMPT - n:] = rng.integers(3, SIZE["vocab_size"], size=n)
    mask[row, PROMPT - n:] = True
  ids_j, mask_j = jnp.asarray(ids, jnp.int32), jnp.asarray(mask)
  ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.long)

  def ours(new):
    return lambda: jax.block_until_ready(generate(
        model, variables, input_ids=ids_j, attention_mask=mask_j, max_new_tokens=new,
        eos_id=NEVER_EOS, pad_id=PAD).tokens)

  def theirs(new):
    def run():
      with torch.no_grad():
        return hf.generate(input_ids=ids_t, attention_mask=mask_t, max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=PAD)
    return run

  # Same tokens first (greedy on the same weights), so the timings compare like with like.
  same = np.array_equal(np.asarray(ours(NEW)()), theirs(NEW)()[:, PROMPT:].numpy())
  full = compare({"ours": ours(NEW), "transformers": theirs(NEW)}, reps=5, warmup=1)
  prefill = compare({"ours": ours(1), "transformers": theirs(1)}, reps=5, warmup=1)
  tokens = BATCH * NEW
  tps = {name: tokens / t["median_s"] for name, t in full.items()}
  ratio = full["ours"]["median_s"] / full["transformers"]["median_s"]
  path = write_result(
      "generate",
      what=f"greedy generate, batch {BATCH}, left-padded prompts <= {PROMPT}, {NEW} new tokens, "
           f"LLaMA {SIZE} (layers unrolled, as MedPLIB.from_pretrained runs them), fp32 CPU, "
           "one compute thread each",
      command="python -m bench.bench_generate",
      inputs=dict(**SIZE, batch=BATCH, prompt=PROMPT, new_tokens=NEW),
      timings={"generate": full, "prefill_plus_one_token": prefill},
      ratio=ratio, ratio_means="our generate time / transformers generate time (lower is better)",
      extra={"tokens_per_s": tps, "same_tokens_as_transformers": bool(same),
             "prefill_ratio": prefill["ours"]["median_s"] / prefill["transformers"]["median_s"]})
  print(path, f"ratio={ratio:.3f}", {k: round(v, 1) for k, v in tps.items()}, "same tokens:", same)


if __name__ == "__main__":
  main()
