"""`medplib demo --fast` end to end: data, stand-ins, stages 1-4, evaluation before/after, report."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("closed_vqa_accuracy", "region_vqa_accuracy", "grounding_mdice", "grounding_miou")


def test_demo_fast_end_to_end(tmp_path):
  workdir = tmp_path / "demo"
  env = {k: v for k, v in os.environ.items() if not k.startswith("MEDPLIB_")}
  # The demo runs as a single process on the host's own device count.
  env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-m", "medplib_jax.cli", "demo", "--fast", "--workdir",
                        str(workdir)], env=env, capture_output=True, text=True, timeout=900,
                       cwd=REPO)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
  assert "[demo] report:" in out.stdout

  metrics = json.loads((workdir / "demo_metrics.json").read_text())
  assert metrics["fast"] is True
  for key in METRICS:
    for when in ("before", "after"):
      value = metrics["summary"][key][when]
      assert isinstance(value, float) and 0.0 <= value <= 1.0, (key, when, value)

  report = (workdir / "report.md").read_text()
  assert "| metric | chance | before | after | target |" in report
  for row in ("closed-VQA accuracy", "region-VQA accuracy", "grounding mDice", "grounding mIoU"):
    assert f"| {row} |" in report, row
  # The table shows the same numbers as demo_metrics.json.
  line = next(l for l in report.splitlines() if l.startswith("| grounding mIoU |"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[2] == f"{metrics['summary']['grounding_miou']['before']:.3f}"
  assert cells[3] == f"{metrics['summary']['grounding_miou']['after']:.3f}"

  images = [l.split("](")[1].rstrip(")") for l in report.splitlines() if l.startswith("![](")]
  assert images, report
  for rel in images:
    panel = np.asarray(Image.open(workdir / rel))
    # image | truth overlay | prediction overlay, side by side.
    assert panel.ndim == 3 and panel.shape[2] == 3 and panel.shape[1] % 3 == 0, (rel, panel.shape)

  for stage in (1, 2, 3, 4):
    export = workdir / f"stage{stage}" / "export"
    assert (export / "config.json").is_file(), export
    assert (export / "tokenizer" / "tokenizer_config.json").is_file(), export
    assert (workdir / f"stage{stage}" / "metrics.jsonl").is_file()


def test_clip_standin_patch_coverage_worked_example():
  from medplib_jax.demo.standins import patch_coverage
  # A 28 x 56 image on a 28 px canvas: resized to 14 x 28, centred (rows 7..20), patch 14 -> 2 x 2.
  mask = np.zeros((28, 56), bool)
  mask[:, :28] = True  # the left half of the image
  cov = patch_coverage(mask, 28, 14)
  # The image occupies canvas rows 7..20: half of each patch row; the mask is the left column.
  np.testing.assert_allclose(cov, [0.5, 0.0, 0.5, 0.0])


def test_pack_turns_worked_example():
  """One image's single-turn questions -> conversations of <= max_turns rounds, `<image>` in the
  first human turn only, every question kept once; the packed record parses as one sample with a
  region slot per region turn."""
  from medplib_jax.data import mecovqa
  from medplib_jax.demo.run import pack_turns

  def record(i, image, question, answer):
    return {"id": f"r{i}", "image": image, "task": "R", "modality": "ct",
            "conversations": [{"from": "human", "value": "<image>\n" + question},
                              {"from": "gpt", "value": answer}]}

  records = [record(i, "a.png", f"What is in <region>reg_{i}.png</region>?", f"organ {i}")
             for i in range(5)] + [record(5, "b.png", "What is in <region>reg_5.png</region>?", "x")]
  packed = pack_turns(records, max_turns=2, seed=0)
  assert [len(r["conversations"]) // 2 for r in packed] == [2, 2, 1, 1]
  assert [r["image"] for r in packed] == ["a.png"] * 3 + ["b.png"]
  answers = [t["value"] for r in packed for t in r["conversations"] if t["from"] == "gpt"]
  assert sorted(answers) == sorted(r["conversations"][1]["value"] for r in records)
  for r in packed:
    humans = [t["value"] for t in r["conversations"] if t["from"] == "human"]
    assert humans[0].startswith("<image>\n") and not any("<image>" in h for h in humans[1:])
    parsed = mecovqa.parse_record(r)
    assert parsed.task == "R" and len(parsed.region_paths) == len(humans)
  assert pack_turns(records, 2, seed=0) == packed  # seeded: the same order every run
