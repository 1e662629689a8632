"""Masks per second for 16 prompts on one image: our batched `SamMed2D.decode` (one jitted call)
vs the reference's pattern, a per-prompt loop over torch `SamModel` (prompt encoder + mask decoder
per prompt, image embedding computed once). Same random tiny weights (configs sam_config("tiny")
sizes), CPU, fp32.

    .venv/bin/python bench/bench_sam.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One compute thread for XLA, as torch gets below: like for like (the decoder's ops are small, and
# XLA:CPU's thread pool mostly adds synchronisation to them).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.harness import compare, write_result  # noqa: E402
from configs.common import sam_config  # noqa: E402
from medplib_jax.checkpoint.sam import load_sam  # noqa: E402
from medplib_jax.models.sam import SamMed2D  # noqa: E402

NUM_PROMPTS = 16


def tiny_hf_sam(cfg):
  from transformers import SamConfig, SamModel
  from transformers.models.sam.configuration_sam import (SamMaskDecoderConfig,
                                                         SamPromptEncoderConfig, SamVisionConfig)
  vision = SamVisionConfig(hidden_size=cfg.width, output_channels=cfg.out_chans,
                           num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                           image_size=cfg.image_size, patch_size=cfg.patch_size,
                           mlp_dim=cfg.mlp_dim, window_size=cfg.window_size,
                           global_attn_indexes=list(cfg.global_attn_indexes),
                           num_pos_feats=cfg.prompt_embed_dim // 2)
  prompt = SamPromptEncoderConfig(hidden_size=cfg.prompt_embed_dim, image_size=cfg.image_size,
                                  patch_size=cfg.patch_size, mask_input_channels=cfg.mask_in_chans)
  decoder = SamMaskDecoderConfig(hidden_size=cfg.prompt_embed_dim, mlp_dim=cfg.decoder_mlp_dim,
                                 num_hidden_layers=cfg.decoder_depth,
                                 num_attention_heads=cfg.decoder_num_heads,
                                 iou_head_hidden_dim=cfg.iou_head_hidden_dim, layer_norm_eps=1e-5)
  torch.manual_seed(0)
  return SamModel(SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                            mask_decoder_config=decoder.to_dict())).eval()


def main():
  torch.set_num_threads(1)
  cfg = sam_config("tiny").copy_and_resolve_references()
  cfg.adapter = False  # stock SAM layout, so the torch SamModel holds the same weights
  hf = tiny_hf_sam(cfg)
  params, report = load_sam({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
  assert not report["unmapped"], report
  params = jax.device_put({"params": params})  # weights live on the device, as torch's do
  model = SamMed2D(cfg)

  rng = np.random.default_rng(0)
  image = rng.normal(size=(1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  coords = rng.uniform(0, cfg.image_size, size=(NUM_PROMPTS, 1, 2)).astype(np.float32)
  labels = np.ones((NUM_PROMPTS, 1), np.int32)

  emb = jax.jit(lambda p, x: model.apply(p, x, method=SamMed2D.encode_image))(params, image)
  decode = jax.jit(lambda p, e, i, c, l: model.apply(p, e, i, points=(c, l),
                                                     method=SamMed2D.decode))
  index = jnp.zeros((NUM_PROMPTS,), jnp.int32)
  with torch.no_grad():
    t_emb = hf.get_image_embeddings(torch.from_numpy(image).permute(0, 3, 1, 2))
  t_coords, t_labels = torch.from_numpy(coords), torch.from_numpy(labels)

  def ours():
    return jax.block_until_ready(decode(params, emb, index, coords, labels))

  def reference():
    with torch.no_grad():
      return [hf(image_embeddings=t_emb, input_points=t_coords[i][None, None],
                 input_labels=t_labels[i][None, None], multimask_output=False).pred_masks
              for i in range(NUM_PROMPTS)]

  ours_masks = np.asarray(ours()[0])
  ref_masks = np.stack([m[0, 0, 0].numpy() for m in reference()])
  max_diff = float(np.abs(ours_masks[:, 0] - ref_masks).max())

  timings = compare({"jax_batched": ours, "torch_per_prompt_loop": reference}, reps=10, warmup=2)
  ratio = timings["torch_per_prompt_loop"]["median_s"] / timings["jax_batched"]["median_s"]
  path = write_result(
      "sam_prompts",
      what=f"{NUM_PROMPTS} point prompts on one precomputed image embedding -> {NUM_PROMPTS} masks",
      command="python bench/bench_sam.py",
      inputs={"config": "sam_config('tiny') without adapters", "num_prompts": NUM_PROMPTS,
              "image_size": cfg.image_size, "prompt_embed_dim": cfg.prompt_embed_dim,
              "dtype": "float32", "device": "CPU", "threads": "1 (XLA and torch)"},
      timings=timings, ratio=ratio,
      ratio_means="torch per-prompt loop time / our batched call time (higher = ours faster)",
      goal=">= 5",
      extra={"masks_per_s_jax": NUM_PROMPTS / timings["jax_batched"]["median_s"],
             "masks_per_s_torch": NUM_PROMPTS / timings["torch_per_prompt_loop"]["median_s"],
             "max_abs_logit_diff": max_diff})
  print(f"ratio {ratio:.1f}x, max |logit diff| {max_diff:.2e} -> {path}")


if __name__ == "__main__":
  main()
