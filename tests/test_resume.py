"""Preemptible, resumable training: `medplib train` in a subprocess is killed (-9) or sent SIGTERM
after its first checkpoint, restarted with the same command, and must end with exported params
bitwise equal to an uninterrupted run.

The runs use the tiny stage-1 config with a 1-layer LLM on one CPU device and share a persistent
XLA compilation cache, so only the first run compiles.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from medplib_jax.data import synth
from medplib_jax.data.template import template_texts
from medplib_jax.data.tokenizer import train_tokenizer
from medplib_jax.checkpoint import model_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 2
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  paths = synth.write_synthetic(str(root / "data"), 20, seed=0)
  tok = train_tokenizer(synth.synth_corpus_texts(list(paths.values())) + template_texts() * 20,
                        str(root / "data" / "tokenizer"), vocab_size=1000)
  return {"root": root, "train": paths["train"], "image_root": str(root / "data"), "tokenizer": tok,
          "cache": str(root / "xla_cache")}


def _command(data, workdir):
  return [sys.executable, "-m", "medplib_jax.cli", "train", "--config", "configs/stage1_align.py:tiny",
          "--workdir", str(workdir), f"--config.data.train=('{data['train']}',)",
          f"--config.data.image_root={data['image_root']}", f"--config.data.tokenizer={data['tokenizer']}",
          "--config.data.max_length=160", f"--config.train.steps={STEPS}",
          f"--config.train.checkpoint_every={EVERY}", "--config.train.log_every=1",
          "--config.optim.global_batch_size=2", "--config.model.llm.depth=1"]


def _env(data):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=data["cache"],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _start(data, workdir):
  log = open(os.path.join(str(workdir) + ".log"), "ab")
  return subprocess.Popen(_command(data, workdir), cwd=REPO, env=_env(data), stdout=log,
                          stderr=subprocess.STDOUT)


def _log(workdir) -> str:
  with open(str(workdir) + ".log", errors="replace") as f:
    return f.read()


def _run(data, workdir) -> None:
  proc = _start(data, workdir)
  rc = proc.wait(RUN_TIMEOUT_S)
  assert rc == 0, _log(workdir)[-3000:]


def _finished_steps(workdir) -> list[int]:
  """Finalised checkpoint steps (orbax writes into `<step>.orbax-checkpoint-tmp*` first)."""
  d = os.path.join(str(workdir), "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _wait_for_checkpoint(proc, workdir, finished=True, deadline_s=RUN_TIMEOUT_S) -> None:
  """Until a checkpoint is finalised (or, finished=False, its write has begun: the earliest
  moment, so a loaded machine cannot let the run reach its last step first)."""
  d = os.path.join(str(workdir), "checkpoints")
  end = time.monotonic() + deadline_s
  while time.monotonic() < end:
    if _finished_steps(workdir) or (not finished and os.path.isdir(d) and os.listdir(d)):
      return
    assert proc.poll() is None, _log(workdir)[-3000:]
    time.sleep(0.02)
  proc.kill()
  raise AssertionError(f"no checkpoint within {deadline_s} s:\n{_log(workdir)[-3000:]}")


def _exported(workdir):
  return jax.tree.map(np.asarray, model_dir.load_params(os.path.join(str(workdir), "export")))


def _assert_bitwise_equal(a, b):
  fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in fa] == [p for p, _ in fb]
  differ = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(fa, fb) if not np.array_equal(x, y)]
  assert not differ, differ


@pytest.fixture(scope="module")
def reference(data):
  workdir = data["root"] / "uninterrupted"
  _run(data, workdir)
  assert _finished_steps(workdir)[-1] == STEPS
  return _exported(workdir)


def test_kill_9_then_restart_matches_an_uninterrupted_run(data, reference):
  workdir = data["root"] / "killed"
  proc = _start(data, workdir)
  _wait_for_checkpoint(proc, workdir)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(30) == -signal.SIGKILL, _log(workdir)[-3000:]
  assert not os.path.exists(os.path.join(str(workdir), "export"))
  kept = _finished_steps(workdir)[-1]
  _run(data, workdir)  # the same command resumes
  assert f"resumed from step {kept}" in _log(workdir)
  _assert_bitwise_equal(_exported(workdir), reference)


def test_sigterm_checkpoints_exits_0_and_resumes_to_the_same_params(data, reference):
  workdir = data["root"] / "preempted"
  proc = _start(data, workdir)
  _wait_for_checkpoint(proc, workdir, finished=False)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(60) == 0, _log(workdir)[-3000:]
  log = _log(workdir)
  assert "SIGTERM" in log and "preempted: checkpoint at step" in log, log[-3000:]
  stopped = _finished_steps(workdir)[-1]
  summary = json.loads(next(l for l in log.splitlines() if l.startswith('{"steps"')))
  assert summary["preempted"] is True and summary["steps"] == stopped and summary["export"] == ""
  assert stopped < STEPS and not os.path.exists(os.path.join(str(workdir), "export"))
  _run(data, workdir)
  assert f"resumed from step {stopped}" in _log(workdir)
  _assert_bitwise_equal(_exported(workdir), reference)
