"""grain input pipelines: MeCoVQA sources -> shuffled, per-process sharded, preprocessed batches.

Training (per dataset in `config.data.train`):

    source (TFDS ArrayRecord or JSON, sources.py) -> MapDataset -> shuffle(seed)
      -> [process_index::process_count] -> repeat(epochs)
      -> map(build_sample)   (rng seeded by the record's global slot)
    then mix(weights) -> to_iter_dataset -> skip bad records -> batch(host batch, batch.collate)
      -> mp_prefetch

Indexing a shuffled dataset past its length reshuffles for the next epoch, so every epoch is a new
permutation that the processes still split exactly. A bad record does not stop training: the
preprocessing returns a marker, the skip step drops it and attaches a per-reason count to the next
good element, and the host iterator adds those counts into a `BadRecordBudget` (exact with any
number of workers, and part of the saved iterator state). Exceeding the budget raises.

`TrainIterator.get_state()/set_state()` give a JSON-serialisable state for the training
checkpoint; restoring it yields exactly the batches that would have followed.
"""

import grain
import numpy as np
from absl import flags

from medplib_jax.data.batch import collate, original_mask_hw
from medplib_jax.data.mecovqa import REASONS, BadRecord, BadRecordBudget, BudgetExceeded
from medplib_jax.data.preprocess import PreprocessOptions, build_sample
from medplib_jax.data.sources import DatasetEntry, open_source, raw_example

REASON_NAMES = tuple(REASONS)
_BAD = "_bad_reason"
_SKIPPED = "_skipped"
_TRUNCATED = "_truncated"
_MISMATCH = "_mismatch"
_COUNTERS = (_SKIPPED, _TRUNCATED, _MISMATCH)


class Preprocessor:
  """Picklable element transform: record (+ per-element rng) -> sample dict, or a bad marker."""

  def __init__(self, tokenizer, model_cfg, max_length, image_root, train, options):
    self.tokenizer, self.model_cfg, self.max_length = tokenizer, model_cfg, max_length
    self.image_root, self.train, self.options = image_root, train, options

  def __call__(self, item, rng: np.random.Generator):
    try:
      sample, meta = build_sample(raw_example(item, self.image_root), self.tokenizer,
                                  self.model_cfg, self.max_length, rng=rng, train=self.train,
                                  options=self.options)
    except BadRecord as bad:
      rid = item.get("id", "?") if isinstance(item, dict) else "?"
      return {_BAD: np.int32(REASON_NAMES.index(bad.reason)), "id": str(rid)}
    sample[_TRUNCATED] = np.int32(meta["truncated"])
    sample[_MISMATCH] = np.int32(meta["mismatch"])
    return sample


class _SkipBadIterator(grain.DatasetIterator):
  """Drops bad-record markers; the next good element carries their per-reason counts."""

  def __init__(self, parent, budget):
    super().__init__(parent)
    self._budget = budget

  def __next__(self):
    skipped = np.zeros(len(REASON_NAMES), np.int32)
    while True:
      element = next(self._parent)
      if _BAD not in element:
        element[_SKIPPED] = skipped
        return element
      skipped[int(element[_BAD])] += 1
      if skipped.sum() > self._budget:  # a run of bad records: stop here, not after the batch
        counts = {r: int(n) for r, n in zip(REASON_NAMES, skipped) if n}
        raise BudgetExceeded(f"{int(skipped.sum())} consecutive bad records exceed the budget of "
                             f"{self._budget} ({counts}; last id {element.get('id')}). Run "
                             f"`medplib data check`, or raise data.bad_record_budget.")

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _SkipBad(grain.IterDataset):
  def __init__(self, parent, budget: int):
    super().__init__(parent)
    self._budget = budget

  def __iter__(self):
    return _SkipBadIterator(self._parent.__iter__(), self._budget)


class TrainIterator(grain.DatasetIterator):
  """Host iterator of batched numpy dicts (batch.py contract); counts skips against the budget."""

  def __init__(self, parent, budget: BadRecordBudget):
    super().__init__(parent)
    self.budget = budget
    self.truncated = 0
    self.mismatched = 0

  def __next__(self):
    batch = next(self._parent)
    self._count(batch)
    return {k: v for k, v in batch.items() if k not in _COUNTERS}

  def _count(self, batch):
    skipped = np.asarray(batch[_SKIPPED]).reshape(-1, len(REASON_NAMES)).sum(0)
    self.truncated += int(np.sum(batch[_TRUNCATED]))
    self.mismatched += int(np.sum(batch[_MISMATCH]))
    for reason, n in zip(REASON_NAMES, skipped):
      for _ in range(int(n)):
        self.budget.skip(BadRecord(reason, "record", "skipped during training"))

  def stats(self) -> dict:
    return {"skipped": dict(self.budget.counts), "truncated": self.truncated,
            "tokenization_mismatch": self.mismatched}

  def get_state(self):
    return {"pipeline": self._parent.get_state(), "skipped": dict(self.budget.counts),
            "truncated": self.truncated, "tokenization_mismatch": self.mismatched}

  def set_state(self, state):
    self._parent.set_state(state["pipeline"])
    self.budget.counts.clear()
    self.budget.counts.update(state["skipped"])
    self.truncated = int(state["truncated"])
    self.mismatched = int(state["tokenization_mismatch"])


def host_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
  return global_batch_size // process_count


def _component(entry, config, tokenizer, process_index, process_count, seed, train, epochs):
  data = config.data
  options = PreprocessOptions(template=entry.template or data.template, overflow=data.overflow,
                              mask_hw=original_mask_hw(config))
  prep = Preprocessor(tokenizer, config.model, data.max_length, entry.image_root or data.image_root,
                      train, options)
  source = open_source(entry)
  slots = shard_slots(len(source), seed, process_index, process_count, shuffle=train,
                      epochs=epochs if train else 1)
  record_of = _SlotRecord(len(source), seed) if train else None
  return slots.map(_SlotItem(source, record_of)).map(_SeededBySlot(prep, seed))


class _SlotRecord:
  """Global slot -> record index: slot epoch * n + k is position k of that epoch's permutation."""

  def __init__(self, n, seed):
    # Indexing a grain shuffle past its length gives the next epoch's permutation.
    self.permutation = grain.MapDataset.range(n).shuffle(seed=seed)

  def __call__(self, slot):
    return self.permutation[int(slot)]


class _SlotItem:
  def __init__(self, source, record_of):
    self.source, self.record_of = source, record_of

  def __call__(self, slot):
    return int(slot), self.source[self.record_of(slot) if self.record_of else int(slot)]


class _SeededBySlot:
  """(slot, record) -> preprocess(record, rng) with the rng keyed by the global slot, not by the
  element's index in this process's stream: a record's augmentation (region sub-sampling) is the
  same for any process count, so N processes train exactly like one."""

  def __init__(self, prep, seed):
    self.prep, self.seed = prep, seed

  def __call__(self, item):
    slot, record = item
    return self.prep(record, np.random.default_rng([self.seed, slot]))


class _EpochShard:
  """Index i of a process's stream -> global slot: epoch e = i // per_process, of whose n slots
  (positions of that epoch's permutation) this process takes every count-th."""

  def __init__(self, n, process_index, process_count):
    self.n, self.index, self.count = n, process_index, process_count
    self.per_process = n // process_count

  def __call__(self, i):
    epoch, j = divmod(int(i), self.per_process)
    return epoch * self.n + self.index + j * self.count


def shard_slots(n: int, seed: int, process_index: int, process_count: int, shuffle: bool = True,
                epochs: int | None = 1) -> grain.MapDataset:
  """Global slots this process reads (what `shard_order` maps to record indices)."""
  if not shuffle:
    return grain.MapDataset.range(n)[process_index::process_count]
  shard = _EpochShard(n, process_index, process_count)
  if shard.per_process == 0:
    raise ValueError(f"{n} records cannot be split over {process_count} processes")
  total = shard.per_process * (epochs if epochs is not None else 1 << 40)
  return grain.MapDataset.range(total).map(shard)


def shard_order(n: int, seed: int, process_index: int, process_count: int, shuffle: bool = True,
                epochs: int | None = 1) -> grain.MapDataset:
  """Record indices this process reads.

  Training (`shuffle`): every epoch a new seeded permutation of all records; process p reads its
  positions p, p + count, ...; all processes read n // count per epoch (equal step counts; the
  remainder differs per epoch), so together they read each record at most once an epoch.
  `epochs=None` is endless. Evaluation: records p, p + count, ... in order, each exactly once.
  """
  slots = shard_slots(n, seed, process_index, process_count, shuffle, epochs)
  return slots.map(_SlotRecord(n, seed)) if shuffle else slots


def _absl_flags_ready():
  # grain's worker processes read absl flags; outside an absl app they are never parsed.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _read_options(config, batch: int) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=int(config.data.read_threads),
                           prefetch_buffer_size=int(config.data.prefetch or 2 * batch))


class _Collate:
  """grain batch_fn: the samples through `batch.collate` (right padding), the counters stacked."""

  def __init__(self, model_cfg, max_length, pad_id, mask_hw=0):
    self.model_cfg, self.max_length, self.pad_id = model_cfg, max_length, pad_id
    self.mask_hw = mask_hw  # the masks_orig buffer side (0: none)

  def __call__(self, elements):
    batch = collate([{k: v for k, v in e.items() if k not in _COUNTERS} for e in elements],
                    self.model_cfg, self.max_length, self.pad_id, mask_hw=self.mask_hw)
    batch.update({k: np.stack([e[k] for e in elements]) for k in _COUNTERS})
    return batch


def make_train_iterator(config, tokenizer, process_index: int = 0, process_count: int = 1,
                        epochs: int | None = None) -> TrainIterator:
  """Batches of the training mixture `config.data.train` for this process.

  Entries are paths (TFDS dataset dir, `dir:split`, or a `.json`) or dicts with DatasetEntry
  fields (`weight` for the mixture). Host batch = optim.global_batch_size / process_count.
  `epochs=None` repeats forever (training stops by steps).
  """
  entries = [DatasetEntry.parse(e) for e in config.data.train]
  if not entries:
    raise ValueError("config.data.train lists no datasets")
  batch = host_batch_size(config.optim.global_batch_size, process_count)
  seed = int(config.data.seed)
  parts = [_component(e, config, tokenizer, process_index, process_count, seed + 1000 * k, True,
                      epochs) for k, e in enumerate(entries)]
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [e.weight for e in entries])
  budget = int(config.data.bad_record_budget)
  ds = _SkipBad(ds.to_iter_dataset(_read_options(config, batch)), budget)
  ds = ds.batch(batch, drop_remainder=True,
                batch_fn=_Collate(config.model, config.data.max_length, tokenizer.pad_id,
                                  original_mask_hw(config)))
  workers = int(config.data.num_workers)
  if workers > 0:
    _absl_flags_ready()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return TrainIterator(iter(ds), BadRecordBudget(budget))
