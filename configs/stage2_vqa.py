"""Stage 2 (VQA expert): LoRA r16 on attention and FFN, full lm_head/embeddings/norms/projector.

Data: MeCoVQA-C + MeCoVQA-R (+ public VQA). Usage: medplib train --config configs/stage2_vqa.py:7b
"""

from configs import common


def get_config(arg=None):
  size = common.parse_size(arg)
  c = common.base_config(stage=2, size=size)
  c.lora = common.lora_config(rank=16, alpha=16.0, dropout=0.05,
                              targets=("q", "k", "v", "o", "gate", "up", "down"))
  # The reference leaves the region adapter frozen here; add r"^region_adapter/" to train it.
  c.trainable = (r"^llm/lm_head", r"^llm/embed_tokens", r"^llm/.*norm", r"^projector/")
  c.loss.update(ce=1.0)
  c.optim.update(lr=1e-4, epochs=3)
  return c
