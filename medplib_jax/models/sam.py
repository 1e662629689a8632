"""SAM-Med2D (or stock SAM) as one Linen model: `image_encoder`, `prompt_encoder`, `mask_decoder`.

Encode once, prompt many times: `encode_image` gives a reusable image embedding; `decode` takes N
prompts, each naming its image by `image_index`, and returns N masks in one call (no Python loop
over prompts).

    model = SamMed2D(config.model.sam)
    params = model.init(rng, images, jnp.zeros([1], jnp.int32))
    emb = model.apply(params, images, method=SamMed2D.encode_image)       # [B, h, w, C]
    logits, iou = model.apply(params, emb, image_index, points=(xy, labels),
                              method=SamMed2D.decode)                      # [N, 1, 4h, 4w], [N, 1]
"""

import flax.linen as nn
import jax.numpy as jnp

from medplib_jax.models.sam_image_encoder import ImageEncoder
from medplib_jax.models.sam_mask_decoder import MaskDecoder
from medplib_jax.models.sam_prompt_encoder import PromptEncoder


class SamMed2D(nn.Module):
  config: object
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.image_encoder = ImageEncoder(self.config, self.dtype, self.param_dtype)
    self.prompt_encoder = PromptEncoder(self.config, self.dtype, self.param_dtype)
    self.mask_decoder = MaskDecoder(self.config, self.dtype, self.param_dtype)

  def encode_image(self, images):
    """SAM-normalised images [B, S, S, 3] -> image embeddings [B, S/16, S/16, C]."""
    return self.image_encoder(images)

  def decode(self, image_embeddings, image_index, points=None, boxes=None, mask_inputs=None,
             extra_sparse=None, multimask_output: bool = False):
    """N prompts against B image embeddings.

    image_embeddings [B, h, w, C]; image_index [N] int32 (the image of each prompt);
    points: (coords [N, P, 2] canvas px (x, y), labels [N, P] int32, -1 = padding point);
    boxes [N, 4] (x0, y0, x1, y1) canvas px; mask_inputs [N, 4h, 4w] logits;
    extra_sparse [N, K, C] extra prompt tokens (MedPLIB's <SEG> projection).
    -> (low-res mask logits [N, K', 4h, 4w], IoU predictions [N, K']), K' = 1 or 3.
    """
    n = image_index.shape[0]
    sparse, dense = self.prompt_encoder(n, points, boxes, mask_inputs, extra_sparse)
    per_prompt = jnp.take(image_embeddings, image_index, axis=0)
    return self.mask_decoder(per_prompt, self.prompt_encoder.dense_pe(), sparse, dense,
                             multimask_output)

  def __call__(self, images, image_index):
    """Touches every parameter (for `init`): one point + box + mask + extra token per prompt."""
    emb = self.encode_image(images)
    n = image_index.shape[0]
    c, grid = self.config.prompt_embed_dim, self.config.image_size // self.config.patch_size
    points = (jnp.zeros((n, 1, 2), jnp.float32), jnp.ones((n, 1), jnp.int32))
    return self.decode(emb, image_index, points, jnp.zeros((n, 4), jnp.float32),
                       jnp.zeros((n, 4 * grid, 4 * grid), jnp.float32),
                       jnp.zeros((n, 1, c), jnp.float32))
