"""Evaluation runner and `medplib eval`: metric wiring on worked rows, resumability, CLI contract."""

import json
import os

import numpy as np
import pytest

from medplib_jax import cli
from medplib_jax.data.synth import write_synthetic
from medplib_jax.eval import grounding_metrics as gm
from medplib_jax.eval import runner
from medplib_jax.infer.masks import mask_rle
from medplib_jax.infer import api
from tiny_checkpoint import make_tiny_checkpoint

NEW, BATCH = 4, 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return api.MedPLIB.from_pretrained(make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt"))))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synth"))
  return write_synthetic(root, n=2, seed=0, splits=(("test", 1.0),))["test"]


def _task_count(path, task):
  with open(path) as f:
    return sum(r["task"] == runner.TASKS[task] for r in json.load(f))


def test_vqa_metrics_from_worked_rows():
  rows = [
      {"prediction": "Yes.", "answer": "yes", "answer_type": "closed", "modality": "ct"},
      {"prediction": "no", "answer": "yes", "answer_type": "closed", "modality": "ct"},
      {"prediction": "the left kidney", "answer": "left kidney", "answer_type": "open", "modality": "mr"},
      {"prediction": "liver", "answer": "spleen", "answer_type": "open", "modality": "mr"},
      {"key": "bad", "error": "missing_image [image]: ..."},
  ]
  m = runner.metrics_from_rows(rows, "vqa", "correct")
  assert m["mode"] == "correct" and m["num_records"] == 5 and m["num_errors"] == 1
  assert m["closed_accuracy"] == pytest.approx(50.0)
  assert m["accuracy"] == pytest.approx(50.0)  # "Yes." and "the left kidney" match after normalising
  assert m["recall"] == pytest.approx(50.0) and m["num_open"] == 2 and m["num_closed"] == 2
  assert m["closed_accuracy_by_modality"] == {"ct": 50.0}


def test_grounding_metrics_match_the_accumulator():
  gt = np.zeros((4, 4), bool)
  gt[:2, :2] = True
  preds = {"ct_a": gt.copy(), "ct_b": np.zeros_like(gt), "mr_c": np.ones_like(gt)}
  preds["ct_b"][:1, :2] = True  # IoU 0.5
  rows = [{"modality": k.split("_")[0], "iou": gm.sample_iou(p, gt), "seg_found": True}
          for k, p in preds.items()]
  ours = runner.metrics_from_rows(rows, "ground", "correct")
  acc = gm.GroundingAccumulator("correct")
  for k, p in preds.items():
    acc.add(p, gt, k.split("_")[0])
  ref = acc.result()
  assert ours["miou"] == pytest.approx(ref["miou"]) == pytest.approx(100 * (1 + 0.5 + 0.25) / 3)
  assert ours["mdice"] == pytest.approx(ref["mdice"])
  for mod in ("ct", "mr"):
    assert ours["by_modality"][mod]["mdice"] == pytest.approx(ref["by_modality"][mod]["mdice"])


def test_mask_rle_round_trip():
  mask = np.zeros((3, 5), bool)
  mask[0, 0] = mask[1, 2:5] = mask[2, 0] = True
  rle = mask_rle(mask)
  flat, value = [], False
  for c in rle["counts"]:
    flat += [value] * c
    value = not value
  assert rle["size"] == [3, 5] and rle["counts"][0] == 0
  np.testing.assert_array_equal(np.array(flat).reshape(3, 5), mask)


def test_ground_eval_writes_rows_and_resumes(model, data, tmp_path, monkeypatch):
  out = str(tmp_path / "ground")
  n = _task_count(data, "ground")
  metrics = runner.evaluate(model, data, "", "ground", "correct", out, batch_size=BATCH,
                            max_new_tokens=NEW)
  with open(os.path.join(out, "predictions.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == n == metrics["num_records"] and metrics["mode"] == "correct"
  assert all(0.0 <= r["iou"] <= 1.0 and "prediction" in r for r in rows)
  assert set(metrics["by_modality"]) == {r["modality"] for r in rows}
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f) == metrics

  calls = []
  real_run = model.run
  monkeypatch.setattr(model, "run", lambda samples, **k: calls.append(len(samples)) or real_run(samples, **k))
  again = runner.evaluate(model, data, "", "ground", "correct", out, batch_size=BATCH,
                          max_new_tokens=NEW)
  assert calls == [] and again == metrics  # nothing redone
  with open(os.path.join(out, "predictions.jsonl"), "w") as f:  # lose the last row, tear a line
    f.writelines(json.dumps(r) + "\n" for r in rows[:-1])
    f.write('{"key": "torn')
  runner.evaluate(model, data, "", "ground", "correct", out, batch_size=BATCH, max_new_tokens=NEW)
  assert calls == [1]  # only the missing record ran


def test_reference_mode_always_decodes_a_mask(model, data, tmp_path):
  m = runner.evaluate(model, data, "", "ground", "reference", None, batch_size=BATCH,
                      max_new_tokens=NEW, limit=2)
  assert m["mode"] == "reference" and m["num_samples"] == 2


def test_region_and_vqa_tasks(model, data):
  region = runner.evaluate(model, data, "", "region", "correct", batch_size=BATCH,
                           max_new_tokens=NEW, limit=2)
  vqa = runner.evaluate(model, data, "", "vqa", "correct", batch_size=BATCH, max_new_tokens=NEW,
                        limit=2)
  assert region["num_records"] == 2 and region["num_errors"] == 0 and region["accuracy"] is not None
  assert vqa["num_records"] == 2 and vqa["num_errors"] == 0
  assert vqa["num_open"] + vqa["num_closed"] == 2


def test_later_rounds_are_counted_not_dropped(model, data, capsys):
  """A two-round record is scored on its first question; its second round is reported."""
  with open(data) as f:
    records = [r for r in json.load(f) if r["task"] == "C"][:2]
  first = records[0]
  two_rounds = dict(first, id="two_rounds", conversations=first["conversations"] + [
      {"from": "human", "value": "and the modality?"}, {"from": "gpt", "value": "ct"}])
  root = os.path.dirname(data)
  metrics = runner.evaluate(model, [two_rounds, records[1]], root, "vqa", "correct",
                            batch_size=BATCH, max_new_tokens=NEW)
  assert metrics["num_records"] == 2 and metrics["rounds_not_scored"] == 1
  assert "1 later round(s) of multi-turn records are not scored" in capsys.readouterr().err
  single = runner.evaluate(model, records, root, "vqa", "correct", batch_size=BATCH,
                           max_new_tokens=NEW)
  assert single["rounds_not_scored"] == 0


def test_eval_cli_and_refused_mismatched_resume(model, data, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(api.MedPLIB, "from_pretrained", classmethod(lambda cls, *a, **k: model))
  out = str(tmp_path / "cli")
  base = ["eval", "--checkpoint", "unused", "--data", data, "--task", "vqa", "--out", out,
          "--batch-size", str(BATCH), "--max-new-tokens", str(NEW), "--limit", "2", "--no-progress"]
  assert cli.main(base) == 0
  printed = json.loads(capsys.readouterr().out)
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f) == printed and printed["mode"] == "correct" and printed["task"] == "vqa"
  assert cli.main(base + ["--mode", "reference"]) == 2
  assert "different run" in capsys.readouterr().err
  assert cli.main(["eval", "--checkpoint", "unused", "--data", str(tmp_path / "none.json"),
                   "--task", "vqa", "--out", str(tmp_path / "other")]) == 2
  assert "neither a JSON file nor a TFDS directory" in capsys.readouterr().err
