"""Multi-process training end to end: 2 local CPU processes x 4 devices train like 1 x 8.

`medplib train` runs a few stage-2 steps on synthetic data twice: once as a single process that
sees 8 fake CPU devices, once through launch/local.py as 2 processes of 4 devices each (gloo CPU
collectives, each process reading its own shard of every epoch's permutation). The global batches
hold the same records, so the logged losses must agree.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


@pytest.fixture(scope="module")
def stage2_inputs(tmp_path_factory):
  from medplib_jax.data import synth, template
  from medplib_jax.data.tokenizer import train_tokenizer
  root = tmp_path_factory.mktemp("mp_data")
  paths = synth.write_synthetic(str(root / "data"), n=20, seed=0)
  tokdir = str(root / "tok")
  train_tokenizer(synth.synth_corpus_texts([paths["train"]]) + template.template_texts() * 50,
                  tokdir, vocab_size=1000)
  return paths["train"], str(root / "data"), tokdir


def _train_command(train_json, image_root, tokdir, workdir):
  return [sys.executable, "-m", "medplib_jax.cli", "train", "--config",
          os.path.join(REPO, "configs", "stage2_vqa.py") + ":tiny", "--workdir", workdir,
          f"--config.data.train=({train_json!r},)", f"--config.data.image_root={image_root}",
          f"--config.data.tokenizer={tokdir}",
          # 128: every synthetic record fits with the 64 image slots (`medplib data check`).
          "--config.data.max_length=128",
          f"--config.train.steps={STEPS}", "--config.train.log_every=1",
          "--config.train.checkpoint_every=100", "--config.optim.global_batch_size=8",
          "--config.model.llm.depth=1"]


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("MEDPLIB_")}
  env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO, **extra)
  return env


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_two_processes_match_one(stage2_inputs, tmp_path):
  train_json, image_root, tokdir = stage2_inputs
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")

  out = subprocess.run(_train_command(train_json, image_root, tokdir, single),
                       env=_clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                       capture_output=True, text=True, timeout=400, cwd=REPO)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "local.py"), "--num-processes", "2",
       "--devices-per-process", "4", "--"] + _train_command(train_json, image_root, tokdir, multi),
      env=_clean_env(), capture_output=True, text=True, timeout=400, cwd=REPO)
  assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]

  one, two = _losses(single), _losses(multi)
  assert sorted(one) == sorted(two) and len(one) == STEPS, (one, two)
  steps = sorted(one)
  assert all(np.isfinite(one[s]) and one[s] > 0 for s in steps), one
  np.testing.assert_allclose([two[s] for s in steps], [one[s] for s in steps], rtol=1e-4)
  # Training moved: the same records would otherwise give the same loss every step.
  assert len({round(one[s], 6) for s in steps}) > 1, one


class _DrawPreprocessor:
  """Stands in for pipeline.Preprocessor: records which record it saw and one draw of its rng."""

  def __init__(self, *args):
    pass

  def __call__(self, record, rng):
    return record["id"], int(rng.integers(1 << 30))


def test_augmentation_rng_is_keyed_by_record_slot_not_process(stage2_inputs, monkeypatch):
  # A record's training augmentation (region sub-sampling) must not depend on how many processes
  # read the epoch, or the 2-process run would see other region masks than the 1-process run.
  from configs import stage2_vqa
  from medplib_jax.data import pipeline
  train_json, image_root, _ = stage2_inputs
  monkeypatch.setattr(pipeline, "Preprocessor", _DrawPreprocessor)
  cfg = stage2_vqa.get_config("tiny")
  entry = pipeline.DatasetEntry.parse(train_json)

  def draws(count):
    out = {}
    for p in range(count):
      ds = pipeline._component(entry, cfg, None, p, count, 7, True, 1)
      out.update(ds[i] for i in range(len(ds)))
    return out

  one, two = draws(1), draws(2)
  assert one == two
  assert len(set(one.values())) == len(one)  # every record its own stream
