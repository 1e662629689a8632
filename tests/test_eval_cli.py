"""Evaluation runner and `medplib eval`: metric wiring on worked rows, resumability, CLI contract."""

import json
import os

import numpy as np
import pytest
from PIL import Image

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
  assert len(_lines(os.path.join(out, "predictions.jsonl"))) == n  # the torn line was cut off


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


def test_every_round_is_scored(model, data):
  """A two-round record gives two scored rounds (the old runner scored its first question only
  and counted the second in `rounds_not_scored`)."""
  with open(data) as f:
    records = [r for r in json.load(f) if r["task"] == "C"][:2]
  first = records[0]
  two_rounds = dict(first, id="two_rounds", conversations=first["conversations"] + [
      {"from": "human", "value": "and the modality?"}, {"from": "gpt", "value": "ct"}])
  root = os.path.dirname(data)
  metrics = runner.evaluate(model, [two_rounds, records[1]], root, "vqa", "correct",
                            batch_size=BATCH, max_new_tokens=NEW)
  assert (metrics["num_records"], metrics["num_rounds"], metrics["num_errors"]) == (2, 3, 0)
  assert metrics["num_open"] + metrics["num_closed"] == 3


def _png(path, array):
  Image.fromarray(array).save(path)


@pytest.fixture()
def two_round_data(tmp_path):
  """16x16 image; masks: liver = top-left 4x4 (16 px), kidney = bottom half (128 px); regions
  r1 (top-left 4x4), r2 (top-right 4x4). Grounding records of 2 and 3 rounds (the middle one
  a text question), a two-round region record."""
  _png(tmp_path / "ct_1.png", np.full((16, 16, 3), 90, np.uint8))
  liver, kidney, r1, r2 = (np.zeros((16, 16), np.uint8) for _ in range(4))
  liver[:4, :4] = kidney[8:] = r1[:4, :4] = r2[:4, 12:] = 255
  for name, m in dict(liver=liver, kidney=kidney, r1=r1, r2=r2).items():
    _png(tmp_path / f"{name}.png", m)

  def rec(rid, *turns):
    return {"id": rid, "image": "ct_1.png", "answer_type": "OPEN", "conversations": [
        {"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(turns)]}
  records = [
      rec("g2", "<image>\nSegment the liver.", "It is <SEG><mask>liver.png</mask>.",
          "And the kidney?", "Here: <SEG><mask>kidney.png</mask>."),
      rec("g3", "<image>\nSegment the liver.", "Sure, <SEG><mask>liver.png</mask>.",
          "Is it enlarged?", "no", "Now the kidney.", "<SEG><mask>kidney.png</mask>"),
      rec("r2", "<image>\nWhat is at <region>r1.png</region>?", "the liver",
          "And at <region>r2.png</region>?", "the spleen"),
  ]
  return records, str(tmp_path), {"liver": liver > 0, "r1": r1 > 0, "r2": r2 > 0}


def test_each_round_gets_its_history_regions_and_masks(model, two_round_data, tmp_path,
                                                         monkeypatch):
  """Round k's prompt holds rounds 1..k-1 with their ground-truth answers, the regions up to its
  question, and is scored against its own answer's mask; rounds of different records share
  device batches, and the resume key is (record, round)."""
  records, root, m = two_round_data
  prepared, calls = [], []
  real_prepare = model.prepare

  def prepare(image, question, region_masks=(), **kwargs):
    sample = real_prepare(image, question, region_masks, **kwargs)
    prepared.append({"question": question, "regions": [np.asarray(r) for r in region_masks],
                     "history": list(kwargs["history"]), "prompt": sample.prompt})
    return sample

  def run(samples, **kwargs):  # every prediction is the liver mask
    calls.append(len(samples))
    return [api.Prediction(text="it", masks=[m["liver"]], mask_scores=[1.0], seg_found=True,
                           forced=False, raw_text="it", tokens=[]) for _ in samples]
  monkeypatch.setattr(model, "prepare", prepare)
  monkeypatch.setattr(model, "run", run)
  monkeypatch.setattr(model, "max_regions", 2)  # one region slot per round, as the demo model has

  out = str(tmp_path / "ground")
  metrics = runner.evaluate(model, records, root, "ground", "correct", out, batch_size=3,
                            max_new_tokens=NEW)
  assert calls == [3, 1]  # four scored rounds of two records, three per batch
  with open(os.path.join(out, "predictions.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [(r["key"], r["round"]) for r in rows] == [("g2", 1), ("g2", 2), ("g3", 1), ("g3", 3)]
  # Pred = liver (16 px): round "liver" I 16, U 16; round "kidney" (128 px, disjoint) I 0, U 144.
  assert [(r["intersection"], r["union"]) for r in rows] == [
      ([16], [16]), ([0], [144]), ([16], [16]), ([0], [144])]
  assert [r["answer"] for r in rows] == ["It is .", "Here: .", "Sure, .", ""]
  assert (metrics["num_records"], metrics["num_rounds"], metrics["rounds_without_mask"]) == (2, 4, 1)
  assert metrics["miou"] == 50.0 and metrics["ciou"] == pytest.approx(100 * 32 / 320)
  g2_round2, g3_round3 = prepared[1], prepared[3]
  assert g2_round2["history"] == [("<image>\nSegment the liver.", "It is <SEG>.")]
  assert "It is <SEG>." in g2_round2["prompt"] and "And the kidney?" in g2_round2["prompt"]
  assert [a for _, a in g3_round3["history"]] == ["Sure, <SEG>.", "no"]  # the text round too
  assert "Is it enlarged?" in g3_round3["prompt"] and "no" in g3_round3["prompt"]

  prepared.clear()
  region = runner.evaluate(model, records, root, "region", "correct", batch_size=3,
                           max_new_tokens=NEW)
  assert region["num_rounds"] == 2 and region["num_errors"] == 0
  assert [len(p["regions"]) for p in prepared] == [1, 2]  # round 2 refers to both regions
  np.testing.assert_array_equal(prepared[0]["regions"][0], m["r1"])
  np.testing.assert_array_equal(prepared[1]["regions"][1], m["r2"])
  assert "the liver" in prepared[1]["prompt"]

  with open(os.path.join(out, "predictions.jsonl"), "w") as f:  # lose g2's second round
    f.writelines(json.dumps(r) + "\n" for r in rows if (r["key"], r["round"]) != ("g2", 2))
  calls.clear()
  again = runner.evaluate(model, records, root, "ground", "correct", out, batch_size=3,
                          max_new_tokens=NEW)
  assert calls == [1] and again == metrics


def test_rounds_out_of_order_give_an_error_row():
  with pytest.raises(runner.BadRecord, match="expected a 'gpt' turn"):
    runner.conversation_rounds([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}])
  rounds = runner.conversation_rounds([  # a leading gpt turn is dropped, as the templates drop it
      {"from": "gpt", "value": "hello <region></region>"}, {"from": "human", "value": "q"},
      {"from": "gpt", "value": "a"}, {"from": "human", "value": "unanswered"}])
  assert [(r.number, r.question, r.regions, r.masks) for r in rounds] == [(1, "q", 1, ())]


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_predictions_rescore_our_rows_and_the_reference_answer_file(model, data, tmp_path,
                                                                    capsys):
  """--predictions on the rows `evaluate` wrote, and on the same answers laid out as the
  reference's vqa_infer.py answer file, gives the metrics `evaluate` wrote."""
  for task in ("ground", "vqa"):
    out = str(tmp_path / task)
    written = runner.evaluate(model, data, "", task, "correct", out, batch_size=BATCH,
                              max_new_tokens=NEW)
    written.pop("rounds_without_mask", None)  # known only with the records
    assert cli.main(["eval", "--predictions", os.path.join(out, "predictions.jsonl"),
                     "--task", task, "--out", str(tmp_path / f"re_{task}")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed.pop("predictions_format") == "medplib" and printed == written
    with open(tmp_path / f"re_{task}" / "metrics.json") as f:
      assert json.load(f)["miou" if task == "ground" else "accuracy"] == printed[
          "miou" if task == "ground" else "accuracy"]

  with open(data) as f:
    images = {r["id"]: r["image"] for r in json.load(f)}
  answers = tmp_path / "answer-file.jsonl"
  with open(answers, "w") as f:
    for i, r in enumerate(_lines(tmp_path / "vqa" / "predictions.jsonl")):
      f.write(json.dumps({"question_id": i, "image_path": "/data/" + images[r["id"]],
                          "prompt": r["question"], "gt": r["answer"], "text": r["prediction"],
                          "answer_id": "x", "model_id": "m", "answer_type": r["answer_type"],
                          "metadata": {}}) + "\n")
  rescored = runner.score_predictions(str(answers), "vqa", "correct")
  assert rescored.pop("predictions_format") == "reference" and rescored == written
  assert runner.score_predictions(str(answers), "vqa", "reference")["mode"] == "reference"


def test_predictions_bad_rows_give_one_line(tmp_path, capsys):
  good = {"question_id": 0, "prompt": "q", "gt": "yes", "text": "yes", "answer_type": "closed"}
  cases = [
      ("vqa", [good, {k: v for k, v in good.items() if k != "gt"}], "line 2: missing field 'gt'"),
      ("vqa", [good, dict(good, text=3)], "line 2: field 'text' is int, expected str"),
      ("ground", [good], "line 1: a reference answer-file row"),
      ("vqa", ["{not json"], "line 1: not a JSON object"),
      ("ground", [{"key": "a", "round": 1, "modality": "ct", "iou": 0.5},
                  {"key": "b", "round": 1, "modality": "ct"}], "line 2: missing field 'intersection'"),
      ("ground", [{"key": "a", "round": 1, "task": "C", "modality": "ct"}], "line 1: a task 'C' row"),
      ("vqa", [good, {k: v for k, v in good.items() if k != "question_id"}],
       "line 2: missing field 'question_id'"),
      ("vqa", [{"prompt": "q"}], "line 1: neither a `medplib eval` row (key) nor"),
      ("vqa", [{"key": "a", "round": 1, "modality": "ct", "answer": "x", "answer_type": "open"}],
       "line 1: missing field 'prediction'"),
      ("vqa", [], "no prediction rows"),
  ]
  for i, (task, lines, message) in enumerate(cases):
    path = tmp_path / f"bad{i}.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    assert cli.main(["eval", "--predictions", str(path), "--task", task]) == 2, message
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
  assert cli.main(["eval", "--predictions", str(tmp_path / "none.jsonl"), "--task", "vqa"]) == 2
  assert "cannot read predictions file" in capsys.readouterr().err
  assert cli.main(["eval", "--predictions", str(path), "--checkpoint", "x", "--task", "vqa"]) == 2
  assert "takes no --checkpoint" in capsys.readouterr().err
  assert cli.main(["eval", "--task", "vqa", "--data", "x.json"]) == 2
  assert "--checkpoint --out required" in capsys.readouterr().err


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
