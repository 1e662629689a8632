"""`medplib data synth | check | build`: make synthetic MeCoVQA, validate a JSON file, build TFDS.

    medplib data synth --out data/synth --n 200 --seed 0
    medplib data check --json data/synth/train.json --image-root data/synth [--tokenizer DIR]
    medplib data build --json data/synth/train.json --split train --image-root data/synth --out data/tfds

`check` prints one tab-separated line per bad record (index, id, field, reason: detail) and a
summary, and exits 1 if any record is bad. With --tokenizer it also lays every record out with
the template and flags conversations longer than --max-length after the image tokens.
"""

import collections
import json
import os
import sys

import numpy as np

from configs.common import model_config, parse_size
from medplib_jax.data import synth, tfds_builder
from medplib_jax.data.mecovqa import load_records
from medplib_jax.data.preprocess import PreprocessOptions, build_sample
from medplib_jax.data.template import template_texts
from medplib_jax.data.tokenizer import load_tokenizer, train_tokenizer


def add_arguments(parser):
  sub = parser.add_subparsers(dest="data_command", required=True)
  p = sub.add_parser("synth", help="write synthetic MeCoVQA (images, masks, JSON) and a tokenizer")
  p.add_argument("--out", required=True)
  p.add_argument("--n", type=int, default=200, help="number of images")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--vocab-size", type=int, default=1000, help="base vocabulary of the tokenizer")

  for name, help_text in (("check", "validate a MeCoVQA JSON file without building"),
                          ("build", "build a TFDS (ArrayRecord) dataset from MeCoVQA JSON")):
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--json", required=True, action="append", help="MeCoVQA JSON (repeatable)")
    p.add_argument("--image-root", required=True)
    p.add_argument("--tokenizer", default="", help="also check lengths with this tokenizer")
    p.add_argument("--max-length", type=int, default=0, help="0: the model size's max_length")
    p.add_argument("--size", default="tiny", help="model size for image-token counts")
    p.add_argument("--template", default="llava_v1")
    if name == "build":
      p.add_argument("--out", required=True, help="data_dir; the dataset goes to OUT/mecovqa/1.0.0")
      p.add_argument("--split", action="append", default=None,
                     help="split name per --json (default: the JSON file's stem)")


def _length_check(args):
  """A function raising BadRecord for records that cannot be laid out (None without --tokenizer)."""
  if not args.tokenizer:
    return None
  tok = load_tokenizer(args.tokenizer)
  cfg = model_config(parse_size(args.size))
  max_length = args.max_length or cfg.llm.max_length
  options = PreprocessOptions(template=args.template)

  def check(decoded):
    build_sample(decoded, tok, cfg, max_length, rng=np.random.default_rng(0), train=False,
                 options=options)
  return check


def _print_bad(i, rid, bad):
  print(f"{i}\t{rid}\t{bad.field}\t{bad.reason}: {bad.detail}")


def _check(args) -> int:
  check = _length_check(args)
  bad_total = collections.Counter()
  for path in args.json:
    records = load_records(path)
    counts = collections.Counter()

    def on_bad(i, rid, bad, counts=counts):
      counts[bad.reason] += 1
      _print_bad(i, rid, bad)
    good = sum(1 for _ in tfds_builder.validate_split(records, args.image_root, on_bad, check))
    bad_total += counts
    detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"
    print(f"# {path}: {len(records)} records, {good} good, {sum(counts.values())} bad ({detail})"
          + ("" if check else "; lengths not checked (no --tokenizer)"))
  return 1 if bad_total else 0


def _build(args) -> int:
  splits = args.split or [os.path.splitext(os.path.basename(p))[0] for p in args.json]
  if len(splits) != len(args.json):
    print("medplib data build: give one --split per --json", file=sys.stderr)
    return 2
  result = tfds_builder.build(dict(zip(splits, args.json)), args.image_root, args.out,
                              on_bad=_print_bad, check_sample=_length_check(args))
  print(json.dumps({"dir": result["dir"], "bad": result["bad"], "counts": result["counts"]},
                   indent=1))
  return 0


def _synth(args) -> int:
  paths = synth.write_synthetic(args.out, args.n, args.seed)
  texts = synth.synth_corpus_texts(list(paths.values()))  # file paths left out
  tok_dir = train_tokenizer(texts + template_texts() * 20, os.path.join(args.out, "tokenizer"),
                            vocab_size=args.vocab_size)
  print(json.dumps({"splits": paths, "tokenizer": tok_dir}, indent=1))
  return 0


def run(args) -> int:
  handlers = {"synth": _synth, "check": _check, "build": _build}
  try:
    return handlers[args.data_command](args)
  except ValueError as e:  # bad input files: a message, not a traceback
    print(f"medplib data {args.data_command}: {e}", file=sys.stderr)
    return 2

