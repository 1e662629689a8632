"""`medplib` command line: demo, data, train, eval, predict, convert, serve.

Each subcommand lives with its feature (`medplib_jax/<area>/cli.py`) and is imported only when used,
so `medplib --help` stays fast.
"""

import argparse
import importlib
import sys

# subcommand -> (module with `add_arguments(parser)` and `run(args) -> int`, one-line help)
SUBCOMMANDS = {
    "demo": ("medplib_jax.demo.run", "make synthetic data, train stages 1-4 (size demo), evaluate, report"),
    "data": ("medplib_jax.data.cli", "synthesise, check and build MeCoVQA-format datasets"),
    "train": ("medplib_jax.train.cli", "run one training stage from a config"),
    "eval": ("medplib_jax.eval.cli", "evaluate a checkpoint (or score a predictions file) on VQA / region VQA / grounding"),
    "predict": ("medplib_jax.infer.cli", "answer one question about one image (masks for <SEG>)"),
    "convert": ("medplib_jax.checkpoint.cli", "import a released MedPLIB / CLIP / SAM checkpoint"),
    "serve": ("medplib_jax.serve.cli", "web page and JSON API on a checkpoint"),
}


def _load(name):
  module_name, _ = SUBCOMMANDS[name]
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      return None
    raise


def build_parser() -> argparse.ArgumentParser:
  """The top-level parser: subcommand names and one-line help (their modules are not imported)."""
  parser = argparse.ArgumentParser(
      prog="medplib", description="MedPLIB-JAX: VQA, region VQA and pixel grounding on medical images.")
  sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
  for name, (_, help_text) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
  return parser


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  # Only the named subcommand's module is imported; top-level --help loads none.
  wanted = next((a for a in argv if not a.startswith("-")), None)
  parser = build_parser()
  if wanted in SUBCOMMANDS:
    module = _load(wanted)
    if module is None:
      print(f"medplib {wanted}: not implemented yet", file=sys.stderr)
      return 2
    parser = argparse.ArgumentParser(prog="medplib")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser(wanted, help=SUBCOMMANDS[wanted][1], description=SUBCOMMANDS[wanted][1])
    module.add_arguments(p)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(module, "ACCEPTS_EXTRA", False):
      parser.error(f"unrecognised arguments: {' '.join(extra)}")
    args.extra = extra
    return int(module.run(args) or 0)
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 0
  return 0


if __name__ == "__main__":
  sys.exit(main())
