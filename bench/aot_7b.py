"""Ahead-of-time scale check: the 7B stage-4 train step and the 7B decode step, compiled for fake
meshes of CPU host-platform devices from abstract shapes (nothing is materialised).

A configuration is `train|decode:DEVICES:LAYOUT[:KERNELS]`; KERNELS is the backend kernel set
compiled (models/kernels.py), by default `tpu`, what a pod runs (the cpu set is checked too).
For each configuration one subprocess sets `XLA_FLAGS=--xla_force_host_platform_device_count=N`
before importing jax, builds the step from `jax.eval_shape` params, lowers it with
`jax.jit(..., in_shardings, out_shardings, donate_argnums=0).lower(...)`, compiles it, and prints
the per-device memory (`compiled.memory_analysis()`) and FLOPs (`compiled.cost_analysis()`) as one
JSON line. The parent collects them into bench/results/aot_7b.json.

Setup (stated in the results): stage-4 config `configs/stage4_moe.py:7b` (2 experts, LoRA r8 on
the experts' gate/up/down and q/v, bf16 compute, f32 params and Adam moments), sequence length
1024, one sequence per device (global batch = devices), remat `nothing_saveable`. The step is
`trainer.make_train_step` with the trainer's shardings and donation (train/aot.py).
Layouts: `fsdp` (every device on the fsdp axis), `expert_fsdp` (expert axis 2 x fsdp N/2, the
batch sharded over both). Decode: one token against a 2048-slot bf16 KV cache, batch 1, bf16
params, on 1 device and on 8 devices with the tensor axis (heads / mlp sharded).

  python -m bench.aot_7b                          # every configuration (long: see docs)
  python -m bench.aot_7b --only train:8:fsdp      # one configuration
  python -m bench.aot_7b --only train:8:fsdp:cpu  # the same with the cpu kernel set
  python -m bench.aot_7b --worker train:8:fsdp    # what the parent runs per configuration
"""

import argparse
import json
import os
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "aot_7b.json")
GIB = 1024 ** 3
# Per-device HBM of the accelerators we size for.
TARGETS_GIB = {"tpu_v5e": 16, "h100": 80, "tpu_v5p": 95}
SEQ_LEN = 1024
DECODE_CACHE = 2048

# What a pod compiles: the tpu kernel set (models/kernels.py). The cpu set is checked at two
# sizes so that a CPU-only speed-up that breaks scaling shows here too.
DEFAULT_KERNELS = "tpu"
TRAIN_CONFIGS = [f"train:{n}:{layout}" for n in (8, 64, 256, 1024) for layout in ("fsdp", "expert_fsdp")]
CPU_KERNEL_CONFIGS = ["train:8:fsdp:cpu", "train:256:fsdp:cpu"]
DECODE_CONFIGS = ["decode:1:single", "decode:8:tensor"]
ALL_CONFIGS = TRAIN_CONFIGS + CPU_KERNEL_CONFIGS + DECODE_CONFIGS


def mesh_overrides(layout: str, devices: int) -> tuple[dict, list]:
  """(mesh sizes, logical-rule overrides) of a layout."""
  if layout == "fsdp":
    return dict(data=1, fsdp=devices, expert=1, tensor=1), []
  if layout == "expert_fsdp":
    # The batch also spans the expert axis, so every device holds different tokens
    # (DeepSpeed's expert parallelism: experts sharded, attention data-parallel).
    return dict(data=1, fsdp=devices // 2, expert=2, tensor=1), [("batch", ("data", "fsdp", "expert"))]
  if layout == "single":
    return dict(data=1, fsdp=1, expert=1, tensor=1), []
  if layout == "tensor":
    return dict(data=1, fsdp=1, expert=1, tensor=devices), []
  raise ValueError(f"unknown layout {layout!r}; choose fsdp, expert_fsdp, single or tensor")


def _with_fits(memory: dict) -> dict:
  """memory_report(...) plus whether its peak fits each accelerator we size for."""
  return dict(memory, fits={name: memory["peak_bytes_per_device"] <= gib * GIB
                            for name, gib in TARGETS_GIB.items()})


def _rules(cfg, extra):
  from medplib_jax import sharding
  rules = dict(sharding.rules_tuple(cfg.logical_axis_rules))
  rules.update(dict(extra))
  return tuple(rules.items())


def compile_train(devices: int, layout: str, kernels: str) -> dict:
  from medplib_jax import flops as flops_lib
  from medplib_jax import sharding
  from medplib_jax.config_loading import load_config
  from medplib_jax.train import aot

  mesh_cfg, rule_overrides = mesh_overrides(layout, devices)
  cfg = load_config("configs/stage4_moe.py:7b", [f"--config.data.max_length={SEQ_LEN}",
                                                  f"--config.model.llm.kernels={kernels}"])
  cfg.logical_axis_rules = _rules(cfg, rule_overrides)
  cfg.mesh.update(mesh_cfg)
  global_batch = devices  # one sequence per device
  report = aot.compile_report(cfg, sharding.make_mesh(cfg.mesh), global_batch)
  report["memory"] = _with_fits(report["memory"])
  model_flops = flops_lib.train_step_flops(cfg, global_batch, SEQ_LEN)
  return dict(kind="train", layout=layout, rules_overrides=[list(r) for r in rule_overrides],
              model_flops_per_step=model_flops["total"],
              model_flops_per_device=model_flops["total"] / devices, **report)


def compile_decode(devices: int, layout: str, kernels: str) -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from medplib_jax import flops as flops_lib
  from medplib_jax import sharding
  from medplib_jax.config_loading import load_config
  from medplib_jax.models.llama import LlamaForCausalLM, init_cache
  from medplib_jax.train import aot, trainer

  mesh_cfg, rule_overrides = mesh_overrides(layout, devices)
  cfg = load_config("configs/stage4_moe.py:7b", [])
  rules = _rules(cfg, rule_overrides)
  mesh = sharding.make_mesh(mesh_cfg)
  # Inference: LoRA merged away, params stored in bf16, in the layout MedPLIB.from_pretrained
  # decodes with (llama.inference_layout: layers unrolled, experts split).
  llm_cfg = cfg.model.llm.copy_and_resolve_references()
  moe_cfg = cfg.model.moe.copy_and_resolve_references()
  llm_cfg.scan_layers, moe_cfg.split_experts, llm_cfg.kernels = False, True, kernels
  model = LlamaForCausalLM(llm_cfg, moe_cfg, None, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  ids = jnp.zeros((1, 1), jnp.int32)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]
    param_sh = sharding.logical_to_shardings(boxed, mesh, rules)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          sharding.strip_boxes(boxed), param_sh)
    cache = jax.eval_shape(lambda: init_cache(llm_cfg, 1, DECODE_CACHE, jnp.bfloat16))
    # The cache is [layers, B, KV heads, slots, Hd]: tensor parallelism splits the KV heads.
    kv_spec = PartitionSpec(None, None, "tensor" if mesh.shape["tensor"] > 1 else None, None, None)
    cache_sh = {k: NamedSharding(mesh, kv_spec if k in ("k", "v") else PartitionSpec()) for k in cache}
    cache = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=cache_sh[k]) for k, v in cache.items()}
    token_sh = NamedSharding(mesh, PartitionSpec())
    token = jax.ShapeDtypeStruct((1, 1), jnp.int32, sharding=token_sh)

    def decode_step(cache, params, token):
      out = model.apply({"params": params}, input_ids=token, cache=cache)
      return out["cache"], jnp.argmax(out["logits"][:, -1], -1)

    jitted = jax.jit(decode_step, in_shardings=(cache_sh, param_sh, token_sh),
                     out_shardings=(cache_sh, token_sh), donate_argnums=0)
    lowered = jitted.lower(cache, params, token)
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
  t_compile = time.perf_counter() - t0 - t_lower
  plain = sharding.strip_boxes(boxed)
  model_flops = flops_lib.decode_step_flops(cfg.model, batch=1, context=DECODE_CACHE)
  return dict(kind="decode", devices=devices, layout=layout, kernels=kernels, mesh=dict(mesh.shape),
              batch=1,
              cache_len=DECODE_CACHE, params=trainer.count_params(plain),
              memory=_with_fits(aot.memory_report(compiled)),
              xla_flops_per_device=aot.xla_flops(compiled),
              model_flops_per_step=model_flops, lower_s=t_lower, compile_s=t_compile)


def worker(name: str) -> dict:
  kind, devices, layout, kernels = (name.split(":") + [DEFAULT_KERNELS])[:4]
  devices = int(devices)
  import jax
  if jax.device_count() != devices:
    raise RuntimeError(f"{name}: expected {devices} devices, jax sees {jax.device_count()} "
                       "(XLA_FLAGS must be set before jax is imported)")
  fn = compile_train if kind == "train" else compile_decode
  return dict(name=name, **fn(devices, layout, kernels))


def run_one(name: str, timeout_s: float) -> dict:
  devices = int(name.split(":")[1])
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  t0 = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, "-m", "bench.aot_7b", "--worker", name], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return dict(name=name, error=f"timed out after {timeout_s:.0f} s", wall_s=time.perf_counter() - t0)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    return dict(name=name, error=f"exit {proc.returncode}: {proc.stderr[-3000:]}",
                wall_s=time.perf_counter() - t0)
  result = json.loads(lines[-1])
  result["wall_s"] = time.perf_counter() - t0
  return result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--worker", help="compile one configuration in this process and print JSON")
  p.add_argument("--only", action="append", help=f"configurations to run (default all: {ALL_CONFIGS})")
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
  p.add_argument("--merge", nargs="*", default=[],
                 help="files holding a worker's JSON line (from a separate `--worker` run) to add")
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.worker)))
    return
  results = []
  for path in args.merge:
    with open(path) as f:
      results.append(json.loads([l for l in f.read().splitlines() if l.startswith("{")][-1]))
  names = [] if args.merge and not args.only else (args.only or ALL_CONFIGS)
  write_results(results, names, args.timeout)


def write_results(results: list[dict], names: list[str], timeout_s: float):
  """Adds `results`, then runs and adds each of `names`, rewriting the JSON after each."""
  import platform
  previous = {}
  if os.path.exists(RESULTS):
    with open(RESULTS) as f:
      previous = {r["name"]: r for r in json.load(f).get("runs", [])}
  previous.update({r["name"]: r for r in results})
  for name in [None] + list(names):
    if name is not None:
      print(f"[aot_7b] {name} ...", flush=True)
      result = run_one(name, timeout_s)
      previous[name] = result
      summary = result.get("error") or (f"{result['memory']['peak_gib_per_device']:.2f} GiB/device, "
                                         f"compile {result['compile_s']:.0f} s")
      print(f"[aot_7b] {name}: {summary}", flush=True)
    payload = dict(name="aot_7b", what=__doc__.split("\n\n")[0],
                   command="make aot  (or: python -m bench.aot_7b --only train:8:fsdp)",
                   targets_gib=TARGETS_GIB, seq_len=SEQ_LEN, planned=ALL_CONFIGS,
                   machine=dict(platform=platform.platform(), cpu_count=os.cpu_count()),
                   runs=[previous[n] for n in ALL_CONFIGS if n in previous],
                   written=time.strftime("%Y-%m-%dT%H:%M:%S"))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
      json.dump(payload, f, indent=1)


if __name__ == "__main__":
  main()
