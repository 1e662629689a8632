"""`medplib eval`: batched evaluation of a model directory on VQA, region VQA or grounding.

    medplib eval --checkpoint runs/demo/stage4/export --data data/synth/test.json \\
        --task ground [--mode correct|reference] --out runs/eval/ground

Writes OUT/predictions.jsonl (one row per record, appended as it goes; a rerun skips the ids
already there), OUT/metrics.json (which says the mode) and OUT/run.json (the settings).
"""

import json
import sys

from medplib_jax.eval.runner import TASKS, EvalError, evaluate
from medplib_jax.infer.api import MedPLIB

EXIT_BAD_INPUT = 2


def add_arguments(p) -> None:
  p.add_argument("--checkpoint", required=True, help="model directory (params/, config.json, tokenizer/)")
  p.add_argument("--data", required=True, help="MeCoVQA JSON file or TFDS directory")
  p.add_argument("--image-root", default="", help="root of the JSON's relative paths (default: its folder)")
  p.add_argument("--split", default="test", help="split of a TFDS directory (default: test)")
  p.add_argument("--task", required=True, choices=sorted(TASKS))
  p.add_argument("--mode", choices=("correct", "reference"), default="correct",
                 help="correct (default) or reference-compatible settings and formulas")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--limit", type=int, default=None, help="evaluate only the first N records of the task")
  p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
  if args.batch_size < 1 or args.max_new_tokens < 1:
    print("medplib eval: --batch-size and --max-new-tokens must be >= 1", file=sys.stderr)
    return EXIT_BAD_INPUT
  try:
    model = MedPLIB.from_pretrained(args.checkpoint, mode=args.mode)
    metrics = evaluate(model, args.data, args.image_root, args.task, args.mode, args.out,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       split=args.split, progress=not args.no_progress, limit=args.limit)
  except (EvalError, ValueError, FileNotFoundError) as e:
    print(f"medplib eval: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  print(json.dumps(metrics, indent=1))
  return 0
