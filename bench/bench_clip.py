"""CLIP vision tower forward on CPU: ours (jit) vs transformers CLIPVisionModel, same weights.

Width 256 at 336 px (577 tokens), 3 layers, batch 8, features of select_layer -2. The reference
runs the whole tower and reads hidden_states[-2], as LLaVA/MedPLIB do; ours builds and runs only
the layers up to the selected one. For a same-work comparison the torch tower truncated to the
used layers is timed too (`torch_truncated`, in `extra`).

Run: .venv/bin/python bench/bench_clip.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bench.harness import compare, write_result  # noqa: E402
from medplib_jax.checkpoint.clip import load_clip_vision  # noqa: E402
from medplib_jax.models.clip import ClipVisionTower  # noqa: E402

BATCH, IMAGE, PATCH, WIDTH, DEPTH, HEADS, MLP = 8, 336, 14, 256, 3, 4, 1024


def main():
  torch.manual_seed(0)
  hf_cfg = transformers.CLIPVisionConfig(
      hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      image_size=IMAGE, patch_size=PATCH, hidden_act="quick_gelu")
  ref = transformers.CLIPVisionModel(hf_cfg).eval()
  truncated_cfg = transformers.CLIPVisionConfig(**{**hf_cfg.to_dict(), "num_hidden_layers": DEPTH - 1})
  truncated = transformers.CLIPVisionModel(truncated_cfg).eval()
  truncated.load_state_dict(ref.state_dict(), strict=False)
  cfg = ml_collections.ConfigDict(dict(
      image_size=IMAGE, patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP,
      layer_norm_eps=1e-5, select_layer=-2))
  params, _ = load_clip_vision({k: v.numpy() for k, v in ref.state_dict().items()}, cfg)
  tower = ClipVisionTower(cfg)
  forward = jax.jit(tower.apply)

  images = np.random.default_rng(0).normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
  images_j = jax.device_put(images)
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

  def ours():
    return jax.block_until_ready(forward({"params": params}, images_j))

  def torch_full():
    with torch.inference_mode():
      return ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]

  def torch_truncated():
    with torch.inference_mode():
      return truncated(pixel_values=pixels).last_hidden_state[:, 1:]

  max_diff = float(np.abs(np.asarray(ours()) - torch_full().numpy()).max())
  max_diff_trunc = float(np.abs(torch_truncated().numpy() - torch_full().numpy()).max())
  timings = compare({"ours": ours, "torch": torch_full, "torch_truncated": torch_truncated}, reps=5)
  ratio = timings["torch"]["median_s"] / timings["ours"]["median_s"]
  ratio_same = timings["torch_truncated"]["median_s"] / timings["ours"]["median_s"]
  path = write_result(
      "clip_tower", what="CLIP vision tower forward (select_layer -2 features), CPU, fp32",
      command="python bench/bench_clip.py",
      inputs=dict(batch=BATCH, image_size=IMAGE, patch_size=PATCH, width=WIDTH, depth=DEPTH,
                  heads=HEADS, mlp_dim=MLP, select_layer=-2),
      timings=timings, ratio=ratio,
      ratio_means="torch median / ours median (>1: ours faster); torch runs the whole tower as LLaVA does",
      goal="ours at least as fast as transformers on the same weights",
      extra=dict(ratio_vs_torch_truncated=ratio_same, max_abs_diff_vs_torch=max_diff,
                 truncated_equals_full=max_diff_trunc,
                 jax_matmul_precision=str(jax.config.jax_default_matmul_precision)))
  print(f"ours {timings['ours']['median_s']:.3f}s  torch {timings['torch']['median_s']:.3f}s  "
        f"torch_truncated {timings['torch_truncated']['median_s']:.3f}s  ratio {ratio:.2f} "
        f"(same work {ratio_same:.2f})  max|diff| {max_diff:.2e}  -> {path}")


if __name__ == "__main__":
  main()
