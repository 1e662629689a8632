"""Launchers: dry runs print the expected commands; the local launcher really runs 2 JAX processes."""

import os
import shlex
import subprocess
import sys
import textwrap
import time

import pytest

from launch import local, slurm, tpu_pod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tpu_pod_dry_run(capsys):
  rc = tpu_pod.main(["--name", "pod-64", "--zone", "us-east5-a", "--project", "proj", "--dry-run",
                     "--", "train", "--config", "configs/stage4_moe.py:7b", "--workdir", "gs://b/r x"])
  assert rc == 0
  argv = shlex.split(capsys.readouterr().out)
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-64", "--zone", "us-east5-a",
                  "--worker=all", "--project", "proj", "--command",
                  "cd ~/MedPLIB-JAX && .venv/bin/medplib train --config configs/stage4_moe.py:7b "
                  "--workdir 'gs://b/r x'"]


def test_tpu_pod_remote_command_quoting():
  assert (tpu_pod.remote_command("~/my dir", ["train", "--config", "c.py"], ["JAX_LOG=1"]) ==
          "cd ~/'my dir' && export JAX_LOG=1 && .venv/bin/medplib train --config c.py")
  assert tpu_pod.remote_command("/opt/repo", ["eval"]) == "cd /opt/repo && .venv/bin/medplib eval"


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[03-05,07],cpu1", "gpu03"),
    ("node7", "node7"),
    ("a1,a2", "a1"),
    ("rack[1-2]-n[01-04]", "rack1-n01"),
    ("dgx[12,4-5]", "dgx12"),
])
def test_slurm_first_host(nodelist, first):
  assert slurm.first_host(nodelist) == first


def test_slurm_dry_run_and_env(capsys):
  environ = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[03-04]"}
  rc = slurm.main(["--port", "4000", "--dry-run", "--", ".venv/bin/medplib", "train", "--config",
                   "configs/stage2_vqa.py:7b"], environ=environ)
  assert rc == 0
  assert capsys.readouterr().out.strip() == (
      "MEDPLIB_COORDINATOR=gpu03:4000 MEDPLIB_NUM_PROCESSES=16 MEDPLIB_PROCESS_ID=9 "
      ".venv/bin/medplib train --config configs/stage2_vqa.py:7b")
  assert slurm.medplib_env(environ, 4000, gpu_per_task=True)["CUDA_VISIBLE_DEVICES"] == "1"
  assert slurm.main(["--dry-run", "--", "x"], environ={}) == 2
  assert "SLURM_NTASKS" in capsys.readouterr().err


def test_local_dry_run(capsys):
  rc = local.main(["--num-processes", "2", "--devices-per-process", "4", "--port", "1234",
                   "--dry-run", "--", ".venv/bin/medplib", "train", "--config", "c.py"])
  assert rc == 0
  lines = capsys.readouterr().out.strip().splitlines()
  # The 8-device flag this test session sets is replaced by the launcher's own.
  assert lines == [
      f"[p{i}] MEDPLIB_COORDINATOR=127.0.0.1:1234 MEDPLIB_NUM_PROCESSES=2 MEDPLIB_PROCESS_ID={i} "
      "XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu "
      ".venv/bin/medplib train --config c.py" for i in range(2)]
  env = local.process_env(1, 2, 4, 99, platform="gpu")
  assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and "XLA_FLAGS" not in env


WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from medplib_jax import sharding
    assert sharding.maybe_initialize_distributed(), "not initialised as multi-process"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    n = jax.local_device_count()
    # Process p holds rows p*n .. p*n+n-1 of the global vector 1..8.
    local = np.arange(jax.process_index() * n, (jax.process_index() + 1) * n, dtype=np.float32) + 1
    arr = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(arr)
    print(f"process {{jax.process_index()}} of {{jax.process_count()}}, "
          f"{{jax.device_count()}} devices, total {{float(total)}}", flush=True)
""")


def test_local_runs_two_processes_global_sum(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER.format(repo=REPO))
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "local.py"), "--num-processes", "2",
       "--devices-per-process", "4", "--", sys.executable, str(script)],
      capture_output=True, text=True, timeout=150, cwd=tmp_path)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  for p in range(2):
    assert f"[p{p}] process {p} of 2, 8 devices, total 36.0" in out.stdout, out.stdout[-3000:]


def test_local_failure_stops_the_rest(tmp_path):
  # Process 1 fails at once; process 0 would run for a minute unless the launcher stops it.
  code = ("import os, sys, time\n"
          "if os.environ['MEDPLIB_PROCESS_ID'] == '1':\n"
          "  print('failing', flush=True); sys.exit(3)\n"
          "time.sleep(60)\n")
  start = time.monotonic()
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "local.py"), "--num-processes", "2", "--",
       sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert out.returncode == 3
  assert "[p1] failing" in out.stdout and "process 1 exited with 3" in out.stdout
  assert time.monotonic() - start < 30
