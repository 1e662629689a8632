"""MedPLIB: CLIP tower + projector + region encoder + LLaMA (dense or MoE) + `<SEG>` -> SAM-Med2D.

One forward pass of a fixed-shape batch (medplib_jax/data/batch.py) gives everything the losses
need: next-token logits, the `<SEG>` mask logits and IoU predictions, and MoE router statistics.
The multimodal sequence is assembled with static shapes: the tower's `num_image_tokens` patch
features (models/clip.py) go into the slots starting at `image_start`, region tokens into
`region_positions`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medplib_jax.data.batch import batch_spec, patch_grid
from medplib_jax.models.clip import ClipVisionTower, num_image_tokens
from medplib_jax.models.grounding import GroundingProjector
from medplib_jax.models.llama import LlamaForCausalLM
from medplib_jax.models.projector import Projector
from medplib_jax.models.region import region_tokens
from medplib_jax.models.sam import SamMed2D


def splice_image(embeds, image_embeds, image_start):
  """Writes image features into their slots.

  embeds [B, L, D], image_embeds [B, N, D], image_start [B] (-1 = no image) -> [B, L, D].
  """
  n = image_embeds.shape[1]
  offset = jnp.arange(embeds.shape[1])[None, :] - image_start[:, None]  # [B, L]
  in_slot = (offset >= 0) & (offset < n) & (image_start[:, None] >= 0)
  gathered = jnp.take_along_axis(image_embeds, jnp.clip(offset, 0, n - 1)[..., None], axis=1)
  return jnp.where(in_slot[..., None], gathered.astype(embeds.dtype), embeds)


def splice_regions(embeds, tokens, positions, valid):
  """Writes region tokens into their slots.

  embeds [B, L, D], tokens [B, R, D], positions [B, R] (-1 = none), valid [B, R] -> [B, L, D].
  An invalid region (empty mask) leaves the slot's own embedding in place.
  """
  hit = (positions[..., None] == jnp.arange(embeds.shape[1])) & (valid & (positions >= 0))[..., None]
  hit = hit.astype(embeds.dtype)  # [B, R, L]
  written = jnp.einsum("brl,brd->bld", hit, tokens.astype(embeds.dtype))
  return jnp.where(hit.sum(1)[..., None] > 0, written, embeds)


def gather_seg_states(hidden, seg_positions):
  """Last-layer states that predict each `<SEG>` (the position just before it).

  hidden [B, L, D], seg_positions [B, M] (-1 = none) -> (states [B, M, D], valid [B, M]).
  """
  valid = seg_positions > 0
  idx = jnp.clip(seg_positions - 1, 0, hidden.shape[1] - 1)
  return jnp.take_along_axis(hidden, idx[..., None], axis=1), valid


class MedPLIB(nn.Module):
  """The whole model. `config` is the `model` block of a stage config; `lora` its `lora` block."""
  config: Any
  lora: Any

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    param_dtype = jnp.dtype(cfg.param_dtype)
    self.vision = ClipVisionTower(cfg.vision, dtype=dtype, param_dtype=param_dtype)
    self.projector = Projector(cfg.projector.type, cfg.llm.width, dtype=dtype, param_dtype=param_dtype)
    self.region_adapter = nn.Dense(
        cfg.llm.width, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, "embed")))
    self.llm = LlamaForCausalLM(cfg.llm, cfg.moe, self.lora, dtype=dtype, param_dtype=param_dtype)
    self.text_hidden_fcs = GroundingProjector(cfg.sam.prompt_embed_dim, dtype=dtype,
                                              param_dtype=param_dtype)
    self.sam = SamMed2D(cfg.sam, dtype=dtype, param_dtype=param_dtype)

  # --- pieces, each usable through `apply(..., method=...)` -------------------------------------

  def image_features(self, clip_image):
    """clip_image [B, S, S, 3] -> CLIP patch features [B, N, Dv] (frozen tower)."""
    return jax.lax.stop_gradient(self.vision(clip_image))

  def multimodal_embeddings(self, batch, features, deterministic=True):
    """Token embeddings with image features and region tokens spliced in: [B, L, D]."""
    # The samples hold patch_grid**2 image slots (data cannot import the tower's count); checked
    # here, at trace time, so a tower with another count cannot shift every later token.
    grid = patch_grid(self.config.vision)
    if features.shape[1] != grid * grid or num_image_tokens(self.config.vision) != grid * grid:
      raise ValueError(f"the vision tower gives {features.shape[1]} features per image but the "
                       f"samples hold {grid * grid} image slots (a {grid}x{grid} patch grid)")
    embeds = self.llm.embed(batch["input_ids"])
    embeds = splice_image(embeds, self.projector(features), batch["image_start"])
    adapted = self.region_adapter(features).reshape(features.shape[0], grid, grid, -1)
    key = jax.random.key(0) if deterministic else self.make_rng("region")
    tokens, valid = region_tokens(adapted, batch["region_masks"], key, self.config.region.max_points)
    return splice_regions(embeds, tokens, batch["region_positions"], valid)

  def decode_masks(self, sam_image, seg_states):
    """SAM masks for `<SEG>` states.

    sam_image [B, Ss, Ss, 3], seg_states [B, M, D] -> (low-res logits [B, M, h4, w4], iou [B, M]).
    All B*M prompts are decoded in one batched call against their image's embedding.
    """
    b, m = seg_states.shape[:2]
    image_embeddings = jax.lax.stop_gradient(self.sam.encode_image(sam_image))
    prompts = self.text_hidden_fcs(seg_states).reshape(b * m, 1, -1)
    image_index = jnp.repeat(jnp.arange(b, dtype=jnp.int32), m)
    logits, iou = self.sam.decode(image_embeddings, image_index, extra_sparse=prompts,
                                  multimask_output=False)
    return logits[:, 0].reshape(b, m, *logits.shape[-2:]), iou[:, 0].reshape(b, m)

  # --- training forward ------------------------------------------------------------------------

  def __call__(self, batch, deterministic=True):
    """batch: the arrays of data/batch.py with a leading B. Returns a dict:

    logits [B, L, V], hidden [B, L, D], mask_logits [B, M, h4, w4], iou_pred [B, M],
    seg_valid [B, M], moe_aux_loss [], moe_stats {...}.
    """
    features = self.image_features(batch["clip_image"])
    embeds = self.multimodal_embeddings(batch, features, deterministic)
    out = self.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                   deterministic=deterministic)
    seg_states, seg_valid = gather_seg_states(out["hidden"], batch["seg_positions"])
    mask_logits, iou_pred = self.decode_masks(batch["sam_image"], seg_states)
    return dict(logits=out["logits"], hidden=out["hidden"], mask_logits=mask_logits,
                iou_pred=iou_pred, seg_valid=seg_valid, moe_aux_loss=out["moe_aux_loss"],
                moe_stats=out["moe_stats"])


# RNG streams the model draws from when not deterministic (besides "params" at init).
RNG_STREAMS = ("dropout", "router", "region")


def dummy_batch(model_cfg, max_length: int, batch_size: int = 1) -> dict[str, np.ndarray]:
  """Zeros in the batch contract's shapes (data/batch.py): what init and shape tracing take."""
  spec = batch_spec(model_cfg, max_length)
  return {k: np.zeros((batch_size,) + s, d) for k, (s, d) in spec.items()}


def abstract_variables(model: "MedPLIB", max_length: int):
  """Shapes (with logical annotations) of every variable of `model`, nothing allocated."""
  rngs = {"params": jax.random.key(0), **{s: jax.random.key(0) for s in RNG_STREAMS}}
  batch = dummy_batch(model.config, max_length)
  return jax.eval_shape(lambda: model.init(rngs, batch, deterministic=True))
