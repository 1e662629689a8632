"""The layering rule: which package of medplib_jax may import which (every import statement,
inside functions too, found with `ast`). Lower floors never reach up:

  sharding, flops, config_loading   (no project imports)
  data                              the host side: records, tokenizer, canvases, batch contract
  models                            networks; read the batch contract (data.batch) and the mesh
  checkpoint                        every model file format: PyTorch / HF import and export, our
                                    model directory, what a stage starts from
  infer, train                      the two ways through a model
  eval, serve                       on top of infer
  demo                              the embedded application, over all of it
A subcommand's `cli.py` may import anything its package may, plus the configs.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "medplib_jax")
BASE = {"sharding", "flops", "config_loading"}
ALLOWED = {
    "sharding": set(), "flops": set(), "config_loading": set(),
    "data": set(),
    "models": {"data", "sharding"},
    "checkpoint": {"models", "data", "configs"},
    "infer": {"models", "data", "checkpoint"},
    "train": {"models", "data", "checkpoint"} | BASE,
    "eval": {"infer", "models", "data", "checkpoint"},
    "serve": {"eval", "infer", "models", "data", "checkpoint"},
    "demo": {"train", "eval", "infer", "models", "data", "checkpoint", "configs"} | BASE,
    "__init__": {"infer"},
    "cli": set(),  # the dispatcher names subcommand modules as strings, never imports them
}


def project_imports(path: str):
  """(line, imported package) for every medplib_jax / configs import in a file."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module + "." + a.name for a in node.names]
    for name in names:
      parts = name.split(".")
      if parts[0] == "configs":
        yield node.lineno, "configs"
      elif parts[0] == "medplib_jax" and len(parts) > 1:
        yield node.lineno, parts[1]


def modules():
  for folder, _, files in os.walk(ROOT):
    for f in sorted(files):
      if f.endswith(".py"):
        yield os.path.join(folder, f)


def package_of(path: str) -> str:
  rel = os.path.relpath(path, ROOT).split(os.sep)
  return rel[0][:-3] if len(rel) == 1 else rel[0]


@pytest.mark.parametrize("path", list(modules()), ids=lambda p: os.path.relpath(p, ROOT))
def test_imports_follow_the_layering(path):
  package = package_of(path)
  assert package in ALLOWED, f"{package}: new package; add it to the layering table"
  allowed = ALLOWED[package] | {package}
  if os.path.basename(path) == "cli.py":
    allowed = allowed | {"configs"} | BASE
  wrong = [(line, target) for line, target in project_imports(path) if target not in allowed]
  assert not wrong, (f"{os.path.relpath(path, ROOT)} imports {sorted({t for _, t in wrong})} at "
                     f"lines {[l for l, _ in wrong]}; {package} may import {sorted(ALLOWED[package])}")


def test_nothing_but_the_demo_reaches_into_train():
  """No library package imports medplib_jax.train (its orbax manager, trainer, losses)."""
  users = sorted({package_of(p) for p in modules() for _, t in project_imports(p) if t == "train"})
  assert set(users) <= {"train", "demo"}, users


# The only imports inside functions, each with its reason: everything else imports at the top,
# so a file's first lines say what it depends on.
FUNCTION_IMPORTS = {
    "__init__.py": {"medplib_jax.infer.api"},  # `import medplib_jax` (the CLI) stays free of JAX
    "checkpoint/torch_io.py": {"torch"},  # optional (the convert extra), only for pickled files
}


def function_imports(path: str):
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for fn in ast.walk(tree):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for node in ast.walk(fn):
        if isinstance(node, ast.Import):
          yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
          yield node.lineno, node.module


def test_imports_sit_at_the_top_of_files():
  found = {os.path.relpath(p, ROOT): sorted(set(function_imports(p))) for p in modules()}
  wrong = {rel: hits for rel, hits in found.items()
           if {m for _, m in hits} - FUNCTION_IMPORTS.get(rel, set())}
  assert not wrong, f"imports inside functions (move them to the top): {wrong}"
