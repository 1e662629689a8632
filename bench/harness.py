"""Side-by-side timing: ours and the reference in one process, interleaved (A B A B ...).

Every benchmark calls `compare(...)` and `write_result(...)`; `bench/run_all.py` runs them all and
regenerates docs/benchmarks.md from bench/results/*.json.
"""

import json
import os
import platform
import time
from collections.abc import Callable

import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_info() -> dict:
  info = {"platform": platform.platform(), "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
  try:
    import jax
    info["jax"] = jax.__version__
    info["jax_devices"] = [str(d) for d in jax.devices()]
  except Exception:  # noqa: BLE001 - info only
    pass
  try:
    import torch
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
  except Exception:  # noqa: BLE001
    pass
  return info


def compare(fns: dict[str, Callable[[], object]], reps: int = 5, warmup: int = 1) -> dict:
  """Times each zero-argument callable `reps` times after `warmup` calls, interleaved.

  Each callable must block until its result is ready (e.g. `jax.block_until_ready`).
  Returns {name: {"median_s", "min_s", "max_s", "times_s"}}.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: {"median_s": float(np.median(t)), "min_s": float(np.min(t)),
                 "max_s": float(np.max(t)), "times_s": [float(x) for x in t]}
          for name, t in times.items()}


def write_result(name: str, *, what: str, command: str, inputs: dict, timings: dict,
                 ratio: float, ratio_means: str, goal: str = "", extra: dict | None = None) -> str:
  """Writes bench/results/<name>.json and returns its path."""
  os.makedirs(RESULTS_DIR, exist_ok=True)
  payload = {"name": name, "what": what, "command": command, "inputs": inputs,
             "machine": machine_info(), "timings": timings, "ratio": ratio,
             "ratio_means": ratio_means, "goal": goal, "extra": extra or {},
             "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
  path = os.path.join(RESULTS_DIR, f"{name}.json")
  with open(path, "w") as f:
    json.dump(payload, f, indent=1)
  return path
