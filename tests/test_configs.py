"""The `demo` model size: configs/stageN_*.py:demo[,WORKDIR] hold exactly what `medplib demo` set
through its override list before (values written out below), over the demo workdir layout."""

import pytest
from flax import traverse_util

import configs
from medplib_jax.config_loading import load_config
from medplib_jax.demo import run

# What the demo's override list set on top of configs/stageN_*.py:tiny, in every stage ...
DEMO_COMMON = {
    "optim.warmup_ratio": 0.05, "optim.global_batch_size": 8, "train.log_every": 10,
    "data.max_length": 136,
    "model.vision.width": 128, "model.vision.depth": 4, "model.vision.num_heads": 4,
    "model.vision.mlp_dim": 512,
    "model.llm.width": 256, "model.llm.depth": 4, "model.llm.num_heads": 8,
    "model.llm.num_kv_heads": 8, "model.llm.head_dim": 32, "model.llm.mlp_dim": 688,
    "model.region.max_regions": 2, "model.grounding.max_masks": 2,
}
# ... and per stage (W: the demo workdir): steps = checkpoint_every, lr, data, what it starts from.
DEMO_STAGE = {
    1: {"train.steps": 150, "train.checkpoint_every": 150, "optim.lr": 1e-3,
        "data.train": ("W/data/tasks/train_caption.json",),
        "init.clip": "W/standin_clip", "init.sam": "W/standin_sam"},
    2: {"train.steps": 1200, "train.checkpoint_every": 1200, "optim.lr": 1e-3,
        "data.train": ("W/data/tasks/train_C_turns.json", "W/data/tasks/train_R_turns.json"),
        "init.previous_stage": "W/stage1/export", "lora.rank": 0,
        "trainable": ("^llm/lm_head", "^llm/embed_tokens", "^llm/.*norm", "^projector/", "^llm/",
                      "^region_adapter/")},
    3: {"train.steps": 500, "train.checkpoint_every": 500, "optim.lr": 1e-3,
        "data.train": ("W/data/tasks/train_G_turns.json",),
        "init.previous_stage": "W/stage2/export"},
    4: {"train.steps": 700, "train.checkpoint_every": 700, "optim.lr": 5e-4,
        "data.train": ("W/data/tasks/train_C_turns.json", "W/data/tasks/train_R_turns.json",
                       "W/data/tasks/train_G_turns.json"),
        "init.ground_expert": "W/stage3/export", "init.vqa_expert": "W/stage2/export"},
}


def flat(cfg) -> dict:
  out = traverse_util.flatten_dict(cfg.to_dict(), sep=".")
  return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def at(workdir: str, value):
  """`value` with a leading "W/" (in a string or a tuple of strings) put under `workdir`."""
  if isinstance(value, tuple):
    return tuple(at(workdir, v) for v in value)
  return workdir + value[1:] if isinstance(value, str) and value.startswith("W/") else value


def expected(stage: int, workdir: str, steps=None) -> dict:
  """The tiny config with the demo's overrides (data and init paths under `workdir`)."""
  want = flat(configs.stage_config(stage, "tiny"))
  want.update(DEMO_COMMON)
  want.update({"data.image_root": f"{workdir}/data", "data.tokenizer": f"{workdir}/tokenizer"})
  want.update({k: at(workdir, v) for k, v in DEMO_STAGE[stage].items()})
  if steps is not None:
    want.update({"train.steps": steps, "train.checkpoint_every": steps})
  want["model.size"] = "demo"  # the one field that differs: tiny before, the size's name now
  return want


@pytest.mark.parametrize("stage", sorted(configs.STAGES))
def test_demo_config_file_holds_the_demo_settings(stage):
  got = flat(load_config(f"configs/{configs.STAGES[stage]}.py:demo"))
  assert got == expected(stage, "runs/demo")


@pytest.mark.parametrize("stage", sorted(configs.STAGES))
def test_demo_config_takes_another_workdir(stage):
  got = flat(load_config(f"configs/{configs.STAGES[stage]}.py:demo,runs/mydemo"))
  assert got == expected(stage, "runs/mydemo")


@pytest.mark.parametrize("stage", sorted(configs.STAGES))
@pytest.mark.parametrize("fast", [False, True])
def test_medplib_demo_runs_the_demo_configs(stage, fast):
  """What `medplib demo [--fast] --workdir /abs/wd` trains: the demo settings (2 steps: --fast)."""
  got = flat(run.stage_config(stage, "/abs/wd", fast))
  assert got == expected(stage, "/abs/wd", steps=2 if fast else None)


def test_demo_slots_match_its_packed_turns():
  model = configs.stage_config(4, "demo").model
  assert (model.region.max_regions, model.grounding.max_masks) == (run.MAX_TURNS["R"],
                                                                   run.MAX_TURNS["G"])


@pytest.mark.parametrize("arg, message", [
    ("huge", "unknown model size 'huge'; choose one of ('tiny', 'demo', '7b') "
             "(e.g. configs/stage2_vqa.py:7b)"),
    ("tiny,runs/x", "config arg 'tiny,runs/x': only size demo takes a workdir (demo,WORKDIR)"),
    ("7b,runs/x", "config arg '7b,runs/x': only size demo takes a workdir (demo,WORKDIR)")])
def test_bad_config_arg_is_one_line(arg, message):
  with pytest.raises(ValueError) as e:
    configs.stage_config(2, arg)
  assert str(e.value) == message
  # Through config_flags (medplib train --config), that line ends the parse error it reports.
  with pytest.raises(ValueError) as e:
    load_config(f"configs/stage2_vqa.py:{arg}")
  assert str(e.value).rstrip().splitlines()[-1] == f"ValueError: {message}"
