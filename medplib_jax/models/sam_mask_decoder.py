"""SAM mask decoder: IoU token + mask tokens through the two-way transformer, x4 upscaling,
per-token hypernetwork MLPs, and the IoU head (segment_anything's `MaskDecoder`)."""

import flax.linen as nn
import jax.numpy as jnp

from medplib_jax.models.sam_layers import MLP, ConvTranspose, layer_norm, partitioned
from medplib_jax.models.sam_transformer import TwoWayTransformer

UPSCALE_LN_EPS = 1e-6


class MaskDecoder(nn.Module):
  """Decodes N prompts, each against its own (already gathered) image embedding."""
  config: object
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, image_embeddings, image_pe, sparse, dense, multimask_output: bool = False):
    """image_embeddings [N, h, w, C], image_pe [h, w, C], sparse [N, T, C], dense [N, h, w, C]
    -> (low-res mask logits [N, K, 4h, 4w], IoU predictions [N, K]); K = 1 or num_multimask_outputs.
    """
    cfg = self.config
    c = cfg.prompt_embed_dim
    num_mask_tokens = cfg.num_multimask_outputs + 1
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb_init = partitioned(nn.initializers.normal(1.0), (None, "embed"))
    iou_token = self.param("iou_token", emb_init, (1, c), self.param_dtype)
    mask_tokens = self.param("mask_tokens", emb_init, (num_mask_tokens, c), self.param_dtype)

    n, h, w, _ = image_embeddings.shape
    output_tokens = jnp.concatenate([iou_token, mask_tokens], axis=0).astype(self.dtype)
    tokens = jnp.concatenate(
        [jnp.broadcast_to(output_tokens, (n,) + output_tokens.shape), sparse.astype(self.dtype)],
        axis=1)
    src = (image_embeddings + dense).astype(self.dtype).reshape(n, h * w, c)
    pos = image_pe.astype(self.dtype).reshape(1, h * w, c)
    hs, src = TwoWayTransformer(cfg.decoder_depth, cfg.decoder_num_heads, cfg.decoder_mlp_dim,
                                name="transformer", **kw)(tokens, src, pos)
    iou_token_out = hs[:, 0]
    mask_tokens_out = hs[:, 1:1 + num_mask_tokens]

    up = ConvTranspose(c // 4, 2, 2, name="upscale_conv1", **kw)(src.reshape(n, h, w, c))
    up = nn.gelu(layer_norm(UPSCALE_LN_EPS, "upscale_norm", self.dtype, self.param_dtype)(up),
                 approximate=False)
    up = nn.gelu(ConvTranspose(c // 8, 2, 2, name="upscale_conv2", **kw)(up), approximate=False)
    # One hypernetwork MLP per mask token (a static loop over the 1 + 3 tokens, not over prompts).
    hyper_in = jnp.stack([MLP(c, c // 8, 3, name=f"hypernet_{i}", **kw)(mask_tokens_out[:, i])
                          for i in range(num_mask_tokens)], axis=1)  # [N, M, C/8]
    masks = jnp.einsum("nmc,nyxc->nmyx", hyper_in, up)
    iou_pred = MLP(cfg.iou_head_hidden_dim, num_mask_tokens, cfg.iou_head_depth, name="iou_head",
                   **kw)(iou_token_out)
    picked = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, picked], iou_pred[:, picked]
