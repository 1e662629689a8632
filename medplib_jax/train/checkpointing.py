"""Orbax checkpoints of a training run: the TrainState with the grain iterator state.

Layout of a workdir:
  checkpoints/<step>/{state,data}   resumable training state (async save, keep last K)
  export/                           the stage's model directory (checkpoint/model_dir.py)
"""

import logging
import os

import grain
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointCorrupt(RuntimeError):
  """A checkpoint that exists but cannot be restored; the message names its directory."""


def manager(workdir: str, keep: int, save_every: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                         enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator, force: bool = False) -> bool:
  args = {"state": ocp.args.StandardSave(state)}
  if hasattr(data_iterator, "get_state"):
    args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iterator, fallback: bool = True):
  """Restores the newest complete checkpoint into `abstract_state`'s shardings.

  Orbax only lists checkpoints whose write finished, so an interrupted save is never "latest".
  A checkpoint that fails to restore raises CheckpointCorrupt, or (fallback=True) is skipped in
  favour of the previous one. Returns (step, state) or (None, None) when there is none.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if hasattr(data_iterator, "set_state"):
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      where = os.path.join(str(mngr.directory), str(step))
      if fallback and i + 1 < len(steps):
        log.warning("checkpoint %s is unreadable (%s); falling back to step %d", where, e, steps[i + 1])
        continue
      raise CheckpointCorrupt(f"checkpoint {where} cannot be restored: {e}") from e
    return step, restored["state"]
  return None, None
