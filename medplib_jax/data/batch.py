"""The fixed-shape training/inference batch: the contract between the input pipeline and the model.

The host does all ragged work once (tokenising, placing the image and region slots, finding
`<SEG>` tokens); the device sees only these arrays, so nothing under `jit` depends on data shapes.
Per sample (a batch adds a leading `B`):

| key              | shape / dtype            | meaning                                                   |
|------------------|--------------------------|-----------------------------------------------------------|
| input_ids        | [L] int32                | token ids; image/region slots hold `pad_id`               |
| attention_mask   | [L] bool                 | True for real tokens (right padding)                      |
| labels           | [L] int32                | next-token targets aligned with input_ids, -100 = ignore  |
| image_start      | [] int32                 | first of G*G consecutive image slots, -1 = no image       |
| clip_image       | [Sc, Sc, 3] float32      | CLIP-normalised canvas (SPEC.md)                          |
| region_positions | [R] int32                | sequence slot of each region token, -1 = none             |
| region_masks     | [R, G, G] bool           | region on the CLIP patch grid (G = Sc / patch)            |
| sam_image        | [Ss, Ss, 3] float32      | SAM-normalised canvas                                     |
| sam_resized_hw   | [2] int32                | size of the image inside the SAM canvas (rest is padding) |
| seg_positions    | [M] int32                | sequence position of each `<SEG>` token, -1 = none        |
| masks            | [M, Ss, Ss] bool         | ground-truth mask of each `<SEG>` on the SAM canvas       |
| orig_hw          | [2] int32                | original image size (for post-processing)                 |

`labels` follow the Hugging Face convention: `labels[t]` is the target for the logits at `t`
after the one-position shift done in the loss (`logits[:, :-1]` vs `labels[:, 1:]`).
Host-only metadata (`id`, `modality`, `task`) travels beside the batch, never to the device.
"""

import numpy as np

IGNORE_INDEX = -100


def patch_grid(vision_cfg) -> int:
  """G, the side of the CLIP patch grid: a region mask is [G, G] and an image takes G*G slots.

  The data package cannot import the vision tower (models/clip.py `num_image_tokens`), so it
  reads the geometry from the config; the model checks that its features fill exactly G*G slots.
  """
  return vision_cfg.image_size // vision_cfg.patch_size


def batch_spec(model_cfg, max_length: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shapes and dtypes of one sample's arrays (see the module docstring)."""
  sc = model_cfg.vision.image_size
  g = patch_grid(model_cfg.vision)
  ss = model_cfg.sam.image_size
  r = model_cfg.region.max_regions
  m = model_cfg.grounding.max_masks
  return {
      "input_ids": ((max_length,), np.int32),
      "attention_mask": ((max_length,), np.bool_),
      "labels": ((max_length,), np.int32),
      "image_start": ((), np.int32),
      "clip_image": ((sc, sc, 3), np.float32),
      "region_positions": ((r,), np.int32),
      "region_masks": ((r, g, g), np.bool_),
      "sam_image": ((ss, ss, 3), np.float32),
      "sam_resized_hw": ((2,), np.int32),
      "seg_positions": ((m,), np.int32),
      "masks": ((m, ss, ss), np.bool_),
      "orig_hw": ((2,), np.int32),
  }


def empty_sample(model_cfg, max_length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """A sample with nothing in it (all slots invalid); used for padding a final partial batch."""
  out = {k: np.zeros(s, d) for k, (s, d) in batch_spec(model_cfg, max_length).items()}
  out["input_ids"][:] = pad_id
  out["labels"][:] = IGNORE_INDEX
  out["image_start"] = np.array(-1, np.int32)
  out["region_positions"][:] = -1
  out["seg_positions"][:] = -1
  return out
