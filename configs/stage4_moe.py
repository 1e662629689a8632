"""Stage 4 (MoE fine-tune): 2 experts per FFN (expert 0 = stage-3 FFN, expert 1 = stage-2 FFN).

LoRA r8/a16 on the experts' gate/up/down and q, v; full router, lm_head, embeddings, mask decoder,
text_hidden_fcs and region adapter. Data: all of MeCoVQA, max length 1024.
Usage: medplib train --config configs/stage4_moe.py:7b
Size demo (`:demo` or `:demo,WORKDIR`, default workdir runs/demo): all of the demo workdir's
turns, experts from its stages 3 and 2; after `make demo`,
medplib train --config configs/stage4_moe.py:demo --workdir runs/demo/stage4_again
trains its stage 4 again.
"""

from configs import common


def get_config(arg=None):
  size, workdir = common.parse_arg(arg)
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
  if size == "demo":
    common.demo_data(c, workdir, "train_C_turns", "train_R_turns", "train_G_turns")
    c.init.update(ground_expert=common.demo_export(workdir, 3),
                  vqa_expert=common.demo_export(workdir, 2))
    common.demo_schedule(c, steps=700, lr=5e-4)
  return c
