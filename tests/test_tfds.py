"""TFDS (ArrayRecord) build -> read round trip, without TensorFlow."""

import json
import os

import numpy as np

from configs.common import base_config
from medplib_jax.cli import main as medplib_main
from medplib_jax.data import mecovqa, pipeline, synth, tfds_builder
from medplib_jax.data.template import template_texts
from medplib_jax.data.tokenizer import load_tokenizer, train_tokenizer


def test_build_read_round_trip(tmp_path, capsys):
  root = tmp_path / "synth"
  paths = synth.write_synthetic(str(root), 6, seed=1)
  recs = json.load(open(paths["train"]))
  bad = dict(recs[0], id="escape", image="../x.png")
  src_json = tmp_path / "with_bad.json"
  json.dump(recs + [bad], open(src_json, "w"))
  out = tmp_path / "tfds"
  rc = medplib_main(["data", "build", "--json", str(src_json), "--split", "train",
                     "--json", paths["test"], "--split", "test", "--image-root", str(root),
                     "--out", str(out)])
  assert rc == 0
  printed = capsys.readouterr().out
  assert f"{len(recs)}\tescape\timage\tpath_outside_root" in printed

  counts = tfds_builder.dataset_counts(str(out))
  assert counts["train"]["total"] == len(recs)
  want_tasks = {}
  for r in recs:
    t = mecovqa.parse_record(r).task
    want_tasks[t] = want_tasks.get(t, 0) + 1
  assert counts["train"]["task"] == want_tasks
  assert sum(counts["train"]["modality"].values()) == len(recs)

  source = tfds_builder.open_split(str(out), "train")
  assert len(source) == len(recs)
  by_id = {str(r["id"]): r for r in recs}
  for i in range(len(source)):
    ex = tfds_builder.example_from_tfds(source[i])
    rec = by_id[ex.id]
    want = mecovqa.load_raw(rec, str(root))
    assert ex.image == want.image  # the synthetic images are PNG: stored byte for byte
    assert ex.masks == want.masks and ex.regions == want.regions
    assert ex.conversations == want.conversations and ex.task == want.task
    assert "</mask>" not in json.dumps(ex.conversations)

  # The training pipeline reads the built dataset like the JSON.
  texts = [t["value"] for r in recs for t in r["conversations"]]
  tok = load_tokenizer(train_tokenizer(texts + template_texts() * 20, str(tmp_path / "tok")))
  c = base_config(stage=3, size="tiny")
  c.data.train = (str(out),)
  c.data.max_length = 128
  c.optim.global_batch_size = 2
  b_tfds = next(pipeline.make_train_iterator(c, tok))
  assert b_tfds["input_ids"].shape == (2, 128) and np.all(b_tfds["image_start"] >= 0)
  test_src = tfds_builder.open_split(os.path.join(str(out), "mecovqa", "1.0.0"), "test")
  assert len(test_src) == len(json.load(open(paths["test"])))
