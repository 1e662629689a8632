"""Loads `configs/<stage>.py[:arg]` with `--config.a.b=value` overrides (ml_collections config_flags)."""

from absl import flags
from ml_collections import config_flags


def load_config(config_path: str, overrides: list[str] | tuple[str, ...] = ()):
  """`config_path` is `file.py` or `file.py:arg`; overrides look like `--config.optim.lr=1e-4`."""
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    raise ValueError(f"unknown arguments {bad}; config overrides look like --config.optim.lr=1e-4")
  argv = ["medplib", f"--config={config_path}", *overrides]
  fv = flags.FlagValues()
  # config_flags finds the override flags in `sys_argv` (default: the real sys.argv).
  config_flags.DEFINE_config_file("config", default=None, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  try:
    fv(argv)
  except flags.Error as e:
    raise ValueError(f"config {config_path}: {e}") from e
  return fv.config
