"""Runs one command as N cooperating JAX processes on this machine.

    python launch/local.py --num-processes 2 --devices-per-process 4 -- \
        .venv/bin/medplib train --config configs/stage2_vqa.py:tiny --workdir runs/mp

Each process gets MEDPLIB_COORDINATOR=127.0.0.1:PORT, MEDPLIB_NUM_PROCESSES, MEDPLIB_PROCESS_ID
(read by `medplib_jax.sharding.maybe_initialize_distributed`) and, on the CPU platform,
D fake devices (XLA_FLAGS=--xla_force_host_platform_device_count=D, JAX_PLATFORMS=cpu) -- a
multi-host job in miniature. With --platform gpu each process sees its own D GPUs instead.
Output lines are prefixed with [pN]. When one process fails the others are stopped; the exit
status is the first failure's (0 when all succeed).
"""

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A TCP port that was free a moment ago (the coordinator binds it shortly after)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices_per_process: int, port: int,
                platform: str = "cpu", base_xla_flags: str = "") -> dict[str, str]:
  """Environment variables that make process `process_id` one member of the local job."""
  env = {"MEDPLIB_COORDINATOR": f"127.0.0.1:{port}", "MEDPLIB_NUM_PROCESSES": str(num_processes),
         "MEDPLIB_PROCESS_ID": str(process_id)}
  if platform == "cpu":
    # An inherited device-count flag (e.g. from a test runner) would override ours.
    kept = [f for f in base_xla_flags.split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join(kept + [f"{_DEVICE_COUNT_FLAG}={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
  else:
    first = process_id * devices_per_process
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(devices_per_process))
  return env


def describe(envs: list[dict[str, str]], command: list[str]) -> str:
  """What a dry run prints: one shell line per process."""
  lines = []
  for i, env in enumerate(envs):
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    lines.append(f"[p{i}] {assignments} {shlex.join(command)}")
  return "\n".join(lines)


def _pump(stream, prefix: str, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      sys.stdout.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
      sys.stdout.flush()
  stream.close()


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
  """SIGTERM to every still-running process group we started, SIGKILL after the grace period."""
  running = [p for p in procs if p.poll() is None]
  for p in running:
    os.killpg(p.pid, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for p in running:
    try:
      p.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def run(command: list[str], envs: list[dict[str, str]]) -> int:
  """Starts one process per env, streams prefixed output, returns the first non-zero status."""
  lock = threading.Lock()
  procs, pumps = [], []
  for i, extra in enumerate(envs):
    # Own session per process so that stopping it also stops whatever it started.
    p = subprocess.Popen(command, env={**os.environ, **extra}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}]", lock), daemon=True)
    t.start()
    procs.append(p)
    pumps.append(t)
  status = 0
  try:
    while True:
      states = [p.poll() for p in procs]  # poll every process (any() would stop at the first)
      if all(s is not None for s in states):
        break
      failed = [p for p in procs if p.returncode not in (None, 0)]
      if failed:
        status = failed[0].returncode
        with lock:
          print(f"[launch] process {procs.index(failed[0])} exited with {status}; stopping the rest",
                flush=True)
        _stop(procs)
        break
      time.sleep(0.1)
  except KeyboardInterrupt:
    _stop(procs)
    status = 130
  for t in pumps:
    t.join()
  if status == 0:
    status = next((p.returncode for p in procs if p.returncode != 0), 0)
  return status


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="launch/local.py", description=__doc__.split("\n\n")[0],
      usage="%(prog)s --num-processes N [--devices-per-process D] [--port P] [--dry-run] -- CMD ...")
  p.add_argument("--num-processes", type=int, required=True)
  p.add_argument("--devices-per-process", type=int, default=1)
  p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu",
                 help="cpu: D fake CPU devices per process; gpu: D GPUs per process")
  p.add_argument("--port", type=int, help="coordinator port (default: a free one)")
  p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
  p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
  return p


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --, e.g. -- .venv/bin/medplib train --config ...")
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num-processes and --devices-per-process must be at least 1")
  port = args.port or free_port()
  envs = [process_env(i, args.num_processes, args.devices_per_process, port, args.platform,
                      os.environ.get("XLA_FLAGS", ""))
          for i in range(args.num_processes)]
  if args.dry_run:
    print(describe(envs, command))
    return 0
  return run(command, envs)


if __name__ == "__main__":
  sys.exit(main())
