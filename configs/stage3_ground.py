"""Stage 3 (grounding expert): LoRA r8/a16 on the FFNs, full mask decoder and text_hidden_fcs.

Data: MeCoVQA-G. Usage: medplib train --config configs/stage3_ground.py:7b
Size demo (`:demo` or `:demo,WORKDIR`, default workdir runs/demo): the demo workdir's grounding
turns, from its stage 2; after `make demo`,
medplib train --config configs/stage3_ground.py:demo --workdir runs/demo/stage3_again
trains its stage 3 again.
"""

from configs import common


def get_config(arg=None):
  size, workdir = common.parse_arg(arg)
  c = common.base_config(stage=3, size=size)
  c.lora = common.lora_config(rank=8, alpha=16.0, dropout=0.05, targets=("gate", "up", "down"))
  c.trainable = (r"^sam/mask_decoder/", r"^text_hidden_fcs/")
  c.loss.update(ce=1.0, dice=5.0, bce=1.0, focal=1.0, iou=0.0)
  c.optim.update(lr=3e-4, epochs=10)
  if size == "demo":
    common.demo_data(c, workdir, "train_G_turns")
    c.init.previous_stage = common.demo_export(workdir, 2)
    common.demo_schedule(c, steps=500, lr=1e-3)
  return c
