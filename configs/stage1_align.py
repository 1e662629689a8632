"""Stage 1 (alignment): train the projector only on image-caption pairs, `plain` template.

Usage: medplib train --config configs/stage1_align.py:7b --workdir runs/s1
Size demo (`:demo` or `:demo,WORKDIR`, default workdir runs/demo): the captions of the demo
workdir, from its stand-in CLIP and SAM encoders; after `make demo`,
medplib train --config configs/stage1_align.py:demo --workdir runs/demo/stage1_again
trains its stage 1 again.
"""

import os

from configs import common


def get_config(arg=None):
  size, workdir = common.parse_arg(arg)
  c = common.base_config(stage=1, size=size)
  c.trainable = (r"^projector/",)
  c.data.template = "plain"
  c.optim.update(lr=1e-3, epochs=1, warmup_ratio=0.03, schedule="cosine",
                 global_batch_size=256 if size == "7b" else 8)
  if size == "demo":
    common.demo_data(c, workdir, "train_caption")
    c.init.update(clip=os.path.join(workdir, "standin_clip"),
                  sam=os.path.join(workdir, "standin_sam"))
    common.demo_schedule(c, steps=150, lr=1e-3)
  return c
