"""Batched evaluation of a loaded model on MeCoVQA-format data, and rescoring of predictions.

`evaluate(model_api, records, image_root, task, mode, out_dir=None, batch_size=8)`:
* records: a list of MeCoVQA records, a JSON file, or a TFDS directory (`medplib data build`),
  read by `data/sources.py read_examples`; only the records of `task` are used (vqa -> C,
  region -> R, ground -> G);
* every round (a human question and the gpt answer after it) of each record is scored; round
  k's prompt holds rounds 1..k-1 with their ground-truth answers (teacher forcing, laid out as
  training lays out the conversation: `MedPLIB.prepare(history=...)`), the region masks of every
  `<region></region>` up to its question, and its answer's `<SEG>` masks are its ground truth.
  Grounding scores the rounds whose answer has a mask; the others are only history (counted in
  `rounds_without_mask`);
* every batch of `batch_size` rounds (of any records) runs through one jitted call (the last one
  is padded);
* with `out_dir`, each finished round is appended to `predictions.jsonl` at once, and a rerun
  skips the (key, round) pairs found there (resumable); `metrics.json` is written at the end.
  `run.json` records the settings, and a rerun with different settings is refused rather than
  mixed in;
* metrics are computed from the prediction rows (so a resumed run scores all of them):
  vqa / region -> `VqaAccumulator` (closed accuracy, open recall / F1 / BLEU / open accuracy) plus
  `accuracy` = share of normalised answers equal to the reference answer (all questions);
  ground -> mIoU / mDice, gIoU / cIoU and median Dice overall and per modality, recomputed from
  each row's pixel counts.

`score_predictions(path, task, mode)` scores an existing predictions file without a model: our
predictions.jsonl or the reference's answer file (model/eval/vqa_infer.py's JSONL).

Mode ``reference`` uses the reference settings end to end (vicuna_v1 prompt, forced mask,
reference crop, 0.1 threshold, reference metric formulas); ``correct`` is the default.
"""

import dataclasses
import json
import os
import sys

import numpy as np
import tqdm

from medplib_jax.data.mecovqa import SEG_TOKEN, BadRecord, decode_raw, modality_of
from medplib_jax.data.sources import read_examples
from medplib_jax.data.template import GPT, HUMAN
from medplib_jax.eval import grounding_metrics as gm
from medplib_jax.eval import vqa_metrics as vm
from medplib_jax.infer.api import MODES, REGION_TAGS, InputError
from medplib_jax.infer.masks import mask_rle

TASKS = {"vqa": "C", "region": "R", "ground": "G"}
PREDICTIONS, METRICS, RUN = "predictions.jsonl", "metrics.json", "run.json"
RECORD_ROUND = 0  # the `round` of an error row for a record whose rounds are unknown
# The reference's answer file (vqa_infer.py validate_vqa): the fields scoring needs.
REFERENCE_FIELDS = ("question_id", "text", "gt", "answer_type")


class EvalError(ValueError):
  """Evaluation that cannot run as asked (bad task/mode, data missing, mismatched resume)."""


@dataclasses.dataclass(frozen=True)
class Round:
  """One question of a record and the answer that follows it.

  number: 1-based; answer: the gpt turn as the record has it (`<SEG>` kept: what later rounds
  see as history); history: ((question, answer), ...) of the earlier rounds; regions: how many
  of the record's region masks the prompt up to this question refers to (the first ones);
  masks: indices in the record's mask list of this answer's ground truth.
  """
  number: int
  question: str
  answer: str
  history: tuple
  regions: int
  masks: tuple


def conversation_rounds(conversations) -> list[Round]:
  """The rounds of a record's (cleaned) turns, with their share of its regions and masks.

  Regions are numbered by their `<region></region>` across all turns, masks by the `<SEG>`
  tokens across all turns (data/mecovqa.py parse_record). A leading gpt turn is dropped as the
  templates drop it, a trailing question without an answer is not a round. Raises BadRecord
  when the turns do not alternate human / gpt.
  """
  turns = [dict(t, value=str(t["value"])) for t in conversations]
  regions = masks = 0
  if turns and turns[0]["from"] != HUMAN:
    regions, masks = turns[0]["value"].count(REGION_TAGS), turns[0]["value"].count(SEG_TOKEN)
    turns = turns[1:]
  for j, turn in enumerate(turns):
    if turn["from"] != (HUMAN, GPT)[j % 2]:
      raise BadRecord("malformed", f"conversations[{j}]",
                      f"expected a {(HUMAN, GPT)[j % 2]!r} turn, got {turn['from']!r}")
  rounds = []
  for human, gpt in zip(turns[0::2], turns[1::2]):
    regions += human["value"].count(REGION_TAGS)
    masks += human["value"].count(SEG_TOKEN)  # a mask named in a question answers nothing
    n_seg = gpt["value"].count(SEG_TOKEN)
    rounds.append(Round(len(rounds) + 1, human["value"], gpt["value"],
                        tuple((r.question, r.answer) for r in rounds), regions,
                        tuple(range(masks, masks + n_seg))))
    regions += gpt["value"].count(REGION_TAGS)
    masks += n_seg
  return rounds


def _answer_text(answer: str) -> str:
  """The answer as scored: `<SEG>` removed."""
  return answer.replace(SEG_TOKEN, "").strip()


def _read_rows(path: str) -> dict:
  """Finished rows by (key, round). A line that is not JSON is ignored (its round is redone); a
  torn last line (interrupted write) is cut off, so the next row starts on a line of its own."""
  rows = {}
  if not os.path.isfile(path):
    return rows
  with open(path, "rb") as f:
    lines = f.readlines()
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if line.endswith(b"\n"):
      rows[(row["key"], row.get("round"))] = row
  if lines and not lines[-1].endswith(b"\n"):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) - len(lines[-1]))
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
  """Task metrics from prediction rows, one per round (rows with an "error" are counted, not
  scored). Grounding rows are rescored from their `intersection` / `union` pixel counts when
  they have them, from their `iou` otherwise."""
  scored = [r for r in rows if "error" not in r]
  records = {r.get("key", ("row", i)) for i, r in enumerate(rows)}  # a row without key: its own
  out = {"task": task, "mode": mode, "num_records": len(records), "num_rounds": len(rows),
         "num_errors": len(rows) - len(scored)}
  if task == "ground":
    acc = gm.GroundingAccumulator(mode)
    for r in scored:
      if "intersection" in r:
        acc.add_counts(r["intersection"], r["union"], r["modality"])
      else:
        acc.add_iou(r["iou"], r["modality"])
    out.update({k: v for k, v in acc.result().items() if k != "mode"})
    seg = [r["seg_found"] for r in scored if "seg_found" in r]
    out["seg_rate"] = 100.0 * float(np.mean(seg)) if seg else None
    return out
  acc = vm.VqaAccumulator(mode)
  hits = []
  for r in scored:
    acc.add(r["prediction"], r["answer"], r["answer_type"], r["modality"])
    hits.append(vm.closed_match(r["prediction"], r["answer"], mode))
  out.update(acc.result())
  out["mode"] = mode
  out["accuracy"] = 100.0 * float(np.mean(hits)) if hits else None
  return out


def evaluate(model_api, records, image_root: str = "", task: str = "vqa", mode: str = "correct",
             out_dir: str | None = None, batch_size: int = 8, max_new_tokens: int = 64,
             split: str = "test", progress: bool = False, limit: int | None = None) -> dict:
  """Runs `model_api` (an infer.api.MedPLIB) on every round of the task's records (the first
  `limit` records); returns the metrics dict."""
  if task not in TASKS:
    raise EvalError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
  if mode not in MODES:
    raise EvalError(f"unknown mode {mode!r}; choose one of {MODES}")
  template = "vicuna_v1" if mode == "reference" else model_api.template
  settings = {"task": task, "mode": mode, "template": template, "max_new_tokens": max_new_tokens,
              "data": records if isinstance(records, str) else "<records>", "rounds": "all"}
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
  # Work items: (key, raw, Round), or (key, BadRecord, None) for a record that cannot be read.
  items, seen, num_records, without_mask = [], set(), 0, 0
  for rid, raw in examples:
    key = rid if rid not in seen else f"{rid}#{len(seen)}"
    seen.add(key)
    if not isinstance(raw, BadRecord) and raw.task != TASKS[task]:
      continue
    num_records += 1
    try:
      rounds = [] if isinstance(raw, BadRecord) else conversation_rounds(raw.conversations)
    except BadRecord as e:
      raw, rounds = e, []
    if isinstance(raw, BadRecord):
      items.append((key, raw, None))
    for rnd in rounds:
      if task == "ground" and not rnd.masks:
        without_mask += 1  # its answer is only history for the later rounds
      else:
        items.append((key, raw, rnd))
    if limit is not None and num_records >= limit:
      break
  todo = [item for item in items if _item_key(item) not in done]

  bar = None
  if progress:
    bar = tqdm.tqdm(total=len(items), initial=len(items) - len(todo), unit="round",
                    file=sys.stderr, desc=f"eval {task} ({mode})")
  sink = open(pred_path, "a") if pred_path else None
  try:
    for start in range(0, len(todo), batch_size):
      rows = _run_batch(model_api, todo[start:start + batch_size], task, mode, template,
                        max_new_tokens, batch_size)
      for row in rows:
        done[(row["key"], row["round"])] = row
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

  metrics = metrics_from_rows([done[_item_key(i)] for i in items if _item_key(i) in done], task,
                              mode)
  if task == "ground":
    metrics["rounds_without_mask"] = without_mask
  if out_dir:
    with open(os.path.join(out_dir, METRICS), "w") as f:
      json.dump(metrics, f, indent=1)
  return metrics


def _item_key(item) -> tuple:
  """The resume key of a work item: (record key, round number)."""
  key, _, rnd = item
  return key, rnd.number if rnd else RECORD_ROUND


def _run_batch(model_api, chunk, task, mode, template, max_new_tokens, batch_size) -> list[dict]:
  """Rows for a chunk of work items (rounds of any records), in the chunk's order."""
  rows, samples, pending, decoded = [None] * len(chunk), [], [], {}
  for slot, (key, raw, rnd) in enumerate(chunk):
    if rnd is None:
      rows[slot] = {"key": key, "round": RECORD_ROUND, "id": key, "error": str(raw)}
      continue
    row = {"key": key, "round": rnd.number, "id": raw.id, "task": raw.task,
           "modality": raw.modality, "answer_type": raw.answer_type.lower(),
           "question": rnd.question, "answer": _answer_text(rnd.answer)}
    try:
      if key not in decoded:  # a record's rounds share one decode
        try:
          decoded[key] = decode_raw(raw)
        except BadRecord as e:
          decoded[key] = e
      ex = decoded[key]
      if isinstance(ex, BadRecord):
        raise ex
      if ex.image is None:
        raise InputError("record has no image")
      samples.append(model_api.prepare(ex.image, rnd.question, ex.regions[:rnd.regions],
                                       template=template, max_new_tokens=max_new_tokens,
                                       history=rnd.history))
      pending.append((slot, row, [ex.masks[i] for i in rnd.masks]))
    except (BadRecord, InputError) as e:
      rows[slot] = dict(row, error=str(e))
  if samples:
    preds = model_api.run(samples, max_new_tokens=max_new_tokens, mode=mode, batch_size=batch_size)
    for (slot, row, gt_masks), pred in zip(pending, preds):
      row.update(prediction=pred.text, seg_found=pred.seg_found, forced=pred.forced)
      if task == "ground":
        pred_mask = np.stack(pred.masks) if pred.masks else None
        intersection, union = gm.mask_counts(pred_mask, np.stack(gt_masks), mode)
        row["iou"] = gm.iou_from_counts(intersection, union, mode)
        row.update(dice=gm.dice_from_iou(row["iou"]), intersection=intersection, union=union,
                   masks_rle=[mask_rle(m) for m in pred.masks])
      rows[slot] = row
  return rows


# --- scoring an existing predictions file ---------------------------------------------------------

def _bad_row(path: str, line: int, what: str) -> EvalError:
  return EvalError(f"{path} line {line}: {what}")


def _need(path: str, line: int, row: dict, field: str, kind, what: str):
  """row[field], which must exist and be of `kind` (a type or a tuple of types)."""
  if field not in row:
    raise _bad_row(path, line, f"missing field {field!r} ({what})")
  if not isinstance(row[field], kind):
    names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    raise _bad_row(path, line, f"field {field!r} is {type(row[field]).__name__}, expected {names}")
  return row[field]


def _reference_row(path: str, line: int, row: dict) -> dict:
  """A row of the reference's answer file -> our row (one round: the reference answers one
  question per record)."""
  what = "the reference's answer-file rows need " + ", ".join(REFERENCE_FIELDS)
  for field in REFERENCE_FIELDS:
    _need(path, line, row, field, (int, str) if field == "question_id" else str, what)
  modality = row.get("modality_type")  # OmniMedVQA's modality, as cal_metric_omniMedVQA.py reads
  if modality is None and isinstance(row.get("image_path"), str):
    modality = modality_of(row["image_path"])  # as our rows name it
  # question_id restarts at 0 in each chunk file of the reference: the line is the key.
  return {"key": f"line {line}", "round": 1, "id": row["question_id"], "prediction": row["text"],
          "answer": row["gt"], "answer_type": row["answer_type"], "modality": modality,
          "question": row.get("prompt")}


def _our_row(path: str, line: int, row: dict, task: str) -> dict:
  what = f"rows of `medplib eval --task {task}` need key and, unless they hold an error, "
  what += ("intersection and union (or iou) and modality" if task == "ground"
           else "prediction, answer, answer_type and modality")
  _need(path, line, row, "key", str, what)
  if "task" in row and row["task"] != TASKS[task]:
    raise _bad_row(path, line, f"a task {row['task']!r} row, but --task {task} scores "
                               f"{TASKS[task]!r} rows")
  if "error" in row:
    return row
  if "round" not in row:  # written before every round was scored: a first round
    row = dict(row, round=1)
  _need(path, line, row, "round", int, what)
  _need(path, line, row, "modality", str, what)
  if task != "ground":
    for field in ("prediction", "answer", "answer_type"):
      _need(path, line, row, field, str, what)
    return row
  if "intersection" in row or "union" in row:
    counts = [_need(path, line, row, f, list, what) for f in ("intersection", "union")]
    if (len(counts[0]) != len(counts[1]) or not counts[0] or
        not all(isinstance(v, int) and v >= 0 for v in counts[0] + counts[1])):
      raise _bad_row(path, line, "intersection and union must be lists of pixel counts of the "
                                 "same (non-zero) length")
  elif not isinstance(row.get("iou"), (int, float)) or not 0 <= row["iou"] <= 1:
    raise _bad_row(path, line, f"missing field 'intersection' ({what})")
  return row


def read_predictions(path: str, task: str) -> tuple[list[dict], str]:
  """Rows of a predictions file as `metrics_from_rows` takes them, and its format: "medplib"
  (rows as `evaluate` writes them; the last row of a (key, round) counts, as a resumed run
  reads them) or "reference" (vqa_infer.py's answer file; every row counts: its chunk files
  number their question_id from 0 each). Raises EvalError naming the line of a bad row."""
  if task not in TASKS:
    raise EvalError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
  try:
    with open(path, "rb") as f:
      lines = f.readlines()
  except OSError as e:
    raise EvalError(f"cannot read predictions file {path!r}: {e.strerror}") from e
  rows, fmt = {}, None
  for line, data in enumerate(lines, 1):
    if not data.strip():
      continue
    try:
      row = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise _bad_row(path, line, f"not UTF-8 text ({e.reason})") from e
    except json.JSONDecodeError as e:
      raise _bad_row(path, line, f"not a JSON object ({e.msg})") from e
    if not isinstance(row, dict):
      raise _bad_row(path, line, "not a JSON object")
    if fmt is None:
      if "key" not in row and "question_id" not in row:
        raise _bad_row(path, line, "neither a `medplib eval` row (key) nor a row of the "
                                   "reference's answer file (question_id)")
      fmt = "medplib" if "key" in row else "reference"
      if fmt == "reference" and task == "ground":
        raise _bad_row(path, line, "a reference answer-file row (question_id): the reference's "
                                   "answer files hold text only, --task ground needs the rows of "
                                   "`medplib eval` (intersection, union)")
    if fmt == "reference":
      rows[len(rows)] = _reference_row(path, line, row)
    else:
      row = _our_row(path, line, row, task)
      rows[(row["key"], row.get("round"))] = row
  if fmt is None:
    raise EvalError(f"{path}: no prediction rows")
  return list(rows.values()), fmt


def score_predictions(path: str, task: str, mode: str = "correct",
                      out_dir: str | None = None) -> dict:
  """Metrics of an existing predictions file (see `read_predictions`), no model needed; with
  `out_dir`, written to OUT/metrics.json."""
  if mode not in MODES:
    raise EvalError(f"unknown mode {mode!r}; choose one of {MODES}")
  rows, fmt = read_predictions(path, task)
  metrics = metrics_from_rows(rows, task, mode)
  metrics["predictions_format"] = fmt
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, METRICS), "w") as f:
      json.dump(metrics, f, indent=1)
  return metrics
