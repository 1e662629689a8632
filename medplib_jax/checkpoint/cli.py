"""`medplib convert`: a released MedPLIB checkpoint -> our model directory, and back.

  medplib convert --medplib DIR [--clip DIR] [--sam FILE] --out DIR [--dtype float32] [--summary]
      writes <out>/params (orbax), <out>/config.json, <out>/tokenizer/, <out>/convert_report.json;
      --dtype is the model's compute dtype (default: the checkpoint's torch_dtype)
  medplib convert --export-torch --checkpoint OUR_DIR --out DIR [--clip DIR] [--dtype bfloat16]
      writes safetensors (sharded with model.safetensors.index.json when large) + config.json
      + tokenizer files in the reference key layout
"""

import json
import math
import os
import shutil
import sys

import jax

from medplib_jax.checkpoint import model_dir
from medplib_jax.checkpoint.medplib import (export_medplib, import_medplib, read_hf_config,
                                            reference_config, write_torch_checkpoint)
from medplib_jax.checkpoint.torch_io import CheckpointError
from medplib_jax.data.tokenizer import TokenizerError, load_tokenizer

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")


def add_arguments(p):
  p.add_argument("--medplib", help="released MedPLIB checkpoint directory (HF config + weights)")
  p.add_argument("--clip", help="CLIP directory / weights for the vision tower (import: when the "
                 "checkpoint has none; export: fills the layers our model does not use)")
  p.add_argument("--sam", help="SAM-Med2D weights (sam-med2d_b.pth): import: when the checkpoint "
                 "has no SAM; export: fills SAM's mask-prompt layers our models may lack")
  p.add_argument("--out", help="output directory")
  p.add_argument("--size", default="7b", choices=("7b", "tiny"),
                 help="stage config the converted model is built on (default 7b)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="config override applied last, e.g. model.sam.decoder_num_heads=8")
  p.add_argument("--summary", action="store_true", help="print parameter counts per component")
  p.add_argument("--export-torch", action="store_true",
                 help="export our model directory (--checkpoint) to the reference layout")
  p.add_argument("--checkpoint", help="our model directory (params/, config.json, tokenizer/)")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="import: the model's compute dtype (model.dtype; auto = the checkpoint's "
                      "torch_dtype, bfloat16 for half precision); export: the safetensors' "
                      "tensor dtype (auto = float32)")
  p.add_argument("--shard-gb", type=float, default=5.0, help="largest safetensors shard, GiB")


def component_counts(params) -> dict[str, int]:
  return {name: int(sum(math.prod(x.shape) for x in jax.tree.leaves(sub)))
          for name, sub in params.items()}


def print_summary(params, out=None) -> None:
  out = out or sys.stdout  # looked up per call (a default would keep the stdout of import time)
  counts = component_counts(params)
  for name, n in counts.items():
    print(f"{name:18s} {n:>15,d}", file=out)
  print(f"{'total':18s} {sum(counts.values()):>15,d}", file=out)


def copy_tokenizer(src_dir: str, dst_dir: str) -> list[str]:
  """Copies the HF tokenizer files of `src_dir`; returns their names (empty when none)."""
  names = [n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
  if names:
    os.makedirs(dst_dir, exist_ok=True)
    for n in names:
      shutil.copy2(os.path.join(src_dir, n), os.path.join(dst_dir, n))
  return names


def _check_tokenizer(tok_dir: str, vocab_size: int) -> str | None:
  try:
    n = len(load_tokenizer(tok_dir))
  except TokenizerError as e:
    return f"tokenizer: {e}"
  if n != vocab_size:
    return f"tokenizer in {tok_dir} has {n} tokens but the embedding has {vocab_size} rows"
  return None


def import_dtype(requested: str, hf_config: dict) -> str:
  """The compute dtype of an imported model: as asked, or (auto) the checkpoint's own, so a
  float32 checkpoint is not run in bfloat16."""
  if requested != "auto":
    return requested
  return "float32" if hf_config.get("torch_dtype", "float32") == "float32" else "bfloat16"


def run_import(args) -> int:
  dtype = import_dtype(args.dtype, read_hf_config(args.medplib))
  params, cfg, report = import_medplib(args.medplib, clip=args.clip, sam=args.sam, size=args.size,
                                       overrides=[f"model.dtype={dtype}"] + list(args.set))
  if args.summary:
    print_summary(params)
  print(f"converted {args.medplib}: {len(report['unmapped'])} unmapped, "
        f"{len(report['missing'])} missing keys, {report['num_experts']} expert(s) per FFN")
  for key in report["unmapped"][:20]:
    print(f"  unmapped: {key}")
  if len(report["unmapped"]) > 20:
    print(f"  ... {len(report['unmapped']) - 20} more in convert_report.json")
  if not args.out:
    return 0
  tok_dir = os.path.join(args.out, "tokenizer")
  if copy_tokenizer(args.medplib, tok_dir):
    cfg.data.tokenizer = os.path.abspath(tok_dir)
    problem = _check_tokenizer(tok_dir, cfg.model.llm.vocab_size)
    if problem:
      report["notes"].append(problem)
  else:
    report["notes"].append(f"{args.medplib} has no tokenizer files; pass one to from_pretrained")
  for note in report["notes"]:
    print(f"  note: {note}")
  model_dir.save(args.out, params, cfg)
  with open(os.path.join(args.out, "convert_report.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {os.path.abspath(args.out)} (params/, config.json, tokenizer/)")
  return 0


def run_export(args) -> int:
  cfg = model_dir.load_config(args.checkpoint)
  params = model_dir.load_params(args.checkpoint)
  if args.summary:
    print_summary(params)
  state = export_medplib(params, cfg, clip=args.clip, sam=args.sam)
  dtype = "float32" if args.dtype == "auto" else args.dtype
  files = write_torch_checkpoint(state, args.out, int(args.shard_gb * 2**30), dtype=dtype)
  tokenizer = None
  tok_dir = os.path.join(args.checkpoint, "tokenizer")
  if copy_tokenizer(tok_dir, args.out):
    try:
      tokenizer = load_tokenizer(tok_dir)
    except TokenizerError as e:
      print(f"  note: {e}")
  hf = reference_config(cfg, tokenizer)
  hf["torch_dtype"] = dtype
  with open(os.path.join(args.out, "config.json"), "w") as f:
    json.dump(hf, f, indent=1)
  print(f"wrote {len(state)} tensors to {os.path.abspath(args.out)}: {', '.join(files)}")
  return 0


def run(args) -> int:
  try:
    if args.export_torch:
      if not (args.checkpoint and args.out):
        print("medplib convert --export-torch needs --checkpoint and --out", file=sys.stderr)
        return 2
      return run_export(args)
    if not args.medplib or not (args.out or args.summary):
      print("medplib convert needs --medplib DIR and --out DIR (or --summary)", file=sys.stderr)
      return 2
    return run_import(args)
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"medplib convert: {e}", file=sys.stderr)
    return 1
