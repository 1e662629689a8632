"""Conversations -> samples of the batch contract (medplib_jax/data/batch.py), on the host.

`conversation_sample` is the one layout of a conversation, for training and for inference
(`infer/api.py MedPLIB.prepare`): it tokenises the turns with their template (the whole
conversation with its labels, or the prompt that answers the last question), expands the image
placeholder into G*G consecutive slots (one per CLIP patch feature) and each region placeholder
into one slot (both holding `pad_id`, labels -100), places the CLIP and SAM canvases
(canvas.py) and puts each region mask on the CLIP patch grid. `build_sample` turns a training
or evaluation record into one fixed-shape sample: that layout plus the `<SEG>` positions and
their masks on the SAM canvas (and, with `PreprocessOptions.mask_hw`, at their original size in
the masks_orig buffer that loss.mask_resolution="original" reads), the region augmentation, and
padding by `batch.collate`.

Region masks on the patch grid follow the reference: the mask is resized onto the CLIP canvas
(bilinear, >= 1 kept), then sampled every `patch` pixels (cv2 INTER_NEAREST at 1/14 picks rows/cols
0, 14, 28, ...) (`prompts.region_grid`). In training a random sub-region of the largest connected
component is used as the prompt (SPEC.md); the reference grows it by a randomised 8-connected
depth-first walk from a random cell up to a random 20-100 % of the component's area, leaving
components under 10 cells whole.
"""

import dataclasses

import numpy as np
from scipy import ndimage

from medplib_jax.data import canvas
from medplib_jax.data.prompts import region_grid
from medplib_jax.data.batch import IGNORE_INDEX, collate, patch_grid
from medplib_jax.data.mecovqa import (DEFAULT_MAX_PIXELS, BadRecord, DecodedExample, RawExample,
                                      decode_raw, load_raw)
from medplib_jax.data.template import (ConversationError, generation_prompt, tokenize_conversation,
                                       tokenizer_image_token)
from medplib_jax.data.tokenizer import IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX

SUB_REGION_MIN_FRACTION = 0.2
SUB_REGION_MAX_FRACTION = 1.0
SUB_REGION_MIN_CELLS = 10


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
  template: str = "llava_v1"
  overflow: str = "skip"  # "skip": too_long is a bad record; "truncate": cut, and count it
  max_pixels: int = DEFAULT_MAX_PIXELS
  # > 0: carry masks_orig, the masks at their original size in a mask_hw square buffer
  # (batch.original_mask_hw); a record with masks on a larger image is a bad record.
  mask_hw: int = 0


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


@dataclasses.dataclass
class ConversationSample:
  """One conversation laid out for the model, before padding (`batch.collate` pads it).

  ids [n]: token ids, `pad_id` in the `image_slots` image slots from `image_start` (-1: no
  image) and in one slot per region at `region_positions`; labels [n] aligned with ids (all
  IGNORE_INDEX for a generation prompt); region_grids: bool [len(region_positions), G, G];
  clip_image [Sc, Sc, 3] and sam_image [Ss, Ss, 3] float32 canvases, sam_resized_hw and orig_hw
  (all None without an image); prompt: the template's text; mismatch: the template's
  tokenization mismatch (every label masked).
  """
  ids: list[int]
  labels: list[int]
  image_start: int
  image_slots: int
  region_positions: list[int]
  region_grids: np.ndarray
  clip_image: np.ndarray | None
  sam_image: np.ndarray | None
  sam_resized_hw: tuple[int, int] | None
  orig_hw: tuple[int, int] | None
  prompt: str
  mismatch: bool

  def arrays(self) -> dict:
    """The batch-contract keys this sample fills, as `batch.collate` takes them."""
    out = {"input_ids": self.ids, "labels": self.labels, "image_start": self.image_start,
           "region_positions": self.region_positions, "region_masks": self.region_grids}
    if self.clip_image is not None:
      out.update(clip_image=self.clip_image, sam_image=self.sam_image,
                 sam_resized_hw=self.sam_resized_hw, orig_hw=self.orig_hw)
    return out


def conversation_sample(image, conversations: list[dict], region_masks, tokenizer, model_cfg,
                        template="llava_v1", generation: bool = False) -> ConversationSample:
  """(image, turns, region masks) -> the conversation laid out for the model.

  image: uint8 [H, W, 3] or None; conversations: [{"from": "human"|"gpt", "value": str}], the
  first human turn holding `<image>` when there is an image and `<region></region>` wherever a
  region is referred to; region_masks: bool [H, W] per `<region></region>`, in order.
  generation=False: the whole conversation with the template's labels (training);
  generation=True: the prompt that answers the last human turn (earlier rounds in full, as
  training lays them out), no labels. Raises BadRecord when the text and the image or regions
  disagree.
  """
  if generation:
    prompt = generation_prompt(conversations, template)
    ids = tokenizer_image_token(prompt, tokenizer)
    labels, mismatch = [IGNORE_INDEX] * len(ids), False
  else:
    try:
      tok = tokenize_conversation(conversations, tokenizer, template)
    except ConversationError as e:
      raise BadRecord("malformed", "conversations", str(e)) from e
    prompt, ids, labels, mismatch = tok.prompt, tok.input_ids, tok.labels, tok.mismatch
  grid = patch_grid(model_cfg.vision)
  # One slot per CLIP patch feature (models/clip.py num_image_tokens); the model checks the count.
  ids, labels, image_start, region_pos = _expand(ids, labels, grid * grid, tokenizer.pad_id)
  if (image_start >= 0) != (image is not None):
    raise BadRecord("malformed", "image", "an image needs exactly one <image> in the conversation"
                    if image is not None else "<image> in the conversation but no image file")
  if len(region_pos) != len(region_masks):
    raise BadRecord("region_without_file", "conversations",
                    f"{len(region_pos)} <region></region> slots but {len(region_masks)} region files")
  sc = model_cfg.vision.image_size
  grids = np.zeros((len(region_masks), grid, grid), bool)
  for i, mask in enumerate(region_masks):
    grids[i] = region_grid(mask, sc, grid)
  clip_image = sam_image = sam_resized_hw = orig_hw = None
  if image is not None:
    clip_image, _ = canvas.clip_canvas(image, sc)
    sam_image, geo = canvas.sam_canvas(image, model_cfg.sam.image_size)
    sam_resized_hw, orig_hw = geo.resized_hw, tuple(image.shape[:2])
  return ConversationSample(ids, labels, image_start, grid * grid if image_start >= 0 else 0,
                            region_pos, grids, clip_image, sam_image, sam_resized_hw, orig_hw,
                            prompt, mismatch)


def _decoded(record, image_root, max_pixels) -> DecodedExample:
  if isinstance(record, DecodedExample):
    return record
  raw = record if isinstance(record, RawExample) else load_raw(record, image_root)
  return decode_raw(raw, max_pixels)


def _original_masks(ex: DecodedExample, count: int, mask_hw: int) -> np.ndarray:
  """The first `count` masks at their original size, bool [count, H, W]; BadRecord when the image
  does not fit the mask_hw buffer (a crop would change the loss, so the record is skipped)."""
  if not count:
    return np.zeros((0, 0, 0), bool)
  h, w = ex.masks[0].shape
  if max(h, w) > mask_hw:
    raise BadRecord("unreadable_image", "image",
                    f"{w}x{h} image exceeds data.max_mask_hw={mask_hw}, the original-size mask "
                    f"buffer of loss.mask_resolution='original'")
  return np.stack(ex.masks[:count])


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
  sample = conversation_sample(ex.image, raw.conversations, ex.regions, tokenizer, model_cfg,
                               options.template)
  ids = sample.ids
  seg_pos = [i for i, t in enumerate(ids) if t == tokenizer.seg_id]
  if len(seg_pos) != len(ex.masks):
    raise BadRecord("seg_without_mask", "conversations",
                    f"{len(seg_pos)} <SEG> tokens but {len(ex.masks)} masks")
  max_regions, max_masks = model_cfg.region.max_regions, model_cfg.grounding.max_masks
  if len(sample.region_positions) > max_regions or len(seg_pos) > max_masks:
    raise BadRecord("malformed", "conversations",
                    f"{len(sample.region_positions)} regions / {len(seg_pos)} masks exceed the "
                    f"model's {max_regions} / {max_masks}")
  n = len(ids)
  truncated = n > max_length
  if truncated:
    if options.overflow != "truncate" or sample.image_start + sample.image_slots > max_length:
      raise BadRecord("too_long", "conversations",
                      f"{n} tokens (with {sample.image_slots} image slots) "
                      f"> max_length {max_length}")
    n = max_length

  # Truncation drops the regions and <SEG>s past the end (the last ones: positions increase).
  regions = [p for p in sample.region_positions if p < n]
  grids = sample.region_grids[:len(regions)].copy()
  if train:
    rng = rng if rng is not None else np.random.default_rng()
    for i in range(len(grids)):
      grids[i] = sub_region(grids[i], rng)
  segs = [p for p in seg_pos if p < n]
  masks = [canvas.mask_canvas(m, model_cfg.sam.image_size) for m in ex.masks[:len(segs)]]
  arrays = dict(sample.arrays(), input_ids=ids[:n], labels=sample.labels[:n],
                region_positions=regions, region_masks=grids, seg_positions=segs, masks=masks)
  if options.mask_hw:
    arrays["masks_orig"] = _original_masks(ex, len(segs), options.mask_hw)
  batch = collate([arrays], model_cfg, max_length, tokenizer.pad_id, mask_hw=options.mask_hw)
  s = {k: v.reshape(v.shape[1:]) for k, v in batch.items()}

  meta = {"id": raw.id, "modality": raw.modality, "task": raw.task,
          "answer_type": raw.answer_type, "prompt": sample.prompt, "mismatch": sample.mismatch,
          "truncated": truncated, "length": n}
  if not train:
    meta["masks_orig"] = list(ex.masks)  # evaluation compares at the original size
    meta["answers"] = [t["value"] for t in raw.conversations if t["from"] == "gpt"]
  return s, meta
