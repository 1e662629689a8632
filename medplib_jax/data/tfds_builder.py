"""MeCoVQA as a TFDS dataset in ArrayRecord files (no TensorFlow needed to build or read).

`build(json_by_split, image_root, out_dir)` validates each record (mecovqa.py), stores the encoded
image (PNG; other formats are re-encoded losslessly), mask and region files as bytes beside the
cleaned conversation and metadata, and writes a standard TFDS directory
`out_dir/mecovqa/1.0.0/` (ArrayRecord shards + dataset_info.json). Counts per modality and task
per split are kept in the dataset's metadata. Read it back with `open_split(dataset_dir, split)`
(a random-access `tfds.data_source`), whose items `example_from_tfds` turns into RawExamples.
"""

import collections
import io
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils
from PIL import Image

from medplib_jax.data.mecovqa import (BadRecord, RawExample, decode_raw, load_raw, load_records)

NAME = "mecovqa"
VERSION = "1.0.0"
_BYTES = tfds.features.Tensor(shape=(), dtype=np.object_)


def _features():
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "conversations": tfds.features.Text(),  # JSON list of {"from", "value"}, file paths removed
      "has_image": np.bool_,
      "image": _BYTES,  # PNG bytes (b"" without an image)
      "masks": tfds.features.Sequence(_BYTES),    # one PNG per <SEG>, in order
      "regions": tfds.features.Sequence(_BYTES),  # one PNG per <region></region>, in order
      "modality": tfds.features.Text(),
      "task": tfds.features.Text(),  # C, R or G
      "answer_type": tfds.features.Text(),
  })


def _as_png(data: bytes) -> bytes:
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return data
  buf = io.BytesIO()
  Image.open(io.BytesIO(data)).save(buf, format="PNG")
  return buf.getvalue()


class MecovqaBuilder(tfds.core.GeneratorBasedBuilder):
  """Builder over already-validated examples; `examples_by_split` is set before preparing."""
  name = NAME
  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, examples_by_split=None, counts=None, **kwargs):
    self._examples_by_split = examples_by_split or {}
    self._counts = counts or {}
    super().__init__(**kwargs)

  # tfds looks up its code path through the `importlib_resources` backport (not a dependency here).
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description="MeCoVQA-format records (MedPLIB-JAX)", features=_features(),
        metadata=tfds.core.MetadataDict(counts=self._counts))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(examples) for split, examples in self._examples_by_split.items()}

  def _generate_examples(self, examples):
    for i, ex in enumerate(examples):
      yield i, ex


def _encode(raw: RawExample) -> dict:
  return {"id": raw.id, "conversations": json.dumps(raw.conversations),
          "has_image": raw.image is not None, "image": _as_png(raw.image) if raw.image else b"",
          "masks": [_as_png(m) for m in raw.masks], "regions": [_as_png(r) for r in raw.regions],
          "modality": raw.modality, "task": raw.task, "answer_type": raw.answer_type}


def validate_split(records, image_root: str, on_bad=None, check_sample=None):
  """Yields the RawExample of every good record; calls on_bad(index, id, BadRecord) for the rest.

  `check_sample(decoded)` (optional) runs further checks that need a tokenizer (e.g. too_long).
  """
  for i, rec in enumerate(records):
    rid = str(rec.get("id", "?")) if isinstance(rec, dict) else "?"
    try:
      raw = load_raw(rec, image_root)
      decoded = decode_raw(raw)
      if check_sample is not None:
        check_sample(decoded)
    except BadRecord as bad:
      if on_bad is not None:
        on_bad(i, rid, bad)
      continue
    yield raw


def build(json_by_split: dict[str, str], image_root: str, out_dir: str, on_bad=None,
          check_sample=None) -> dict:
  """Builds `out_dir/mecovqa/1.0.0`; returns {"dir", "counts": {split: {...}}, "bad": n}."""
  examples, counts, bad = {}, {}, [0]

  def count_bad(i, rid, b):
    bad[0] += 1
    if on_bad is not None:
      on_bad(i, rid, b)

  for split, path in json_by_split.items():
    good = [_encode(raw) for raw in validate_split(load_records(path), image_root, count_bad,
                                                   check_sample)]
    examples[split] = good
    counts[split] = {
        "total": len(good),
        "modality": dict(sorted(collections.Counter(e["modality"] for e in good).items())),
        "task": dict(sorted(collections.Counter(e["task"] for e in good).items())),
    }
  builder = MecovqaBuilder(examples_by_split=examples, counts=counts, data_dir=out_dir,
                           file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
  return {"dir": builder.data_dir, "counts": counts, "bad": bad[0]}


def dataset_dir(out_dir: str) -> str:
  return os.path.join(out_dir, NAME, VERSION)


def open_split(ds_dir: str, split: str):
  """Random-access source (len, __getitem__) over one split of a built dataset directory."""
  if not os.path.isfile(os.path.join(ds_dir, "dataset_info.json")):
    ds_dir = dataset_dir(ds_dir)
  return tfds.builder_from_directory(ds_dir).as_data_source(split=split)


def dataset_counts(ds_dir: str) -> dict:
  if not os.path.isfile(os.path.join(ds_dir, "dataset_info.json")):
    ds_dir = dataset_dir(ds_dir)
  return dict(tfds.builder_from_directory(ds_dir).info.metadata["counts"])


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def example_from_tfds(item: dict) -> RawExample:
  """A decoded TFDS item (numpy / bytes values) -> RawExample for preprocess.build_sample."""
  return RawExample(
      id=_text(item["id"]), conversations=json.loads(_text(item["conversations"])),
      image=bytes(item["image"]) if bool(item["has_image"]) else None,
      masks=[bytes(m) for m in item["masks"]], regions=[bytes(r) for r in item["regions"]],
      task=_text(item["task"]), modality=_text(item["modality"]),
      answer_type=_text(item["answer_type"]))
