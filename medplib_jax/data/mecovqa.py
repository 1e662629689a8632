"""MeCoVQA reader: LLaVA-style JSON records, safe file resolution, image/mask decoding, validation.

A record is `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}...], "answer_type"?}`
(SPEC.md, Data). A grounding answer holds `<SEG>` and names its mask as `<mask>rel.png</mask>`
(removed from the text); a region question holds `<region>rel.png</region>` (the path is removed,
the tags stay). Every path is resolved inside the image root only.

Bad input is reported as `BadRecord(reason, field, detail)`; `REASONS` is the closed list of reason
names used by `medplib data check` and counted by `BadRecordBudget` during training.
"""

import collections
import dataclasses
import io
import json
import os
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from medplib_jax.data.template import GPT, HUMAN

REASONS = {
    "malformed": "missing fields, wrong types, roles out of order or no assistant turn",
    "missing_image": "image or mask file does not exist",
    "unreadable_image": "file cannot be decoded as an image, or exceeds the pixel limit",
    "path_outside_root": "absolute path, '..', or a symlink leading outside the image root",
    "mask_size_mismatch": "mask and image have different sizes",
    "empty_mask": "grounding or region mask has no foreground pixel",
    "seg_without_mask": "<SEG> in an answer without a <mask> file",
    "mask_without_seg": "<mask> file without a <SEG> in its answer",
    "region_without_file": "<region></region> without a mask file",
    "too_long": "conversation longer than max_length after the image tokens",
}
MASK_RE = re.compile(r"<mask>(.*?)</mask>")
REGION_RE = re.compile(r"<region>(.*?)</region>")
SEG_TOKEN = "<SEG>"
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # larger images are refused (decompression bombs)
# Modes with a defined conversion to RGB / grey; others (LAB, HSV, ...) are refused by name.
SUPPORTED_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                             "YCbCr", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
TASK_VQA, TASK_REGION, TASK_GROUNDING = "C", "R", "G"


class BadRecord(ValueError):
  """One bad record: a named `reason` (a key of REASONS), the offending `field`, and a detail."""

  def __init__(self, reason: str, field: str, detail: str):
    assert reason in REASONS, reason
    super().__init__(f"{reason} [{field}]: {detail}")
    self.reason, self.field, self.detail = reason, field, detail


class BudgetExceeded(RuntimeError):
  pass


class BadRecordBudget:
  """Counts skipped records per reason; more than `budget` skips in all aborts the run."""

  def __init__(self, budget: int):
    self.budget = int(budget)
    self.counts: collections.Counter = collections.Counter()
    self.examples: dict[str, str] = {}

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def skip(self, bad: BadRecord, record_id: str = "?") -> None:
    self.counts[bad.reason] += 1
    self.examples.setdefault(bad.reason, f"id={record_id}: {bad}")
    if self.total > self.budget:
      summary = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
      raise BudgetExceeded(
          f"{self.total} bad records exceed the budget of {self.budget} ({summary}); first of "
          f"each: {self.examples}. Run `medplib data check` on the dataset, or raise "
          f"data.bad_record_budget.")


@dataclasses.dataclass(frozen=True)
class ParsedRecord:
  """A structurally valid record: the text with file references removed, and those references."""
  id: str
  image: str | None
  conversations: list[dict]  # mask paths removed, region paths emptied
  mask_paths: list[str]      # one per <SEG>, in order
  region_paths: list[str]    # one per <region></region>, in order
  task: str                  # C (VQA), R (region VQA) or G (grounding)
  modality: str              # image file name up to its first '_' (SPEC.md evaluation)
  answer_type: str


def load_records(json_path: str) -> list:
  """The JSON list of a MeCoVQA file (records are validated one by one later)."""
  try:
    with open(json_path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read MeCoVQA JSON {json_path!r}: {e}") from e
  if not isinstance(data, list):
    raise ValueError(f"{json_path!r}: expected a JSON list of records, got {type(data).__name__}")
  return data


def modality_of(image_path: str | None) -> str:
  if not image_path:
    return "none"
  return os.path.basename(image_path).split("_", 1)[0].lower()


def parse_record(record) -> ParsedRecord:
  """Checks fields and types, pulls out <mask>/<region> paths and <SEG> pairing. No file access."""
  if not isinstance(record, dict):
    raise BadRecord("malformed", "record", f"expected an object, got {type(record).__name__}")
  rid = record.get("id", "")
  if not isinstance(rid, (str, int)):
    raise BadRecord("malformed", "id", f"expected a string, got {type(rid).__name__}")
  image = record.get("image")
  if image is not None and (not isinstance(image, str) or not image):
    raise BadRecord("malformed", "image", "expected a non-empty relative path string")
  convs = record.get("conversations")
  if not isinstance(convs, list) or not convs:
    raise BadRecord("malformed", "conversations", "missing or not a non-empty list")
  cleaned, masks, regions = [], [], []
  for j, turn in enumerate(convs):
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
      raise BadRecord("malformed", f"conversations[{j}]", "turn needs 'from' and 'value'")
    if turn["from"] not in (HUMAN, GPT):
      raise BadRecord("malformed", f"conversations[{j}].from", f"unknown speaker {turn['from']!r}")
    if not isinstance(turn["value"], (str, int, float)):
      raise BadRecord("malformed", f"conversations[{j}].value",
                      f"expected text, got {type(turn['value']).__name__}")
    value = str(turn["value"])
    field = f"conversations[{j}]"
    turn_masks = MASK_RE.findall(value)
    if len(turn_masks) > 1:
      raise BadRecord("malformed", field, "more than one <mask> in one turn")
    segs = value.count(SEG_TOKEN)
    if turn_masks:
      if segs == 0:
        raise BadRecord("mask_without_seg", field, f"<mask>{turn_masks[0]}</mask> but no <SEG>")
      value = value.replace(f"<mask>{turn_masks[0]}</mask>", "")
      if not turn_masks[0].strip():
        raise BadRecord("seg_without_mask", field, "<mask></mask> names no file")
    if segs != len(turn_masks):
      raise BadRecord("seg_without_mask", field, f"{segs} <SEG> but {len(turn_masks)} <mask> files")
    turn_regions = REGION_RE.findall(value)
    if len(turn_regions) > 1:
      raise BadRecord("malformed", field, "more than one <region> in one turn")
    if turn_regions:
      if not turn_regions[0].strip():
        raise BadRecord("region_without_file", field, "<region></region> names no mask file")
      value = value.replace(turn_regions[0], "")
    masks += turn_masks
    regions += turn_regions
    cleaned.append({"from": turn["from"], "value": value})
  if not any(t["from"] == GPT for t in cleaned):
    raise BadRecord("malformed", "conversations", "no assistant ('gpt') turn")
  if (masks or regions) and image is None:
    raise BadRecord("malformed", "image", "masks or regions given without an image")
  answer_type = record.get("answer_type") or ""
  if not isinstance(answer_type, str):
    raise BadRecord("malformed", "answer_type", "expected a string")
  task = TASK_GROUNDING if masks else TASK_REGION if regions else TASK_VQA
  return ParsedRecord(str(rid), image, cleaned, masks, regions, task, modality_of(image),
                      answer_type)


def resolve_path(root: str, rel: str, field: str) -> str:
  """`root/rel` if it stays inside root (no absolute path, no '..', no symlink leaving root)."""
  if os.path.isabs(rel) or rel.startswith("~"):
    raise BadRecord("path_outside_root", field, f"absolute path {rel!r}")
  if ".." in re.split(r"[\\/]", rel):
    raise BadRecord("path_outside_root", field, f"'..' in {rel!r}")
  root_real = os.path.realpath(root)
  full = os.path.join(root_real, rel)
  real = os.path.realpath(full)
  if os.path.commonpath([root_real, real]) != root_real:
    raise BadRecord("path_outside_root", field, f"{rel!r} resolves to {real!r} outside {root!r}")
  if not os.path.isfile(real):
    raise BadRecord("missing_image", field, f"{rel!r} not found under {root!r}")
  return real


def read_file(root: str, rel: str, field: str) -> bytes:
  with open(resolve_path(root, rel, field), "rb") as f:
    return f.read()


def _open(data: bytes, field: str, max_pixels: int) -> Image.Image:
  try:
    img = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:  # PIL's own limit, checked on the header
    raise BadRecord("unreadable_image", field, f"exceeds the pixel limit ({e})") from e
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise BadRecord("unreadable_image", field, f"not a decodable image ({e})") from e
  if img.mode not in SUPPORTED_MODES:
    raise BadRecord("unreadable_image", field, f"unsupported image mode {img.mode!r}")
  if img.width * img.height > max_pixels:
    raise BadRecord("unreadable_image", field,
                    f"{img.width}x{img.height} exceeds the pixel limit {max_pixels}")
  try:
    img.load()
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise BadRecord("unreadable_image", field, f"truncated or corrupt image ({e})") from e
  return img


def _is_wide_grey(img: Image.Image) -> bool:
  return img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N")


def decode_image(data: bytes, field: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Encoded PNG/JPEG of any common mode -> uint8 RGB [H, W, 3]. 16-bit grey keeps its top byte."""
  img = _open(data, field, max_pixels)
  if _is_wide_grey(img):
    grey = np.asarray(img).astype(np.int64)
    grey = grey >> 8 if grey.max(initial=0) > 255 else grey
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
  return np.asarray(img.convert("RGB"))


def decode_mask(data: bytes, field: str = "mask", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Encoded mask image -> bool [H, W], binarised with value >= 1 (as the reference)."""
  img = _open(data, field, max_pixels)
  if _is_wide_grey(img):
    return np.asarray(img) >= 1
  return np.asarray(img.convert("L")) >= 1


@dataclasses.dataclass
class RawExample:
  """A record with its files read: what the TFDS dataset stores and what preprocessing consumes."""
  id: str
  conversations: list[dict]
  image: bytes | None
  masks: list[bytes]
  regions: list[bytes]
  task: str
  modality: str
  answer_type: str


def load_raw(record, image_root: str) -> RawExample:
  """parse_record + read every referenced file inside image_root (raises BadRecord)."""
  p = parse_record(record)
  image = read_file(image_root, p.image, "image") if p.image else None
  masks = [read_file(image_root, m, f"mask[{i}]") for i, m in enumerate(p.mask_paths)]
  regions = []
  for i, r in enumerate(p.region_paths):
    try:
      regions.append(read_file(image_root, r, f"region[{i}]"))
    except BadRecord as e:
      if e.reason == "missing_image":
        raise BadRecord("region_without_file", e.field, e.detail) from e
      raise
  return RawExample(p.id, p.conversations, image, masks, regions, p.task, p.modality, p.answer_type)


@dataclasses.dataclass
class DecodedExample:
  raw: RawExample
  image: np.ndarray | None  # uint8 [H, W, 3]
  masks: list[np.ndarray]   # bool [H, W] each, same size as the image
  regions: list[np.ndarray]


def decode_raw(raw: RawExample, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedExample:
  """Decodes the files and checks sizes and emptiness (raises BadRecord)."""
  image = decode_image(raw.image, "image", max_pixels) if raw.image is not None else None
  out = []
  for kind, blobs in (("mask", raw.masks), ("region", raw.regions)):
    decoded = []
    for i, blob in enumerate(blobs):
      field = f"{kind}[{i}]"
      m = decode_mask(blob, field, max_pixels)
      if image is not None and m.shape != image.shape[:2]:
        raise BadRecord("mask_size_mismatch", field,
                        f"mask {m.shape[1]}x{m.shape[0]} vs image {image.shape[1]}x{image.shape[0]}")
      if not m.any():
        raise BadRecord("empty_mask", field, "no foreground pixel (values >= 1)")
      decoded.append(m)
    out.append(decoded)
  return DecodedExample(raw, image, out[0], out[1])
