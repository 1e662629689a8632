"""Per-task entry point of a SLURM job: sets the MEDPLIB_* variables, then execs the command.

    srun python launch/slurm.py [--port 29500] -- .venv/bin/medplib train --config ...

From SLURM's own variables: MEDPLIB_COORDINATOR = first node of SLURM_JOB_NODELIST:port,
MEDPLIB_NUM_PROCESSES = SLURM_NTASKS, MEDPLIB_PROCESS_ID = SLURM_PROCID; these are read by
`medplib_jax.sharding.maybe_initialize_distributed`. Run one task per node (each process drives
all of its node's GPUs) or, with --gpu-per-task, one task per GPU (CUDA_VISIBLE_DEVICES is set
from SLURM_LOCALID). See launch/slurm.sbatch.
"""

import argparse
import os
import re
import shlex
import sys
from collections.abc import Mapping

_BRACKET = re.compile(r"\[([^\]]*)\]")


class SlurmEnvError(ValueError):
  """The SLURM variables the launcher needs are missing or malformed."""


def first_host(nodelist: str) -> str:
  """First host of a SLURM host list: "gpu[03-05,07],cpu1" -> "gpu03",
  "rack[1-2]-n[01-04]" -> "rack1-n01"."""
  depth, end = 0, len(nodelist)
  for i, ch in enumerate(nodelist):  # the first top-level comma ends the first group
    depth += {"[": 1, "]": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      end = i
      break
  group = nodelist[:end].strip()
  if not group:
    raise SlurmEnvError(f"empty SLURM node list {nodelist!r}")
  return _BRACKET.sub(lambda m: m.group(1).split(",")[0].split("-")[0], group)


def medplib_env(environ: Mapping[str, str], port: int, gpu_per_task: bool = False) -> dict[str, str]:
  """The variables to add for this task, from the SLURM_* ones in `environ`."""
  missing = [k for k in ("SLURM_NTASKS", "SLURM_PROCID") if k not in environ]
  nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
  if nodelist is None:
    missing.append("SLURM_JOB_NODELIST")
  if missing:
    raise SlurmEnvError(f"{', '.join(missing)} not set: run this inside a SLURM job step (srun)")
  env = {"MEDPLIB_COORDINATOR": f"{first_host(nodelist)}:{port}",
         "MEDPLIB_NUM_PROCESSES": environ["SLURM_NTASKS"],
         "MEDPLIB_PROCESS_ID": environ["SLURM_PROCID"]}
  if gpu_per_task:
    if "SLURM_LOCALID" not in environ:
      raise SlurmEnvError("--gpu-per-task needs SLURM_LOCALID (set by srun)")
    env["CUDA_VISIBLE_DEVICES"] = environ["SLURM_LOCALID"]
  return env


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="launch/slurm.py", description=__doc__.split("\n\n")[0],
                              usage="%(prog)s [--port P] [--gpu-per-task] [--dry-run] -- CMD ...")
  p.add_argument("--port", type=int, default=int(os.environ.get("MEDPLIB_COORDINATOR_PORT", 29500)),
                 help="coordinator port on the first node (default 29500 or MEDPLIB_COORDINATOR_PORT)")
  p.add_argument("--gpu-per-task", action="store_true",
                 help="one task per GPU: CUDA_VISIBLE_DEVICES=SLURM_LOCALID")
  p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
  p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
  return p


def main(argv=None, environ: Mapping[str, str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --, e.g. -- .venv/bin/medplib train --config ...")
  environ = os.environ if environ is None else environ
  try:
    extra = medplib_env(environ, args.port, args.gpu_per_task)
  except SlurmEnvError as e:
    print(f"launch/slurm.py: {e}", file=sys.stderr)
    return 2
  line = " ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items()) + " " + shlex.join(command)
  if args.dry_run:
    print(line)
    return 0
  print(f"[slurm task {extra['MEDPLIB_PROCESS_ID']}] {line}", flush=True)
  os.execvpe(command[0], command, {**environ, **extra})
  return 0  # not reached: exec replaces this process


if __name__ == "__main__":
  sys.exit(main())
