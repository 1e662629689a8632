"""Stage 4 (MoE fine-tune): 2 experts per FFN (expert 0 = stage-3 FFN, expert 1 = stage-2 FFN).

LoRA r8/a16 on the experts' gate/up/down and q, v; full router, lm_head, embeddings, mask decoder,
text_hidden_fcs and region adapter. Data: all of MeCoVQA, max length 1024.
Usage: medplib train --config configs/stage4_moe.py:7b
"""

from configs import common


def get_config(arg=None):
  size = common.parse_size(arg)
  c = common.base_config(stage=4, size=size)
  c.lora = common.lora_config(rank=8, alpha=16.0, dropout=0.05,
                              targets=("gate", "up", "down", "q", "v"))
  c.trainable = (r"/router/", r"^llm/lm_head", r"^llm/embed_tokens", r"^sam/mask_decoder/",
                 r"^text_hidden_fcs/", r"^region_adapter/")
  c.loss.update(ce=1.0, dice=0.5, bce=2.0, focal=0.0, iou=0.0)
  c.optim.update(lr=3e-4, epochs=3)
  if size == "7b":
    c.data.max_length = 1024
    # Route each data-parallel shard's sequences on their own (DeepSpeed gates per rank): expert
    # buffers and work then stay per-device instead of spanning the global batch.
    c.model.moe.routing_groups = 0
  return c
