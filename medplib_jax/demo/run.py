"""`medplib demo`: the embedded default end to end on CPU.

Synthetic MeCoVQA -> tiny tokenizer -> evaluate the untrained model -> train stages 1 -> 4 (the
stage configs at size demo, `configs/stageN_*.py:demo,WORKDIR`) -> evaluate again on the held-out
test split -> a table with chance levels beside, and `report.md` with mask overlays in the
workdir. `--fast` runs every stage for a few steps (smoke).
"""

import collections
import json
import logging
import os
import shutil
import time

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

import configs
from medplib_jax import sharding
from medplib_jax.checkpoint import model_dir, pretrained
from medplib_jax.data import synth
from medplib_jax.data.synth import chance_levels
from medplib_jax.data.template import template_texts
from medplib_jax.data.tokenizer import IMAGE_TOKEN, train_tokenizer
from medplib_jax.demo import standins
from medplib_jax.eval.runner import evaluate
from medplib_jax.infer.api import MedPLIB, overlay
from medplib_jax.train import trainer
from medplib_jax.train.run_stage import run_from_config

log = logging.getLogger(__name__)

# Training steps of every stage with --fast (the full steps are the configs').
FAST_STEPS = 2
# Stand-in encoder pre-training (see demo/standins.py): steps for SAM and CLIP.
STANDIN_STEPS, FAST_STANDIN_STEPS = {"sam": 500, "clip": 900}, {"sam": 2, "clip": 2}
# Training conversations are multi-turn, as MeCoVQA's are: an image's questions of one task are
# packed into conversations of up to this many turns (pack_turns), so its image tokens are read
# once for several answers. The region / grounding counts match the demo size's region and mask
# slots (configs/common.py).
MAX_TURNS = {"C": 3, "R": 2, "G": 2}


def add_arguments(p):
  p.add_argument("--workdir", default="runs/demo", help="data, checkpoints and the report go here")
  p.add_argument("--fast", action="store_true", help="a few steps per stage (smoke test)")
  p.add_argument("--images", type=int, default=None,
                 help="synthetic images to generate (default 900, 60 with --fast)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval-limit", type=int, default=None,
                 help="records per task to evaluate (default all of the test split; 8 with --fast)")


# --- data --------------------------------------------------------------------------------------

def prepare_data(workdir: str, images: int, seed: int) -> dict:
  """Synthetic dataset, tokenizer, and per-task JSON files (made once, reused after), in the
  demo workdir layout the configs read (configs/common.py DEMO_WORKDIR)."""
  data_dir = os.path.join(workdir, "data")
  if not os.path.exists(os.path.join(data_dir, "test.json")):
    print(f"[demo] writing {images} synthetic images to {data_dir}")
    synth.write_synthetic(data_dir, images, seed)
  tok_dir = os.path.join(workdir, "tokenizer")
  if not os.path.exists(os.path.join(tok_dir, "tokenizer_config.json")):
    texts = synth.synth_corpus_texts([os.path.join(data_dir, "train.json")])
    texts += [caption_text(r) for r in captions(json.load(open(os.path.join(data_dir, "train.json"))))]
    texts += template_texts() * 200  # the system prompt becomes a few tokens
    train_tokenizer(texts, tok_dir, vocab_size=1000)
  files = {}
  for split in ("train", "test"):
    records = json.load(open(os.path.join(data_dir, f"{split}.json")))
    for task in "CRG":
      single = [r for r in records if r.get("task") == task]
      files[f"{split}_{task}"] = _write(data_dir, f"{split}_{task}", single)
      if split == "train":
        files[f"train_{task}_turns"] = _write(data_dir, f"train_{task}_turns",
                                              pack_turns(single, MAX_TURNS[task], seed))
    if split == "train":
      files["train_caption"] = _write(data_dir, "train_caption", captions(records))
  files.update(data_dir=data_dir, tokenizer=tok_dir, test=os.path.join(data_dir, "test.json"))
  return files


def _write(data_dir, name, records) -> str:
  path = os.path.join(data_dir, "tasks", f"{name}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(records, f)
  return path


def caption_text(record) -> str:
  return record["conversations"][1]["value"]


def pack_turns(records, max_turns: int, seed: int) -> list[dict]:
  """Single-turn records -> multi-turn ones: each image's questions (in a seeded random order, so
  every kind of question also comes first) in conversations of up to `max_turns` rounds; the
  `<image>` stays in the first human turn only. Held-out evaluation keeps single-turn records."""
  rng = np.random.default_rng(seed)
  by_image = collections.defaultdict(list)
  for r in records:
    by_image[r["image"]].append(r)
  out = []
  for image, group in by_image.items():
    group = [group[i] for i in rng.permutation(len(group))]
    for start in range(0, len(group), max_turns):
      conversation = []
      for r in group[start:start + max_turns]:
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if conversation:
          question = question.replace(IMAGE_TOKEN + "\n", "")
        conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
      first = group[start]
      out.append({"id": f"{first['id']}_turns", "image": image, "task": first["task"],
                  "modality": first.get("modality"), "conversations": conversation})
  return out


def captions(records) -> list[dict]:
  """Stage-1 alignment pairs (LLaVA pretrain format) built from each image's known content."""
  modality, structures = {}, collections.defaultdict(list)
  for r in records:
    if r.get("question_type") == "modality":
      modality[r["image"]] = r["conversations"][1]["value"]
    if r.get("task") == "G" and r.get("structure"):
      structures[r["image"]].append(r["structure"])
  out = []
  for image, mod in sorted(modality.items()):
    names = sorted(set(structures[image]))
    text = f"a {mod} image showing the {' and the '.join(names)}" if names else f"a {mod} image"
    out.append({"id": f"cap_{os.path.basename(image)}", "image": image,
                "conversations": [{"from": "human", "value": "<image>\n"},
                                  {"from": "gpt", "value": text}]})
  return out


# --- stages ------------------------------------------------------------------------------------

def stage_config(stage: int, workdir: str, fast: bool = False):
  """Stage 1-4's config at size demo over `workdir`; `fast`: FAST_STEPS steps."""
  cfg = configs.stage_config(stage, f"demo,{workdir}")
  if fast:
    cfg.train.steps = cfg.train.checkpoint_every = FAST_STEPS
  return cfg


def pretrain_standins(files: dict, workdir: str, steps: dict) -> None:
  """Stand-ins for the pretrained CLIP and SAM-Med2D (demo/standins.py), made once, where stage
  1's config takes them from (init.clip / init.sam)."""
  cfg = stage_config(1, workdir)
  if not os.path.isdir(os.path.join(cfg.init.sam, "params")):
    standins.pretrain_sam(cfg.model, files["train_G"], files["data_dir"], cfg.init.sam,
                          steps["sam"])
  if not os.path.isdir(os.path.join(cfg.init.clip, "params")):
    standins.pretrain_clip(cfg.model, os.path.join(files["data_dir"], "train.json"),
                           files["data_dir"], cfg.init.clip, steps["clip"])


def export_untrained(files: dict, workdir: str) -> str:
  """The stage-1 starting point (pretrained stand-ins, random LLM/projector), as a model dir."""
  cfg = stage_config(1, workdir)
  target = os.path.join(workdir, "untrained")
  if not os.path.exists(os.path.join(target, "export", "config.json")):
    mesh = sharding.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_tuple(cfg.logical_axis_rules)):
      params = trainer.init_params(cfg, trainer.build_model(cfg), mesh, pretrained.load(cfg),
                                   jax.random.key(cfg.seed))
    export = model_dir.save(os.path.join(target, "export"), params, cfg)
    shutil.copytree(files["tokenizer"], os.path.join(export, "tokenizer"), dirs_exist_ok=True)
  return os.path.join(target, "export")


# --- evaluation and report ---------------------------------------------------------------------

def evaluate_model(path: str, files: dict, limit, out_dir: str) -> dict:
  model = MedPLIB.from_pretrained(path)
  root = files["data_dir"]
  vqa = evaluate(model, files["test_C"], root, "vqa", out_dir=os.path.join(out_dir, "vqa"),
                 limit=limit, max_new_tokens=12, progress=True)
  region = evaluate(model, files["test_R"], root, "region", out_dir=os.path.join(out_dir, "region"),
                    limit=limit, max_new_tokens=12, progress=True)
  ground = evaluate(model, files["test_G"], root, "ground", out_dir=os.path.join(out_dir, "ground"),
                    limit=limit, max_new_tokens=16, progress=True)
  return {"closed_vqa_accuracy": (vqa.get("closed_accuracy") or 0.0) / 100,
          "region_vqa_accuracy": (region.get("accuracy") or 0.0) / 100,
          "grounding_mdice": (ground.get("mdice") or 0.0) / 100,
          "grounding_miou": (ground.get("miou") or 0.0) / 100,
          "model": model}


def overlays(model, files: dict, out_dir: str, count: int = 6) -> list[str]:
  """Side-by-side PNGs: image | true mask overlay | predicted mask overlay, for test grounding."""
  records = json.load(open(files["test_G"]))[:count]
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i, r in enumerate(records):
    image = np.asarray(Image.open(os.path.join(files["data_dir"], r["image"])).convert("RGB"))
    mask_rel = r["conversations"][1]["value"].split("<mask>")[1].split("</mask>")[0]
    truth = np.asarray(Image.open(os.path.join(files["data_dir"], mask_rel))) > 0
    question = r["conversations"][0]["value"].replace("<image>\n", "")
    pred = model.predict(image, question, max_new_tokens=16)
    predicted = pred.masks[0] if pred.masks else np.zeros_like(truth)
    panel = np.concatenate([image, overlay(image, [truth], colour=(40, 200, 40)),
                            overlay(image, [predicted])], axis=1)
    path = os.path.join(out_dir, f"overlay_{i}.png")
    Image.fromarray(panel).save(path)
    paths.append((path, question, pred.text))
  return paths


TARGETS = {"grounding_mdice": 0.6, "closed_vqa_accuracy": 0.85, "region_vqa_accuracy": 0.7}


def table(before: dict, after: dict, chance: dict) -> str:
  rows = [("closed-VQA accuracy", "closed_vqa_accuracy", chance.get("closed_vqa")),
          ("region-VQA accuracy", "region_vqa_accuracy", chance.get("region_vqa")),
          ("grounding mDice", "grounding_mdice", chance.get("grounding_mdice_full_image")),
          ("grounding mIoU", "grounding_miou", None)]
  lines = ["| metric | chance | before | after | target |", "|---|---|---|---|---|"]
  for name, key, ch in rows:
    target = TARGETS.get(key)
    lines.append(f"| {name} | {'-' if ch is None else f'{ch:.3f}'} | {before[key]:.3f} | "
                 f"{after[key]:.3f} | {'-' if target is None else f'>= {target}'} |")
  return "\n".join(lines)


def run(args) -> int:
  logging.basicConfig(level=logging.WARNING, force=True)
  t0 = time.time()
  workdir = os.path.abspath(args.workdir)
  images = args.images or (60 if args.fast else 900)
  limit = args.eval_limit if args.eval_limit is not None else (8 if args.fast else None)
  files = prepare_data(workdir, images, args.seed)
  chance = chance_levels(files["test"])
  print(f"[demo] data ready ({time.time() - t0:.0f} s); pre-training stand-in CLIP and SAM encoders")
  pretrain_standins(files, workdir, FAST_STANDIN_STEPS if args.fast else STANDIN_STEPS)
  print(f"[demo] stand-ins ready ({time.time() - t0:.0f} s); evaluating the untrained model")
  before = evaluate_model(export_untrained(files, workdir), files, limit,
                          os.path.join(workdir, "eval_before"))
  for stage in (1, 2, 3, 4):
    cfg = stage_config(stage, workdir, args.fast)
    print(f"[demo] stage {stage}: {cfg.train.steps} steps ({time.time() - t0:.0f} s)")
    result = run_from_config(cfg, os.path.join(workdir, f"stage{stage}"))
    print(f"[demo] stage {stage} done ({time.time() - t0:.0f} s): " + ", ".join(
        f"{k}={result.final_metrics[k]:.4g}" for k in ("loss", "ce", "mask_dice")
        if k in result.final_metrics))
  print(f"[demo] evaluating the trained model ({time.time() - t0:.0f} s)")
  after = evaluate_model(os.path.join(workdir, "stage4", "export"), files, limit,
                         os.path.join(workdir, "eval_after"))
  pictures = overlays(after["model"], files, os.path.join(workdir, "report"))
  text = table(before, after, chance)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("# MedPLIB-JAX demo report\n\n"
            f"Demo config, synthetic MeCoVQA ({images} images), stages 1-4 on CPU, "
            f"{time.time() - t0:.0f} s in all. Held-out test split; correct-mode metrics.\n\n")
    f.write(text + "\n\n## Grounding: image | truth (green) | prediction (red)\n\n")
    for path, question, answer in pictures:
      f.write(f"**Q:** {question}  **A:** {answer}\n\n![]({os.path.relpath(path, workdir)})\n\n")
  summary = {k: {"before": before[k], "after": after[k]} for k in
             ("closed_vqa_accuracy", "region_vqa_accuracy", "grounding_mdice", "grounding_miou")}
  with open(os.path.join(workdir, "demo_metrics.json"), "w") as f:
    json.dump({"summary": summary, "chance": chance, "fast": bool(args.fast),
               "seconds": time.time() - t0}, f, indent=1)
  print(text)
  print(f"[demo] report: {os.path.join(workdir, 'report.md')} ({time.time() - t0:.0f} s)")
  return 0
