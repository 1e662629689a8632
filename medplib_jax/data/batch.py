"""The fixed-shape training/inference batch: the contract between the input pipeline and the model.

The host does all ragged work once (tokenising, placing the image and region slots, finding
`<SEG>` tokens); the device sees only these arrays, so nothing under `jit` depends on data shapes.
Per sample (a batch adds a leading `B`):

| key              | shape / dtype            | meaning                                                   |
|------------------|--------------------------|-----------------------------------------------------------|
| input_ids        | [L] int32                | token ids; image/region slots hold `pad_id`               |
| attention_mask   | [L] bool                 | True for real tokens                                      |
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
| masks_orig       | [M, Hm, Hm] bool         | only when `mask_hw` = Hm > 0 (loss.mask_resolution        |
|                  |                          | "original"): each mask at its original size, top-left;    |
|                  |                          | orig_hw says how much of the buffer is real               |

`labels` follow the Hugging Face convention: `labels[t]` is the target for the logits at `t`
after the one-position shift done in the loss (`logits[:, :-1]` vs `labels[:, 1:]`).
Host-only metadata (`id`, `modality`, `task`) travels beside the batch, never to the device.

`collate` is the one way samples become these arrays, for training (right padding), evaluation
and inference (left padding, so every prompt ends where generation starts).
"""

from collections.abc import Mapping, Sequence

import numpy as np

IGNORE_INDEX = -100
PADDING_SIDES = ("right", "left")
# Keys holding sequence positions (-1 = none): they move with the tokens under left padding.
POSITION_KEYS = ("image_start", "region_positions", "seg_positions")
# Keys with one entry per region / mask: a sample may give fewer than the spec's R / M.
LIST_KEYS = ("region_positions", "region_masks", "seg_positions", "masks", "masks_orig")


def patch_grid(vision_cfg) -> int:
  """G, the side of the CLIP patch grid: a region mask is [G, G] and an image takes G*G slots.

  The data package cannot import the vision tower (models/clip.py `num_image_tokens`), so it
  reads the geometry from the config; the model checks that its features fill exactly G*G slots.
  """
  return vision_cfg.image_size // vision_cfg.patch_size


def original_mask_hw(config) -> int:
  """Hm, the side of the masks_orig buffer a training config's batches carry: data.max_mask_hw
  with loss.mask_resolution="original" (train/losses.py), else 0 (no masks_orig)."""
  return int(config.data.max_mask_hw) if config.loss.mask_resolution == "original" else 0


def batch_spec(model_cfg, max_length: int,
               mask_hw: int = 0) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shapes and dtypes of one sample's arrays (see the module docstring); mask_hw > 0 adds
  masks_orig [M, mask_hw, mask_hw]."""
  sc = model_cfg.vision.image_size
  g = patch_grid(model_cfg.vision)
  ss = model_cfg.sam.image_size
  r = model_cfg.region.max_regions
  m = model_cfg.grounding.max_masks
  spec = {
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
  if mask_hw:
    spec["masks_orig"] = ((m, mask_hw, mask_hw), np.bool_)
  return spec


def _token_count(sample: Mapping) -> int:
  """n: the sample's tokens are input_ids[:n] (a right-padded sample says so in its mask)."""
  if "attention_mask" not in sample:
    return len(sample.get("input_ids", ()))
  mask = np.asarray(sample["attention_mask"], bool)
  n = int(mask.sum())
  if not mask[:n].all():
    raise ValueError("a sample's attention_mask must be True on a prefix (its tokens) only")
  return n


def collate(samples: Sequence[Mapping], model_cfg, length: int, pad_id: int,
            padding: str = "right", mask_hw: int = 0) -> dict[str, np.ndarray]:
  """Samples -> one batch: every key of `batch_spec(model_cfg, length, mask_hw)` with a leading B.

  A sample is a mapping with any of the contract's keys; an absent key stays empty (no image, no
  region, no mask, no label), so `{}` is an all-padding sample. Its tokens are `input_ids[:n]`,
  n = the True prefix of `attention_mask` (all of `input_ids` without one), `labels` aligned
  with them; `image_start` / `region_positions` / `seg_positions` index those tokens, and the
  per-region / per-mask lists may be shorter than R / M. padding="right" puts the tokens at 0,
  "left" ends them at `length`, and the positions move with them. A sample's masks_orig
  [k, H, W] (its masks at the original size) goes top-left into the [M, Hm, Hm] buffer.
  """
  if padding not in PADDING_SIDES:
    raise ValueError(f"padding must be one of {PADDING_SIDES}, got {padding!r}")
  spec = batch_spec(model_cfg, length, mask_hw)
  batch = {k: np.zeros((len(samples),) + shape, dtype) for k, (shape, dtype) in spec.items()}
  batch["input_ids"][:] = pad_id
  batch["labels"][:] = IGNORE_INDEX
  for key in POSITION_KEYS:
    batch[key][:] = -1
  for row, sample in enumerate(samples):
    unknown = set(sample) - set(spec)
    if unknown:
      raise ValueError(f"sample keys {sorted(unknown)} are not in the batch contract")
    n = _token_count(sample)
    if n > length:
      raise ValueError(f"a sample of {n} tokens does not fit the batch length {length}")
    offset = length - n if padding == "left" else 0
    tokens = slice(offset, offset + n)
    batch["input_ids"][row, tokens] = np.asarray(sample.get("input_ids", ()))[:n]
    batch["attention_mask"][row, tokens] = True
    if "labels" in sample:
      batch["labels"][row, tokens] = np.asarray(sample["labels"])[:n]
    for key in set(sample) - {"input_ids", "attention_mask", "labels"}:
      value = np.asarray(sample[key])
      if key in POSITION_KEYS:
        value = np.where(value >= 0, value + offset, -1)
      if key in LIST_KEYS:
        if len(value) > spec[key][0][0]:
          raise ValueError(f"{len(value)} {key} exceed the model's {spec[key][0][0]}")
        if key == "masks_orig" and len(value):
          h, w = value.shape[1:]
          if max(h, w) > mask_hw:
            raise ValueError(f"{h}x{w} masks exceed the {mask_hw}x{mask_hw} masks_orig buffer")
          batch[key][row, :len(value), :h, :w] = value
        elif len(value):
          batch[key][row, :len(value)] = value
      else:
        batch[key][row] = value
  return batch
