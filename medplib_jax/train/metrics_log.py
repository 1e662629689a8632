"""Training metrics: JSONL log + TensorBoard event files (process 0 only) and a console bar."""

import json
import os

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm


class MetricsLog:
  """`log(step, metrics)` appends to `<workdir>/metrics.jsonl` and TensorBoard `<workdir>/tb`."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0, desc: str = "train",
               console: bool = True):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = self._bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    if console:
      self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)
    self._last = start_step

  def __call__(self, step: int, metrics: dict):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(name, value, step)
    if self._bar is not None:
      self._bar.update(step - self._last)
      self._last = step
      shown = {k: metrics[k] for k in ("loss", "ce", "mask_dice", "lr") if k in metrics}
      self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      if self._bar is not None:
        self._bar.close()
