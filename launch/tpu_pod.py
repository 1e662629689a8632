"""Runs `medplib` on every host of a Cloud TPU VM pod slice at once.

    python launch/tpu_pod.py --name my-v5p-64 --zone us-east5-a [--repo-dir ~/MedPLIB-JAX] -- \
        train --config configs/stage4_moe.py:7b --workdir gs://bucket/runs/stage4

builds and runs

    gcloud compute tpus tpu-vm ssh my-v5p-64 --zone us-east5-a --worker=all \
        --command "cd ~/MedPLIB-JAX && .venv/bin/medplib train ..."

Every host must hold the repository (same path) with its .venv; `jax.distributed.initialize()`
finds the pod's hosts by itself (see `medplib_jax.sharding.maybe_initialize_distributed`).
"""

import argparse
import shlex
import subprocess
import sys


def _remote_dir(path: str) -> str:
  # "~" must stay unquoted so that the remote shell expands it.
  if path.startswith("~/") and len(path) > 2:
    return "~/" + shlex.quote(path[2:])
  return path if path in ("~", "~/") else shlex.quote(path)


def remote_command(repo_dir: str, medplib_args: list[str], env: list[str] = ()) -> str:
  """The shell line each TPU host runs."""
  exports = "".join(f"export {shlex.quote(kv)} && " for kv in env)
  return f"cd {_remote_dir(repo_dir)} && {exports}.venv/bin/medplib {shlex.join(medplib_args)}"


def gcloud_command(name: str, zone: str, remote: str, project: str | None = None,
                   worker: str = "all") -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, "--zone", zone, f"--worker={worker}"]
  if project:
    cmd += ["--project", project]
  return cmd + ["--command", remote]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="launch/tpu_pod.py", description=__doc__.split("\n\n")[0],
                              usage="%(prog)s --name NAME --zone ZONE [options] -- MEDPLIB_ARGS ...")
  p.add_argument("--name", required=True, help="TPU VM (pod slice) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", help="GCP project (default: gcloud's configured one)")
  p.add_argument("--repo-dir", default="~/MedPLIB-JAX",
                 help="repository path on every host (default ~/MedPLIB-JAX)")
  p.add_argument("--worker", default="all", help="'all' or a worker index, e.g. 0 for debugging")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable exported on every host (repeatable)")
  p.add_argument("--dry-run", action="store_true", help="print the gcloud command, run nothing")
  p.add_argument("medplib_args", nargs=argparse.REMAINDER,
                 help="arguments of `medplib`, after --, e.g. -- train --config ...")
  return p


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  medplib_args = args.medplib_args[1:] if args.medplib_args[:1] == ["--"] else args.medplib_args
  if not medplib_args:
    parser.error("give the medplib arguments after --, e.g. -- train --config configs/...")
  bad = [kv for kv in args.env if "=" not in kv]
  if bad:
    parser.error(f"--env takes KEY=VALUE, got {bad}")
  cmd = gcloud_command(args.name, args.zone, remote_command(args.repo_dir, medplib_args, args.env),
                       args.project, args.worker)
  if args.dry_run:
    print(shlex.join(cmd))
    return 0
  return subprocess.call(cmd)


if __name__ == "__main__":
  sys.exit(main())
