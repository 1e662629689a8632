"""A tiny MedPLIB model directory for inference / evaluation / serving tests.

`make_tiny_checkpoint(root)` writes what `medplib train` exports at the end of a stage:
`<root>/export/{params, config.json, tokenizer/}` (stage-4 tiny config: MoE LLM, SAM-Med2D), with
random weights and a tokenizer trained on a few sentences. An untrained model answers arbitrary
text, so tests assert contracts, not answers. `write_images(root)` adds small synthetic images.
"""

import os

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

from medplib_jax.data.tokenizer import ADDED_TOKENS
from medplib_jax.config_loading import load_config
from medplib_jax.data.tokenizer import train_tokenizer
from medplib_jax.models.lora import merge_lora
from medplib_jax.checkpoint import model_dir
from medplib_jax.models import medplib
from medplib_jax.train import trainer

_CORPUS = [
    "What modality is this image? It is a CT scan of the abdomen.",
    "Is there a lesion in the liver? yes", "Is there a tumour? no",
    "Please segment the left kidney. Sure, it is <SEG>.",
    "What structure is inside the box <region></region>? The spleen.",
    "Where is the liver located? In the upper left of the image.",
] * 4


def make_tiny_checkpoint(root: str, seed: int = 0) -> str:
  """Writes a tiny random-weight model directory under `root`; returns its path (root/export)."""
  cfg = load_config("configs/stage4_moe.py:tiny", ["--config.data.max_length=96"])
  model = trainer.build_model(cfg)
  rngs = {"params": jax.random.key(seed), **{s: jax.random.key(seed + 1) for s in medplib.RNG_STREAMS}}
  variables = jax.jit(lambda r: model.init(r, medplib.dummy_batch(cfg.model, cfg.data.max_length), deterministic=True))(rngs)
  params = jax.tree.map(np.asarray, nn.unbox(variables["params"]))
  params = merge_lora(params, cfg.lora.alpha / cfg.lora.rank)  # as `medplib train` exports
  path = model_dir.save(os.path.join(root, "export"), params, cfg)
  # The base vocabulary; load_tokenizer appends MedPLIB's tokens up to llm.vocab_size.
  train_tokenizer(_CORPUS, os.path.join(path, "tokenizer"),
                  vocab_size=cfg.model.llm.vocab_size - len(ADDED_TOKENS))
  return path


def write_image(path: str, hw=(60, 90), seed: int = 0) -> str:
  """An RGB PNG of size hw (H, W) with a bright ellipse (non-square on purpose)."""
  rng = np.random.default_rng(seed)
  h, w = hw
  yy, xx = np.mgrid[:h, :w]
  blob = ((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 3) / (w / 6)) ** 2 < 1
  img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
  img[blob] = 200
  Image.fromarray(img).save(path)
  return path
