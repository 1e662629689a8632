"""Stage 2 (VQA expert): LoRA r16 on attention and FFN, full lm_head/embeddings/norms/projector.

Data: MeCoVQA-C + MeCoVQA-R (+ public VQA). Usage: medplib train --config configs/stage2_vqa.py:7b
Size demo (`:demo` or `:demo,WORKDIR`, default workdir runs/demo): the demo workdir's VQA and
region turns, from its stage 1; after `make demo`,
medplib train --config configs/stage2_vqa.py:demo --workdir runs/demo/stage2_again
trains its stage 2 again.
"""

from configs import common


def get_config(arg=None):
  size, workdir = common.parse_arg(arg)
  c = common.base_config(stage=2, size=size)
  c.lora = common.lora_config(rank=16, alpha=16.0, dropout=0.05,
                              targets=("q", "k", "v", "o", "gate", "up", "down"))
  # The reference leaves the region adapter frozen here; add r"^region_adapter/" to train it.
  c.trainable = (r"^llm/lm_head", r"^llm/embed_tokens", r"^llm/.*norm", r"^projector/")
  c.loss.update(ce=1.0)
  c.optim.update(lr=1e-4, epochs=3)
  if size == "demo":
    common.demo_data(c, workdir, "train_C_turns", "train_R_turns")
    c.init.previous_stage = common.demo_export(workdir, 1)
    # The demo LLM starts from random weights (common.llm_config): train it whole, not LoRA
    # adapters; and the option SPEC.md offers: train the region adapter with the VQA expert.
    c.lora.rank = 0
    c.trainable += (r"^llm/", r"^region_adapter/")
    common.demo_schedule(c, steps=1200, lr=1e-3)
  return c
