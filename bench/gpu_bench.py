"""One-GPU measurements (run by bench/gpu.sh on a lent H100/H200, or `--dry-run` on CPU):

(a) MFU of the stage-2 and stage-4 train steps for the largest 7B-shaped setup that fits one
    GPU: the 7B configs with LoRA and remat (`nothing_saveable`), batch x sequence below; if the
    full depth runs out of memory the depth is halved (recorded as `depth`).
(b) Batch-1 decode tokens/s of the 7B LLM (bf16 weights, LoRA merged, 2048-slot KV cache,
    `DECODE_STEPS` greedy steps in one jitted loop) and the achieved fraction of HBM bandwidth
    (bytes a step must read: active weights + KV cache, over the device's peak).
(c) MoE (2 experts, top-1) vs dense decode: time ratio, timed interleaved on the same device.

`--dry-run` (or MEDPLIB_BENCH_SMALL=1) runs the same code on the tiny configs: it proves the
script works; its MFU numbers use a nominal 1 TFLOP/s peak and mean nothing.
Writes bench/results/gpu.json (gpu_dryrun.json for a dry run).
"""

import argparse
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bench.harness import RESULTS_DIR, compare, machine_info
from medplib_jax import flops as flops_lib
from medplib_jax import sharding
from medplib_jax.config_loading import load_config
from medplib_jax.models.llama import LlamaForCausalLM, init_cache
from medplib_jax.models.medplib import dummy_batch
from medplib_jax.train import trainer

DECODE_STEPS = 64


def device_peaks(dry_run: bool) -> tuple[str, float, float]:
  """(device kind, peak bf16 FLOP/s, peak HBM bytes/s) of device 0."""
  kind = jax.devices()[0].device_kind
  for name in ("h200", "h100"):
    if name in kind.lower().replace(" ", ""):
      return kind, flops_lib.PEAK_BF16_FLOPS[name], flops_lib.PEAK_HBM_BYTES_PER_S[name]
  if not dry_run:
    raise SystemExit(f"unknown accelerator {kind!r}: add its peaks to medplib_jax/flops.py or use --dry-run")
  return kind, 1e12, 1e11  # nominal CPU figures, only so the dry run exercises the arithmetic


def synthetic_batch(cfg, batch: int, seq_len: int, seed: int = 0) -> dict:
  """A full-length batch with an image, one region and one `<SEG>` per sample."""
  rng = np.random.default_rng(seed)
  batch_np = dummy_batch(cfg.model, cfg.data.max_length, batch)
  vocab = cfg.model.llm.vocab_size
  batch_np["input_ids"] = rng.integers(3, vocab, (batch, seq_len), dtype=np.int32)
  batch_np["attention_mask"][:] = True
  batch_np["labels"] = batch_np["input_ids"].copy()
  batch_np["image_start"][:] = 2
  n_img = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
  batch_np["region_positions"][:] = min(n_img + 8, seq_len - 20)
  batch_np["region_masks"][:, :, 2:6, 2:6] = True
  batch_np["seg_positions"][:] = seq_len - 10
  batch_np["masks"][:, :, :16, :16] = True
  batch_np["clip_image"] = rng.standard_normal(batch_np["clip_image"].shape).astype(np.float32)
  batch_np["sam_image"] = rng.standard_normal(batch_np["sam_image"].shape).astype(np.float32)
  batch_np["sam_resized_hw"][:] = cfg.model.sam.image_size
  batch_np["orig_hw"][:] = cfg.model.sam.image_size
  return batch_np


def train_mfu(config: str, batch: int, seq_len: int, depth: int | None, peak: float, reps: int) -> dict:
  overrides = [f"--config.data.max_length={seq_len}"]
  if depth:
    overrides.append(f"--config.model.llm.depth={depth}")
  cfg = load_config(config, overrides)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1])
  rules = sharding.rules_tuple(cfg.logical_axis_rules)
  model = trainer.build_model(cfg)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, tx, schedule = trainer.init_state(cfg, model, mesh, total_steps=1000)
    step = jax.jit(trainer.make_train_step(cfg, model, tx, schedule), donate_argnums=(0,))
    data = sharding.host_to_global(synthetic_batch(cfg, batch, seq_len), mesh, rules)
    t0 = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    holder = [state]

    def one_step():
      holder[0], m = step(holder[0], data)
      jax.block_until_ready(m)

    timing = compare({"step": one_step}, reps=reps, warmup=1)["step"]
    loss = float(metrics["loss"])
    del holder, state
  model_flops = flops_lib.train_step_flops(cfg, batch, seq_len)
  return dict(config=config, depth=cfg.model.llm.depth, batch=batch, seq_len=seq_len,
              remat=cfg.model.llm.remat_policy, lora_rank=cfg.lora.rank, first_step_s=compile_s,
              step=timing, loss_first_step=loss, model_flops_per_step=model_flops["total"],
              mfu=flops_lib.mfu(model_flops["total"], timing["median_s"], peak, 1))


def train_largest_fitting(config, batch, seq_len, depths, peak, reps) -> dict:
  """Tries the full depth first, halving on out-of-memory."""
  errors = []
  for depth in depths:
    try:
      result = train_mfu(config, batch, seq_len, depth, peak, reps)
      result["tried"] = errors
      return result
    except Exception as e:  # noqa: BLE001 - XLA reports OOM as several exception types
      if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
        raise
      errors.append(f"depth {depth}: out of memory")
  return dict(config=config, error="; ".join(errors))


def decode_fn(model_cfg, moe_cfg, cache_len: int, prompt_len: int):
  """A zero-argument callable running DECODE_STEPS greedy steps in one jit, and its params bytes."""
  # The layout MedPLIB.from_pretrained decodes with (llama.inference_layout).
  llm_cfg, moe_cfg = model_cfg.llm.copy_and_resolve_references(), moe_cfg.copy_and_resolve_references()
  llm_cfg.scan_layers = False
  if moe_cfg.num_experts > 1:
    moe_cfg.split_experts = True
  model = LlamaForCausalLM(llm_cfg, moe_cfg, None, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  token = jnp.ones((1, 1), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), token))
  cache = init_cache(model_cfg.llm, 1, cache_len, jnp.bfloat16)
  cache = dict(cache, mask=cache["mask"].at[:, :prompt_len].set(True),
               index=jnp.asarray(prompt_len, jnp.int32),
               lengths=jnp.full((1,), prompt_len, jnp.int32))

  @jax.jit
  def run(params, cache, token):
    def body(_, carry):
      cache, token = carry
      out = model.apply(params, input_ids=token, cache=cache)
      return out["cache"], jnp.argmax(out["logits"][:, -1:], -1).astype(jnp.int32)
    return jax.lax.fori_loop(0, DECODE_STEPS, body, (cache, token))[1]

  fn = lambda: jax.block_until_ready(run(params, cache, token))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
  return fn, nbytes


def decode_bench(cfg, peak_bw: float, reps: int) -> dict:
  cache_len = cfg.model.llm.max_length
  prompt_len = cache_len // 4
  dense_cfg = cfg.model.moe.copy_and_resolve_references()
  dense_cfg.num_experts = 1
  fns, out = {}, {}
  for name, moe in (("dense", dense_cfg), ("moe", cfg.model.moe)):
    fns[name], params_bytes = decode_fn(cfg.model, moe, cache_len, prompt_len)
    out[name] = dict(params_bytes=params_bytes)
  timings = compare(fns, reps=reps, warmup=1)
  for name, moe in (("dense", dense_cfg), ("moe", cfg.model.moe)):
    model_cfg = cfg.model.copy_and_resolve_references()
    model_cfg.moe = moe
    per_step = timings[name]["median_s"] / DECODE_STEPS
    need = flops_lib.decode_bytes(model_cfg, batch=1, context=cache_len)
    out[name].update(timing=timings[name], step_s=per_step, tokens_per_s=1.0 / per_step,
                     bytes_per_step=need, hbm_fraction=need / per_step / peak_bw,
                     flops_per_step=flops_lib.decode_step_flops(model_cfg, batch=1, context=cache_len))
  out.update(cache_len=cache_len, prompt_len=prompt_len, steps_per_call=DECODE_STEPS,
             moe_over_dense=out["moe"]["step_s"] / out["dense"]["step_s"])
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dry-run", action="store_true", help="tiny configs on CPU (also MEDPLIB_BENCH_SMALL=1)")
  p.add_argument("--batch", type=int, default=None, help="train batch (default 4 at 7B, 2 tiny)")
  p.add_argument("--seq-len", type=int, default=None, help="train sequence length (default 1024, 256 tiny)")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--skip-train", action="store_true")
  p.add_argument("--skip-decode", action="store_true")
  args = p.parse_args(argv)
  dry = args.dry_run or os.environ.get("MEDPLIB_BENCH_SMALL") == "1"
  size = "tiny" if dry else "7b"
  batch = args.batch or (2 if dry else 4)
  seq_len = args.seq_len or (256 if dry else 1024)
  depths = [None] if dry else [None, 16, 8]
  kind, peak, peak_bw = device_peaks(dry)
  result = dict(name="gpu_dryrun" if dry else "gpu", dry_run=dry, device=kind, peak_flops=peak,
                peak_hbm_bytes_per_s=peak_bw, machine=machine_info(),
                setup=f"{size} configs, train batch {batch} x seq {seq_len}, LoRA + remat; "
                      f"decode batch 1 bf16",
                command="bash bench/gpu.sh" + ("  --dry-run" if dry else ""), train={}, decode={})
  path = os.path.join(RESULTS_DIR, f"{result['name']}.json")

  def save():
    os.makedirs(RESULTS_DIR, exist_ok=True)
    result["written"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(path, "w") as f:
      json.dump(result, f, indent=1)

  if not args.skip_train:
    for stage, config in (("stage2", "configs/stage2_vqa.py"), ("stage4", "configs/stage4_moe.py")):
      t0 = time.perf_counter()
      result["train"][stage] = train_largest_fitting(f"{config}:{size}", batch, seq_len, depths,
                                                     peak, args.reps)
      r = result["train"][stage]
      print(f"[gpu_bench] {stage}: " + (r.get("error") or
            f"depth {r['depth']}, step {r['step']['median_s']:.3f} s, MFU {r['mfu']:.3f}")
            + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
      save()
  if not args.skip_decode:
    cfg = load_config(f"configs/stage4_moe.py:{size}", [])
    result["decode"] = decode_bench(cfg, peak_bw, args.reps)
    d = result["decode"]
    print(f"[gpu_bench] decode: dense {d['dense']['tokens_per_s']:.1f} tok/s "
          f"(HBM {d['dense']['hbm_fraction']:.3f}), MoE {d['moe']['tokens_per_s']:.1f} tok/s "
          f"(HBM {d['moe']['hbm_fraction']:.3f}), MoE/dense {d['moe_over_dense']:.3f}", flush=True)
  save()
  print(f"[gpu_bench] wrote {path}")


if __name__ == "__main__":
  main()
