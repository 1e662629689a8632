"""Record -> one fixed-shape sample of the batch contract (medplib_jax/data/batch.py), on the host.

`build_sample` decodes the image and masks, tokenises the conversation with its template, expands
the image placeholder into G*G consecutive slots and the region placeholder into one
slot (both holding `pad_id`, labels -100), places the CLIP and SAM canvases (canvas.py), puts each
region mask on the CLIP patch grid and each ground-truth mask on the SAM canvas, and pads all
arrays to their fixed shapes with -1 / False for unused slots.

Region masks on the patch grid follow the reference: the mask is resized onto the CLIP canvas
(bilinear, >= 1 kept), then sampled every `patch` pixels (cv2 INTER_NEAREST at 1/14 picks rows/cols
0, 14, 28, ...), exactly as `prompts.region_grid` does at inference. In
training a random sub-region of the largest connected component is used as the prompt (SPEC.md);
the reference grows it by a randomised 8-connected depth-first walk from a random cell up to a
random 20-100 % of the component's area, leaving components under 10 cells whole.
"""

import dataclasses

import numpy as np
from scipy import ndimage

from medplib_jax.data import canvas
from medplib_jax.data.prompts import region_grid
from medplib_jax.data.batch import IGNORE_INDEX, batch_spec, patch_grid
from medplib_jax.data.mecovqa import (DEFAULT_MAX_PIXELS, BadRecord, DecodedExample, RawExample,
                                      decode_raw, load_raw)
from medplib_jax.data.template import ConversationError, tokenize_conversation
from medplib_jax.data.tokenizer import IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX

SUB_REGION_MIN_FRACTION = 0.2
SUB_REGION_MAX_FRACTION = 1.0
SUB_REGION_MIN_CELLS = 10


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
  template: str = "llava_v1"
  overflow: str = "skip"  # "skip": too_long is a bad record; "truncate": cut, and count it
  max_pixels: int = DEFAULT_MAX_PIXELS


def region_on_grid(mask: np.ndarray, clip_size: int, patch: int) -> np.ndarray:
  """bool [H, W] -> bool [G, G] on the CLIP patch grid (G = clip_size / patch); the same mapping
  as inference (`prompts.region_grid`: bilinear resize as the reference, centred pad, nearest)."""
  return region_grid(mask, clip_size, clip_size // patch)


def sub_region(grid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A random connected sub-region of the largest 8-connected component of `grid` (bool [G, G])."""
  labels, n = ndimage.label(grid, structure=np.ones((3, 3), bool))
  if n == 0:
    return grid.copy()
  areas = np.bincount(labels.ravel())[1:]
  component = labels == (int(np.argmax(areas)) + 1)
  area = int(areas.max())
  if area <= SUB_REGION_MIN_CELLS:  # the reference's `<` loops forever at exactly the minimum
    return component
  target = 0
  while target < SUB_REGION_MIN_CELLS:
    target = int(area * rng.uniform(SUB_REGION_MIN_FRACTION, SUB_REGION_MAX_FRACTION))
  cells = np.argwhere(component)
  out = np.zeros_like(component)
  stack = [tuple(cells[rng.integers(len(cells))])]
  count = 0
  h, w = component.shape
  offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
  while stack:
    y, x = stack.pop()
    if not out[y, x]:
      out[y, x] = True
      count += 1
    if count >= target:
      break
    for k in rng.permutation(len(offsets)):
      ny, nx = y + offsets[k][0], x + offsets[k][1]
      if 0 <= ny < h and 0 <= nx < w and component[ny, nx] and not out[ny, nx]:
        stack.append((ny, nx))
  return out


def _expand(ids: list[int], labels: list[int], n_image: int, pad_id: int):
  """Placeholders -> slots: the image into n_image pad slots, each region into one pad slot."""
  out_ids, out_labels, image_start, regions = [], [], -1, []
  for t, lab in zip(ids, labels):
    if t == IMAGE_TOKEN_INDEX:
      if image_start >= 0:
        raise BadRecord("malformed", "conversations", "more than one <image> in the conversation")
      image_start = len(out_ids)
      out_ids += [pad_id] * n_image
      out_labels += [IGNORE_INDEX] * n_image
    elif t == REGION_TOKEN_INDEX:
      regions.append(len(out_ids))
      out_ids.append(pad_id)
      out_labels.append(IGNORE_INDEX)
    else:
      out_ids.append(t)
      out_labels.append(lab)
  return out_ids, out_labels, image_start, regions


def _decoded(record, image_root, max_pixels) -> DecodedExample:
  if isinstance(record, DecodedExample):
    return record
  raw = record if isinstance(record, RawExample) else load_raw(record, image_root)
  return decode_raw(raw, max_pixels)


def build_sample(record, tokenizer, model_cfg, max_length: int, image_root: str = "",
                 rng: np.random.Generator | None = None, train: bool = True,
                 options: PreprocessOptions = PreprocessOptions()):
  """One record -> (sample dict exactly per batch.batch_spec, host-only meta dict).

  `record` is a MeCoVQA JSON record (files read from `image_root`), a RawExample (e.g. from the
  TFDS dataset) or a DecodedExample. `rng` drives the training region augmentation (seeded per
  record by the pipeline). Raises BadRecord with a named reason for bad input.
  """
  ex = _decoded(record, image_root, options.max_pixels)
  raw = ex.raw
  try:
    tok = tokenize_conversation(raw.conversations, tokenizer, options.template)
  except ConversationError as e:
    raise BadRecord("malformed", "conversations", str(e)) from e
  # One slot per CLIP patch feature (models/clip.py num_image_tokens); the model checks the count.
  n_image = patch_grid(model_cfg.vision) ** 2
  ids, labels, image_start, region_pos = _expand(tok.input_ids, tok.labels, n_image,
                                                 tokenizer.pad_id)
  if (image_start >= 0) != (ex.image is not None):
    raise BadRecord("malformed", "image", "an image needs exactly one <image> in the conversation"
                    if ex.image is not None else "<image> in the conversation but no image file")
  if len(region_pos) != len(ex.regions):
    raise BadRecord("region_without_file", "conversations",
                    f"{len(region_pos)} <region></region> slots but {len(ex.regions)} region files")
  seg_pos = [i for i, t in enumerate(ids) if t == tokenizer.seg_id]
  if len(seg_pos) != len(ex.masks):
    raise BadRecord("seg_without_mask", "conversations",
                    f"{len(seg_pos)} <SEG> tokens but {len(ex.masks)} masks")
  max_regions, max_masks = model_cfg.region.max_regions, model_cfg.grounding.max_masks
  if len(region_pos) > max_regions or len(seg_pos) > max_masks:
    raise BadRecord("malformed", "conversations",
                    f"{len(region_pos)} regions / {len(seg_pos)} masks exceed the model's "
                    f"{max_regions} / {max_masks}")
  truncated = len(ids) > max_length
  if truncated:
    if options.overflow != "truncate" or image_start + n_image > max_length:
      raise BadRecord("too_long", "conversations",
                      f"{len(ids)} tokens (with {n_image if image_start >= 0 else 0} image slots) "
                      f"> max_length {max_length}")
    ids, labels = ids[:max_length], labels[:max_length]

  spec = batch_spec(model_cfg, max_length)
  s = {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.items()}
  n = len(ids)
  s["input_ids"][:] = tokenizer.pad_id
  s["input_ids"][:n] = ids
  s["attention_mask"][:n] = True
  s["labels"][:] = IGNORE_INDEX
  s["labels"][:n] = labels
  s["image_start"] = np.array(image_start, np.int32)
  s["region_positions"][:] = -1
  s["seg_positions"][:] = -1

  sc, patch, ss = model_cfg.vision.image_size, model_cfg.vision.patch_size, model_cfg.sam.image_size
  meta = {"id": raw.id, "modality": raw.modality, "task": raw.task,
          "answer_type": raw.answer_type, "prompt": tok.prompt, "mismatch": tok.mismatch,
          "truncated": truncated, "length": n}
  if ex.image is not None:
    s["clip_image"], _ = canvas.clip_canvas(ex.image, sc)
    s["sam_image"], geo = canvas.sam_canvas(ex.image, ss)
    s["sam_resized_hw"][:] = geo.resized_hw
    s["orig_hw"][:] = ex.image.shape[:2]
  for i, (pos, region) in enumerate(zip(region_pos, ex.regions)):
    if pos >= max_length:
      continue
    grid = region_on_grid(region, sc, patch)
    if train:
      grid = sub_region(grid, rng if rng is not None else np.random.default_rng())
    s["region_positions"][i] = pos
    s["region_masks"][i] = grid
  for i, (pos, mask) in enumerate(zip(seg_pos, ex.masks)):
    if pos >= max_length:
      continue
    s["seg_positions"][i] = pos
    s["masks"][i] = canvas.mask_canvas(mask, ss)
  if not train:
    meta["masks_orig"] = list(ex.masks)  # evaluation compares at the original size
    meta["answers"] = [t["value"] for t in raw.conversations if t["from"] == "gpt"]
  return s, meta
