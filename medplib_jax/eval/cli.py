"""`medplib eval`: batched evaluation of a model directory on VQA, region VQA or grounding, or
the scoring of an existing predictions file.

    medplib eval --checkpoint runs/demo/stage4/export --data data/synth/test.json \\
        --task ground [--mode correct|reference] --out runs/eval/ground
    medplib eval --predictions answers.jsonl --task vqa [--mode reference] [--out DIR]

With a checkpoint: writes OUT/predictions.jsonl (one row per round of each record, appended as
it goes; a rerun skips the rounds already there), OUT/metrics.json (which says the mode) and
OUT/run.json (the settings). With --predictions (our predictions.jsonl, or the reference's
answer-file JSONL from model/eval/vqa_infer.py): no model is loaded; the metrics are printed
and, with --out, written to OUT/metrics.json.
"""

import json
import sys

from medplib_jax.eval.runner import TASKS, EvalError, evaluate, score_predictions
from medplib_jax.infer.api import MedPLIB

EXIT_BAD_INPUT = 2


def add_arguments(p) -> None:
  p.description = ("evaluate a checkpoint on VQA / region VQA / grounding (every round of each "
                   "record), or score an existing predictions file (--predictions)")
  p.add_argument("--checkpoint", help="model directory (params/, config.json, tokenizer/)")
  p.add_argument("--data", help="MeCoVQA JSON file or TFDS directory")
  p.add_argument("--predictions", metavar="FILE",
                 help="score this predictions file instead of running a model: our "
                      "predictions.jsonl or the reference's answer-file JSONL (vqa_infer.py)")
  p.add_argument("--image-root", default="", help="root of the JSON's relative paths (default: its folder)")
  p.add_argument("--split", default="test", help="split of a TFDS directory (default: test)")
  p.add_argument("--task", required=True, choices=sorted(TASKS))
  p.add_argument("--mode", choices=("correct", "reference"), default="correct",
                 help="correct (default) or reference-compatible settings and formulas")
  p.add_argument("--out", help="output directory (required with --checkpoint)")
  p.add_argument("--batch-size", type=int, default=8, help="rounds per device batch")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--limit", type=int, default=None,
                 help="evaluate only the first N records of the task (all their rounds)")
  p.add_argument("--no-progress", action="store_true")


def _fail(message: str) -> int:
  print(f"medplib eval: {message}", file=sys.stderr)
  return EXIT_BAD_INPUT


def run(args) -> int:
  if args.predictions is not None:
    if args.checkpoint or args.data:
      return _fail("--predictions scores an existing file; it takes no --checkpoint or --data")
    try:
      metrics = score_predictions(args.predictions, args.task, args.mode, args.out)
    except EvalError as e:
      return _fail(str(e))
    print(json.dumps(metrics, indent=1))
    return 0
  missing = [f"--{name}" for name in ("checkpoint", "data", "out") if not getattr(args, name)]
  if missing:
    return _fail(f"{' '.join(missing)} required (or --predictions FILE to score a file)")
  if args.batch_size < 1 or args.max_new_tokens < 1:
    return _fail("--batch-size and --max-new-tokens must be >= 1")
  try:
    model = MedPLIB.from_pretrained(args.checkpoint, mode=args.mode)
    metrics = evaluate(model, args.data, args.image_root, args.task, args.mode, args.out,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       split=args.split, progress=not args.no_progress, limit=args.limit)
  except (EvalError, ValueError, FileNotFoundError) as e:
    return _fail(str(e))
  print(json.dumps(metrics, indent=1))
  return 0
