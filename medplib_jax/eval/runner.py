"""Batched evaluation of a loaded model on MeCoVQA-format data: predictions JSONL + metrics.

`evaluate(model_api, records, image_root, task, mode, out_dir=None, batch_size=8)`:
* records: a list of MeCoVQA records, a JSON file, or a TFDS directory (`medplib data build`),
  read by `data/sources.py read_examples`; only the records of `task` are used (vqa -> C,
  region -> R, ground -> G);
* every batch of `batch_size` records runs through one jitted call (the last one is padded);
* with `out_dir`, each finished record is appended to `predictions.jsonl` at once, and a rerun
  skips the ids found there (resumable); `metrics.json` is written at the end. `run.json` records
  the settings, and a rerun with different settings is refused rather than mixed in;
* each record is scored on its first question; later rounds of multi-turn records are counted
  in `rounds_not_scored` (and reported on stderr), not scored;
* metrics are computed from the prediction rows (so a resumed run scores all of them):
  vqa / region -> `VqaAccumulator` (closed accuracy, open recall / F1 / BLEU / open accuracy) plus
  `accuracy` = share of normalised answers equal to the reference answer (all questions);
  ground -> mIoU / mDice overall and per modality from the per-sample IoUs.
Mode ``reference`` uses the reference settings end to end (vicuna_v1 prompt, forced mask,
reference crop, 0.1 threshold, reference metric formulas); ``correct`` is the default.
"""

import json
import os
import sys

import numpy as np
import tqdm

from medplib_jax.data.mecovqa import BadRecord, decode_raw
from medplib_jax.data.sources import read_examples
from medplib_jax.data.template import GPT, HUMAN
from medplib_jax.eval import grounding_metrics as gm
from medplib_jax.eval import vqa_metrics as vm
from medplib_jax.infer.api import MODES, InputError
from medplib_jax.infer.masks import mask_rle

TASKS = {"vqa": "C", "region": "R", "ground": "G"}
PREDICTIONS, METRICS, RUN = "predictions.jsonl", "metrics.json", "run.json"


class EvalError(ValueError):
  """Evaluation that cannot run as asked (bad task/mode, data missing, mismatched resume)."""


def _question_answer(conversations) -> tuple[str, str]:
  """The first human question and the answer that follows it."""
  question = next((t["value"] for t in conversations if t["from"] == HUMAN), "")
  answer = next((t["value"] for t in conversations if t["from"] == GPT), "")
  return str(question), str(answer).replace("<SEG>", "").strip()


def _read_rows(path: str) -> dict:
  """Finished rows by key; a torn last line (interrupted write) is ignored and redone."""
  rows = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        rows[row["key"]] = row
  return rows


def _check_run(out_dir: str, settings: dict) -> None:
  path = os.path.join(out_dir, RUN)
  if os.path.isfile(path):
    with open(path) as f:
      previous = json.load(f)
    differ = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
    if differ:
      raise EvalError(f"{out_dir} holds predictions of a different run ({differ}, as (old, new)); "
                      "use another --out directory or delete it")
  with open(path, "w") as f:
    json.dump(settings, f, indent=1)


def metrics_from_rows(rows: list[dict], task: str, mode: str) -> dict:
  """Task metrics from prediction rows (rows with an "error" are counted, not scored)."""
  scored = [r for r in rows if "error" not in r]
  out = {"task": task, "mode": mode, "num_records": len(rows),
         "num_errors": len(rows) - len(scored)}
  if task == "ground":
    acc = {}
    for r in scored:
      acc.setdefault(r["modality"], []).append(r["iou"])
    ious = [r["iou"] for r in scored]

    def summary(values):
      if not values:
        return {"miou": None, "mdice": None, "num_samples": 0}
      return {"miou": 100.0 * float(np.mean(values)),
              "mdice": 100.0 * float(np.mean([gm.dice_from_iou(v) for v in values])),
              "num_samples": len(values)}
    out.update(summary(ious), by_modality={m: summary(v) for m, v in sorted(acc.items())})
    out["seg_rate"] = 100.0 * float(np.mean([r["seg_found"] for r in scored])) if scored else None
    return out
  acc = vm.VqaAccumulator(mode)
  hits = []
  for r in scored:
    acc.add(r["prediction"], r["answer"], r["answer_type"] or "open", r["modality"])
    hits.append(vm.closed_match(r["prediction"], r["answer"], mode))
  out.update(acc.result())
  out["mode"] = mode
  out["accuracy"] = 100.0 * float(np.mean(hits)) if hits else None
  return out


def evaluate(model_api, records, image_root: str = "", task: str = "vqa", mode: str = "correct",
             out_dir: str | None = None, batch_size: int = 8, max_new_tokens: int = 64,
             split: str = "test", progress: bool = False, limit: int | None = None) -> dict:
  """Runs `model_api` (an infer.api.MedPLIB) on the task's records; returns the metrics dict."""
  if task not in TASKS:
    raise EvalError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
  if mode not in MODES:
    raise EvalError(f"unknown mode {mode!r}; choose one of {MODES}")
  template = "vicuna_v1" if mode == "reference" else model_api.template
  settings = {"task": task, "mode": mode, "template": template, "max_new_tokens": max_new_tokens,
              "data": records if isinstance(records, str) else "<records>"}
  done, pred_path = {}, None
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    _check_run(out_dir, settings)
    pred_path = os.path.join(out_dir, PREDICTIONS)
    done = _read_rows(pred_path)

  try:
    examples = read_examples(records, image_root, split)
  except FileNotFoundError as e:
    raise EvalError(f"evaluation data {e}") from e
  items, seen = [], set()
  for rid, raw in examples:
    key = rid if rid not in seen else f"{rid}#{len(seen)}"
    seen.add(key)
    if isinstance(raw, BadRecord) or raw.task == TASKS[task]:
      items.append((key, raw))
    if limit is not None and len(items) >= limit:
      break
  todo = [(k, raw) for k, raw in items if k not in done]
  # Each record is scored on its first question; later rounds of multi-turn records are counted
  # (and reported) rather than dropped silently.
  later_rounds = sum(max(0, sum(t["from"] == GPT for t in raw.conversations) - 1)
                     for _, raw in items if not isinstance(raw, BadRecord))
  if later_rounds:
    print(f"eval {task}: {later_rounds} later round(s) of multi-turn records are not scored "
          f"(each record is scored on its first question)", file=sys.stderr)

  bar = None
  if progress:
    bar = tqdm.tqdm(total=len(items), initial=len(items) - len(todo), unit="rec", file=sys.stderr,
                    desc=f"eval {task} ({mode})")
  sink = open(pred_path, "a") if pred_path else None
  try:
    for start in range(0, len(todo), batch_size):
      rows = _run_batch(model_api, todo[start:start + batch_size], task, mode, template,
                        max_new_tokens, batch_size)
      for row in rows:
        done[row["key"]] = row
        if sink:
          sink.write(json.dumps(row) + "\n")
      if sink:
        sink.flush()
        os.fsync(sink.fileno())
      if bar:
        bar.update(len(rows))
  finally:
    if sink:
      sink.close()
    if bar:
      bar.close()

  metrics = metrics_from_rows([done[k] for k, _ in items if k in done], task, mode)
  metrics["rounds_not_scored"] = later_rounds
  if out_dir:
    with open(os.path.join(out_dir, METRICS), "w") as f:
      json.dump(metrics, f, indent=1)
  return metrics


def _run_batch(model_api, chunk, task, mode, template, max_new_tokens, batch_size) -> list[dict]:
  rows, samples, pending = [], [], []
  for key, raw in chunk:
    if isinstance(raw, BadRecord):
      rows.append({"key": key, "id": key, "error": str(raw)})
      continue
    question, answer = _question_answer(raw.conversations)
    row = {"key": key, "id": raw.id, "task": raw.task, "modality": raw.modality,
           "answer_type": raw.answer_type.lower(), "question": question, "answer": answer}
    try:
      ex = decode_raw(raw)
      if ex.image is None:
        raise InputError("record has no image")
      samples.append(model_api.prepare(ex.image, question, ex.regions, template=template,
                                       max_new_tokens=max_new_tokens))
      pending.append((row, ex))
    except (BadRecord, InputError) as e:
      rows.append(dict(row, error=str(e)))
  if samples:
    preds = model_api.run(samples, max_new_tokens=max_new_tokens, mode=mode, batch_size=batch_size)
    for (row, ex), pred in zip(pending, preds):
      row.update(prediction=pred.text, seg_found=pred.seg_found, forced=pred.forced)
      if task == "ground":
        gt = np.stack(ex.masks) if ex.masks else None
        pred_mask = np.stack(pred.masks) if pred.masks else None
        row["iou"] = gm.sample_iou(pred_mask, gt, mode) if gt is not None else 0.0
        row["dice"] = gm.dice_from_iou(row["iou"])
        row["masks_rle"] = [mask_rle(m) for m in pred.masks]
      rows.append(row)
  return rows
