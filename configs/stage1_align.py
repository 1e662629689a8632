"""Stage 1 (alignment): train the projector only on image-caption pairs, `plain` template.

Usage: medplib train --config configs/stage1_align.py:7b --workdir runs/s1
"""

from configs import common


def get_config(arg=None):
  size = common.parse_size(arg)
  c = common.base_config(stage=1, size=size)
  c.trainable = (r"^projector/",)
  c.data.template = "plain"
  c.optim.update(lr=1e-3, epochs=1, warmup_ratio=0.03, schedule="cosine",
                 global_batch_size=256 if size == "7b" else 8)
  return c
