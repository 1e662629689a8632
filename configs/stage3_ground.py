"""Stage 3 (grounding expert): LoRA r8/a16 on the FFNs, full mask decoder and text_hidden_fcs.

Data: MeCoVQA-G. Usage: medplib train --config configs/stage3_ground.py:7b
"""

from configs import common


def get_config(arg=None):
  size = common.parse_size(arg)
  c = common.base_config(stage=3, size=size)
  c.lora = common.lora_config(rank=8, alpha=16.0, dropout=0.05, targets=("gate", "up", "down"))
  c.trainable = (r"^sam/mask_decoder/", r"^text_hidden_fcs/")
  c.loss.update(ce=1.0, dice=5.0, bce=1.0, focal=1.0, iou=0.0)
  c.optim.update(lr=3e-4, epochs=10)
  return c
