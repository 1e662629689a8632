"""Where MeCoVQA records come from: JSON lists and TFDS datasets (`medplib data build`).

Training reads them by index (`open_source`: a random-access source for grain); evaluation reads
them in order (`read_examples`). Both turn an item into a RawExample with `raw_example`.
tensorflow-datasets is a declared dependency (pyproject.toml), imported with tfds_builder.
"""

import dataclasses
import json
import os

from medplib_jax.data import tfds_builder
from medplib_jax.data.mecovqa import BadRecord, RawExample, load_raw, load_records


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  """One dataset of a mixture: a TFDS directory (built by `medplib data build`) or a JSON file."""
  path: str
  split: str = "train"
  weight: float = 1.0
  template: str = ""  # "" = config.data.template
  image_root: str = ""  # JSON only; "" = config.data.image_root

  @classmethod
  def parse(cls, entry) -> "DatasetEntry":
    if isinstance(entry, str):
      path, _, split = entry.partition(":") if not os.path.exists(entry) else (entry, "", "")
      return cls(path=path, split=split or "train")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(entry).items() if k in fields})


class JsonSource:
  """Random access over a MeCoVQA JSON list; items are raw records (files read at preprocessing)."""

  def __init__(self, path: str):
    self._records = [json.dumps(r) for r in load_records(path)]  # compact, cheap to pickle

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i):
    return json.loads(self._records[i])


def open_source(entry: DatasetEntry):
  if entry.path.endswith(".json"):
    return JsonSource(entry.path)
  return tfds_builder.open_split(entry.path, entry.split)


def _is_tfds_item(item) -> bool:
  return isinstance(item, dict) and "has_image" in item


def raw_example(item, image_root: str) -> RawExample:
  """A source item (a TFDS item, or a JSON record whose files lie under image_root) ->
  RawExample. Raises BadRecord."""
  if _is_tfds_item(item):
    return tfds_builder.example_from_tfds(item)
  return load_raw(item, image_root)


def read_examples(data, image_root: str = "", split: str = "test"):
  """Iterator of (id, RawExample | BadRecord), in order, over `data`: a list of MeCoVQA records,
  a JSON file (image_root defaults to its folder) or a TFDS directory (its `split`).

  Raises FileNotFoundError at once when a path is neither a file nor a directory.
  """
  if isinstance(data, str):
    if os.path.isdir(data):
      data = tfds_builder.open_split(data, split)
    elif os.path.isfile(data):
      image_root = image_root or os.path.dirname(os.path.abspath(data))
      data = load_records(data)
    else:
      raise FileNotFoundError(f"{data!r} is neither a JSON file nor a TFDS directory")
  return (_keyed_example(i, data[i], image_root) for i in range(len(data)))


def _keyed_example(i: int, item, image_root: str):
  if _is_tfds_item(item):
    raw = raw_example(item, image_root)
    return raw.id, raw
  rid = str(item.get("id", i)) if isinstance(item, dict) else str(i)
  try:
    return rid, raw_example(item, image_root)
  except BadRecord as e:
    return rid, e
