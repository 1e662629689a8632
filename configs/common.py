"""Shared MedPLIB definitions for every stage config: model sizes, mesh, sharding rules, data.

Each stage file (`stage1_align.py` ... `stage4_moe.py`) calls `base_config(stage, size)` and then
sets only what differs for its stage (trainable set, LoRA, losses, optimiser). Sizes:

* ``7b``   exactly the published MedPLIB-7B (SPEC.md): CLIP ViT-L/14-336, LLaMA-7B, SAM-Med2D ViT-B.
* ``tiny`` the same structure at toy widths, for CPU tests.
* ``demo`` ``tiny`` with the larger CLIP tower and LLM that ``medplib demo`` (``make demo``) trains,
  and the demo's data, steps and learning rates; its paths are those of the demo's workdir
  layout, ``runs/demo`` unless the config arg names another: ``configs/stage2_vqa.py:demo`` or
  ``configs/stage2_vqa.py:demo,runs/mydemo``. After ``make demo``,
  ``medplib train --config configs/stage2_vqa.py:demo --workdir runs/demo/stage2_again`` trains
  its stage 2 again (``--workdir runs/demo/stage2`` resumes the finished run).
"""

import os

import ml_collections

from medplib_jax.data.tokenizer import ADDED_TOKENS

SIZES = ("tiny", "demo", "7b")
# `medplib demo`'s default --workdir. Its layout (medplib_jax/demo/run.py writes it): data/ (images,
# data/tasks/<name>.json per task), tokenizer/, standin_clip/ and standin_sam/ (the pretrained
# encoders' stand-ins), stageN/export (each stage's model).
DEMO_WORKDIR = "runs/demo"

LLAMA_BASE_VOCAB = 32000

# Logical axis name -> mesh axes. Parameters use the plain names; activations the `act_` ones and
# `batch` / `length`. Changing the parallelism is changing this table (or overriding it).
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
    ("act_exp", "expert"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("exp", "expert"),
    ("layers", None),
)


def parse_size(arg):
  size = (arg or "tiny").strip()
  if size not in SIZES:
    raise ValueError(f"unknown model size {size!r}; choose one of {SIZES} (e.g. configs/stage2_vqa.py:7b)")
  return size


def parse_arg(arg):
  """A stage file's config arg: `SIZE`, or `demo,WORKDIR` (size demo over another demo workdir)
  -> (size, the demo workdir: DEMO_WORKDIR for plain `demo`, "" for the other sizes)."""
  size, comma, workdir = (arg or "tiny").partition(",")
  size = parse_size(size)
  if size != "demo":
    if comma:
      raise ValueError(f"config arg {arg!r}: only size demo takes a workdir (demo,WORKDIR)")
    return size, ""
  return size, workdir.strip() or DEMO_WORKDIR


def demo_data(c, workdir, *train):
  """Size demo: read the data and tokenizer of the demo workdir; `train` names its
  data/tasks/<name>.json files. Its `*_turns` files hold each image's training questions of one
  task packed into multi-turn conversations, as MeCoVQA's are (demo/run.py pack_turns), so the
  image tokens are read once for several answers."""
  data_dir = os.path.join(workdir, "data")
  c.data.update(train=tuple(os.path.join(data_dir, "tasks", f"{name}.json") for name in train),
                image_root=data_dir, tokenizer=os.path.join(workdir, "tokenizer"))


def demo_export(workdir, stage):
  """Size demo: stage `stage`'s model directory in the demo workdir."""
  return os.path.join(workdir, f"stage{stage}", "export")


def demo_schedule(c, steps, lr):
  """Size demo: `steps` steps at peak `lr` after a 5 % warmup; one checkpoint, at the end."""
  c.optim.update(lr=lr, warmup_ratio=0.05)
  c.train.update(steps=steps, checkpoint_every=steps)


def vision_config(size):
  """CLIP vision tower (frozen in every stage)."""
  if size == "7b":
    return ml_collections.ConfigDict(dict(
        image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
        layer_norm_eps=1e-5, select_layer=-2))
  c = ml_collections.ConfigDict(dict(
      image_size=112, patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=256,
      layer_norm_eps=1e-5, select_layer=-2))
  if size == "demo":
    # Deeper and wider than the `tiny` test tower (3 computed layers of width 128 instead of 1 of
    # 64), so its frozen patch features can tell a small lesion from the organs around it; the
    # LLM cannot answer lesion questions from features that do not.
    c.update(width=128, depth=4, num_heads=4, mlp_dim=512)
  return c


def llm_config(size):
  """LLaMA decoder. vocab_size already includes the added MedPLIB tokens. kernels: the backend
  kernel set (medplib_jax/models/kernels.py): "auto" (the running backend's), "cpu", "gpu", "tpu"."""
  if size == "7b":
    return ml_collections.ConfigDict(dict(
        vocab_size=LLAMA_BASE_VOCAB + len(ADDED_TOKENS), width=4096, depth=32, num_heads=32,
        num_kv_heads=32, head_dim=128, mlp_dim=11008, norm_eps=1e-5, rope_theta=10000.0,
        max_length=2048, scan_layers=True, remat_policy="nothing_saveable", kernels="auto"))
  # The tiny vocabulary is the synthetic tokenizer's (base 1000 + added tokens).
  c = ml_collections.ConfigDict(dict(
      vocab_size=1000 + len(ADDED_TOKENS), width=128, depth=2, num_heads=4, num_kv_heads=4,
      head_dim=32, mlp_dim=344, norm_eps=1e-5, rope_theta=10000.0, max_length=512,
      scan_layers=True, remat_policy="none", kernels="auto"))
  if size == "demo":
    # Wider and deeper than the `tiny` test LLM. It starts from random weights (no pretrained
    # LLaMA is reachable), so stage 2 trains all of it rather than LoRA adapters on a pretrained
    # base; with LoRA or at 2 x 128 it did not learn to find lesions in the image tokens.
    c.update(width=256, depth=4, num_heads=8, num_kv_heads=8, head_dim=32, mlp_dim=688)
  return c


def moe_config(num_experts=1):
  """Mixture-of-Experts FFN (DeepSpeed TopKGate semantics). num_experts=1 means a dense FFN."""
  return ml_collections.ConfigDict(dict(
      num_experts=num_experts, top_k=1, dispatch="capacity",  # or "dropless"
      capacity_factor_train=1.5, capacity_factor_eval=2.0, min_capacity=4,
      random_token_selection=True, aux_loss_coef=0.0, expert_axis="expert",
      # Routing groups: contiguous blocks of the batch routed (capacity included) on their own.
      # 1 = the whole batch; 0 = one group per batch shard of the mesh (DeepSpeed's per-rank gate).
      routing_groups=1,
      # Inference layout (set by MedPLIB.from_pretrained): experts as separate params.
      split_experts=False))


# Stock segment_anything image encoders at 1024 px (no adapters), so original SAM weights load too.
_STOCK_SAM = {
    "sam_vit_b": dict(width=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "sam_vit_l": dict(width=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "sam_vit_h": dict(width=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def sam_config(size):
  """SAM-Med2D: image encoder with adapters, prompt encoder, mask decoder.

  `size` is a model size, or one of "sam_vit_b" / "sam_vit_l" / "sam_vit_h" (stock SAM, 1024 px).
  """
  if size in _STOCK_SAM:
    stock = _STOCK_SAM[size]
    return ml_collections.ConfigDict(dict(
        image_size=1024, patch_size=16, mlp_dim=4 * stock["width"], window_size=14,
        use_rel_pos=True, adapter=False, adapter_dim=0, out_chans=256, prompt_embed_dim=256,
        decoder_depth=2, decoder_mlp_dim=2048, decoder_num_heads=8, num_multimask_outputs=3,
        iou_head_depth=3, iou_head_hidden_dim=256, mask_in_chans=16, **stock))
  if size == "7b":
    return ml_collections.ConfigDict(dict(
        image_size=256, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
        window_size=14, global_attn_indexes=(2, 5, 8, 11), use_rel_pos=True, adapter=True,
        adapter_dim=192, out_chans=256, prompt_embed_dim=256, decoder_depth=2,
        decoder_mlp_dim=2048, decoder_num_heads=8, num_multimask_outputs=3, iou_head_depth=3,
        iou_head_hidden_dim=256, mask_in_chans=16))
  return ml_collections.ConfigDict(dict(  # tiny and demo
      # patch 8 (not 16): a 16x16 embedding grid, so 128-px masks keep usable detail.
      image_size=128, patch_size=8, width=64, depth=2, num_heads=2, mlp_dim=256,
      window_size=4, global_attn_indexes=(1,), use_rel_pos=True, adapter=True, adapter_dim=16,
      out_chans=32, prompt_embed_dim=32, decoder_depth=2, decoder_mlp_dim=128,
      decoder_num_heads=2, num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=32,
      mask_in_chans=16))


def model_config(size, num_experts=1):
  """The whole MedPLIB model for one size."""
  # The demo trains on multi-turn conversations (up to 2 region / 2 grounding rounds, demo/run.py
  # MAX_TURNS): a region and a mask slot per round.
  slots = 2 if size == "demo" else 1
  return ml_collections.ConfigDict(dict(
      size=size,
      vision=vision_config(size),
      projector=ml_collections.ConfigDict(dict(type="mlp2x_gelu")),
      region=ml_collections.ConfigDict(dict(max_points=512, max_regions=slots)),
      llm=llm_config(size),
      moe=moe_config(num_experts),
      sam=sam_config(size),
      grounding=ml_collections.ConfigDict(dict(max_masks=slots)),
      dtype="bfloat16" if size == "7b" else "float32",
      param_dtype="float32",
  ))


def lora_config(rank=0, alpha=16.0, dropout=0.05, targets=()):
  """LoRA adapters; rank 0 means no LoRA in this stage."""
  return ml_collections.ConfigDict(dict(rank=rank, alpha=alpha, dropout=dropout, targets=tuple(targets)))


def base_config(stage, size):
  """Fields common to every stage; the stage file fills in the rest."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.model = model_config(size, num_experts=2 if stage == 4 else 1)
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.logical_axis_rules = LOGICAL_AXIS_RULES
  c.lora = lora_config()
  c.trainable = ()  # parameter-path regexes; everything else is frozen
  c.loss = ml_collections.ConfigDict(dict(
      ce=1.0, dice=0.0, bce=0.0, focal=0.0, iou=0.0,
      # Mask losses (train/losses.py): "canvas" (default: static shapes, memory bounded by the SAM
      # canvas) or "original", MedPLIB's own per-mask losses at the image's original size, the
      # logits post-processed as mask_postprocess says ("reference": MedPLIB's postprocess_masks;
      # "correct": the canvas crop, as the evaluation's two modes). "original" needs batches with
      # masks_orig, each mask in a data.max_mask_hw square buffer.
      mask_resolution="canvas", mask_postprocess="reference"))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.0, warmup_ratio=0.03, schedule="linear",
      grad_clip=1.0, epochs=1, global_batch_size=128 if size == "7b" else 8,
      grad_accum_steps=1))
  c.data = ml_collections.ConfigDict(dict(
      train=(), image_root="", tokenizer="", max_length=c.model.llm.max_length, seed=0,
      num_workers=0, bad_record_budget=100, template="llava_v1",
      overflow="skip",  # a sample past max_length: "skip" (a bad record) or "truncate" (counted)
      # grain read threads and elements read ahead per worker (0 = two host batches); grain's
      # default (16 threads, 500 ahead) holds ~1 GB of 7B-size samples per worker.
      read_threads=2, prefetch=0,
      # loss.mask_resolution="original": the side of each sample's original-size mask buffer
      # (masks_orig); a record with masks on a larger image is skipped as a bad record.
      max_mask_hw=1024))
  c.train = ml_collections.ConfigDict(dict(
      steps=-1, log_every=10, checkpoint_every=500, keep_checkpoints=3, on_nonfinite="skip",
      checkpoint_fallback=True))  # an unreadable latest checkpoint: resume from the one before
  c.init = ml_collections.ConfigDict(dict(clip="", llm="", sam="", previous_stage="",
                                          vqa_expert="", ground_expert=""))
  if size == "demo":
    c.data.max_length = 136  # the demo's longest packed training conversation is 125 tokens
  return c
