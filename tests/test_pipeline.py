"""grain pipeline: determinism, resume from a saved state, per-process sharding, mixtures, budget."""

import json

import numpy as np
import pytest

from configs.common import base_config
from medplib_jax.data import pipeline, preprocess, sources, synth, tfds_builder
from medplib_jax.data.batch import batch_spec, collate
from medplib_jax.data.mecovqa import BadRecord, BudgetExceeded, load_raw
from medplib_jax.data.template import template_texts
from medplib_jax.data.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("synth")
  paths = synth.write_synthetic(str(root), 12, seed=3)
  texts = [t["value"] for p in paths.values() for r in json.load(open(p)) for t in r["conversations"]]
  tok = load_tokenizer(train_tokenizer(texts + template_texts() * 20, str(root / "tok")))
  return root, paths, tok


def _config(data, train, budget=100, batch=4):
  root, _, _ = data
  c = base_config(stage=2, size="tiny")
  c.data.train = tuple(train)
  c.data.image_root = str(root)
  c.data.max_length = 128
  c.data.bad_record_budget = budget
  c.optim.global_batch_size = batch
  return c


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_follow_the_contract_and_are_deterministic(data):
  _, paths, tok = data
  c = _config(data, [paths["train"]])
  it1 = pipeline.make_train_iterator(c, tok)
  it2 = pipeline.make_train_iterator(c, tok)
  spec = batch_spec(c.model, c.data.max_length)
  for _ in range(3):
    b1, b2 = next(it1), next(it2)
    assert _equal(b1, b2)
    assert set(b1) == set(spec)
    for k, (shape, dtype) in spec.items():
      assert b1[k].shape == (4,) + shape and b1[k].dtype == dtype, k
    # labels are supervised only where attention is on and never on image slots
    assert np.all(b1["labels"][~b1["attention_mask"]] == -100)
    n_img = (c.model.vision.image_size // c.model.vision.patch_size) ** 2
    for row, start in enumerate(b1["image_start"]):
      assert start >= 0
      assert np.all(b1["input_ids"][row, start:start + n_img] == tok.pad_id)
      assert np.all(b1["labels"][row, start:start + n_img] == -100)
    seg = b1["seg_positions"]
    rows = np.nonzero(seg[:, 0] >= 0)[0]
    assert np.all(b1["input_ids"][rows, seg[rows, 0]] == tok.seg_id)
    assert np.all(b1["masks"][rows, 0].any(axis=(1, 2)))


def test_original_mask_resolution_batches_carry_the_masks_at_their_size(data):
  """loss.mask_resolution="original": each batch also holds masks_orig, every mask top-left at
  its original size (orig_hw) in the data.max_mask_hw buffer, nothing outside it."""
  root, paths, tok = data
  c = _config(data, [paths["train"]])
  c.loss.mask_resolution = "original"
  c.data.max_mask_hw = 640
  batch = next(pipeline.make_train_iterator(c, tok))
  spec = batch_spec(c.model, c.data.max_length, 640)
  assert set(batch) == set(spec) and batch["masks_orig"].shape == (4,) + spec["masks_orig"][0]
  rows = np.nonzero(batch["seg_positions"][:, 0] >= 0)[0]
  assert len(rows)
  for row in rows:
    h, w = batch["orig_hw"][row]
    full = batch["masks_orig"][row, 0]
    assert full[:h, :w].any() and not full[h:].any() and not full[:, w:].any()


def test_resume_gives_identical_next_batch(data):
  _, paths, tok = data
  c = _config(data, [paths["train"]])
  it = pipeline.make_train_iterator(c, tok)
  for _ in range(4):  # past the first epoch of 9 records / batch 4
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
  expected = [next(it) for _ in range(2)]
  fresh = pipeline.make_train_iterator(c, tok)
  fresh.set_state(state)
  for want in expected:
    assert _equal(next(fresh), want)


def test_process_shards_cover_each_record_once_per_epoch():
  for n, count in ((12, 2), (10, 4)):
    per = n // count
    for epoch in range(3):
      seen = []
      for p in range(count):
        order = pipeline.shard_order(n, seed=5, process_index=p, process_count=count, epochs=3)
        seen += [order[i] for i in range(epoch * per, (epoch + 1) * per)]
      assert len(seen) == len(set(seen)) == per * count
    first = pipeline.shard_order(n, 5, 0, count, epochs=3)
    assert [first[i] for i in range(per)] != [first[i] for i in range(per, 2 * per)]
  ev = [i for p in range(3) for i in pipeline.shard_order(7, 0, p, 3, shuffle=False)]
  assert sorted(ev) == list(range(7))


def test_host_batch_is_global_over_processes(data):
  _, paths, tok = data
  c = _config(data, [paths["train"]], batch=4)
  b = next(pipeline.make_train_iterator(c, tok, process_index=1, process_count=2))
  assert b["input_ids"].shape[0] == 2
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_train_iterator(c, tok, process_count=3)


def test_weighted_mixture(data, tmp_path):
  root, paths, tok = data
  # Two copies of the data under different ids; the mixture draws them 3:1.
  recs = json.load(open(paths["train"]))
  other = tmp_path / "other.json"
  json.dump(recs, open(other, "w"))
  c = _config(data, [dict(path=paths["train"], weight=3.0), dict(path=str(other), weight=1.0)])
  c.optim.global_batch_size = 4
  ds = pipeline.grain.MapDataset.mix([pipeline.grain.MapDataset.range(3).repeat(None),
                                      pipeline.grain.MapDataset.range(100, 103).repeat(None)],
                                     [3.0, 1.0])
  drawn = [ds[i] for i in range(400)]
  assert sum(x >= 100 for x in drawn) == 100
  b1 = next(pipeline.make_train_iterator(c, tok))
  b2 = next(pipeline.make_train_iterator(c, tok))
  assert _equal(b1, b2)


def test_bad_records_are_counted_and_budget_aborts(data, tmp_path):
  root, paths, tok = data
  recs = json.load(open(paths["train"]))
  bad = [dict(recs[0], id="gone", image="images/missing.png"),
         dict(recs[0], id="escape", image="../outside.png"),
         {"id": "noconv", "image": recs[0]["image"]}]
  path = tmp_path / "mixed.json"
  json.dump(recs + bad, open(path, "w"))
  c = _config(data, [str(path)], budget=100)
  it = pipeline.make_train_iterator(c, tok, epochs=1)
  n = sum(b["input_ids"].shape[0] for b in it)
  stats = it.stats()["skipped"]
  assert n + sum(stats.values()) in (len(recs) + 3 - k for k in range(4))  # remainder dropped
  c.data.bad_record_budget = 0
  with pytest.raises(BudgetExceeded, match="budget of 0"):
    for _ in pipeline.make_train_iterator(c, tok, epochs=1):
      pass


def test_read_examples_in_order_from_json_list_and_tfds(data, tmp_path):
  root, paths, _ = data
  recs = json.load(open(paths["test"]))
  bad = dict(recs[0], id="gone", image="images/missing.png")
  path = tmp_path / "with_bad.json"
  json.dump(recs + [bad, {"conversations": []}], open(path, "w"))
  got = list(sources.read_examples(str(path), str(root)))
  assert [rid for rid, _ in got] == [str(r["id"]) for r in recs] + ["gone", str(len(recs) + 1)]
  assert [b.reason for _, b in got[-2:]] == ["missing_image", "malformed"]
  assert all(ex == load_raw(r, str(root)) for (_, ex), r in zip(got, recs))
  from_list = list(sources.read_examples(recs, str(root)))
  from_file = list(sources.read_examples(paths["test"]))  # images beside the JSON
  assert from_list == from_file == got[:len(recs)]
  tfds_builder.build({"test": paths["test"]}, str(root), str(tmp_path / "tfds"))
  from_tfds = dict(sources.read_examples(str(tmp_path / "tfds"), split="test"))
  assert from_tfds == dict(from_file)
  with pytest.raises(FileNotFoundError, match="neither a JSON file nor a TFDS directory"):
    sources.read_examples(str(tmp_path / "nothing"))


def test_collate_fills_the_contract_and_left_padding_moves_positions(data):
  root, paths, tok = data
  c = _config(data, [paths["train"]])
  samples = []
  for r in json.load(open(paths["train"])):
    try:
      samples.append(preprocess.build_sample(r, tok, c.model, 128, str(root), train=False)[0])
    except BadRecord:
      continue
  spec = batch_spec(c.model, 128)
  right = collate(samples, c.model, 128, tok.pad_id)
  assert all(_equal(dict(zip(right, (v[i] for v in right.values()))), s)
             for i, s in enumerate(samples))  # a fixed sample collates to itself
  left = collate(samples + [{}], c.model, 128, tok.pad_id, padding="left")
  for k, (shape, dtype) in spec.items():
    assert left[k].shape == (len(samples) + 1,) + shape and left[k].dtype == dtype, k
  for i, s in enumerate(samples):
    n = int(s["attention_mask"].sum())
    shift = 128 - n
    assert np.array_equal(left["input_ids"][i, shift:], s["input_ids"][:n])
    assert np.array_equal(left["labels"][i, shift:], s["labels"][:n])
    assert not left["attention_mask"][i, :shift].any() and left["attention_mask"][i, shift:].all()
    for k in ("image_start", "region_positions", "seg_positions"):
      assert np.array_equal(left[k][i], np.where(s[k] >= 0, s[k] + shift, -1)), k
    for k in ("clip_image", "region_masks", "sam_image", "sam_resized_hw", "masks", "orig_hw"):
      assert np.array_equal(left[k][i], s[k]), k
  kinds = {int(s["region_positions"][0] >= 0) + 2 * int(s["seg_positions"][0] >= 0) for s in samples}
  assert kinds >= {1, 2}  # region and grounding samples were both moved
  assert not left["attention_mask"][-1].any() and left["image_start"][-1] == -1  # {}: empty
  with pytest.raises(ValueError, match="not in the batch contract"):
    collate([{"id": "x"}], c.model, 128, tok.pad_id)
  with pytest.raises(ValueError, match="does not fit"):
    collate([{"input_ids": np.zeros(129, np.int32)}], c.model, 128, tok.pad_id)


def test_two_workers_give_valid_deterministic_batches(data):
  _, paths, tok = data
  c = _config(data, [paths["train"]])
  c.data.num_workers = 2
  a = pipeline.make_train_iterator(c, tok)
  first = [next(a) for _ in range(2)]
  state = a.get_state()
  third = next(a)
  b = pipeline.make_train_iterator(c, tok)
  assert all(_equal(next(b), f) for f in first)
  b.set_state(state)
  assert _equal(next(b), third)
