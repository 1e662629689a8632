"""Mesh building, logical-axis sharding, and the stage configs."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import common
from medplib_jax import sharding
from medplib_jax.config_loading import load_config

STAGES = ["configs/stage1_align.py", "configs/stage2_vqa.py", "configs/stage3_ground.py",
          "configs/stage4_moe.py"]


@pytest.mark.parametrize("cfg,expected", [
    (dict(data=-1), (8, 1, 1, 1)),
    (dict(data=2, fsdp=-1), (2, 4, 1, 1)),
    (dict(data=2, expert=2, fsdp=2), (2, 2, 2, 1)),
    (dict(data=1, fsdp=2, expert=2, tensor=-1), (1, 2, 2, 2)),
    (dict(data=8, fsdp=1, expert=1, tensor=1), (8, 1, 1, 1)),
])
def test_mesh_shapes(cfg, expected):
  mesh = sharding.make_mesh(cfg)
  assert tuple(mesh.shape.values()) == expected
  assert mesh.axis_names == sharding.MESH_AXES


@pytest.mark.parametrize("cfg,message", [
    (dict(data=3, fsdp=-1), "does not divide"),
    (dict(data=2, fsdp=2), "needs 4 devices but 8"),
    (dict(data=-1, fsdp=-1), "only one mesh axis"),
    (dict(data=0), "positive size"),
])
def test_impossible_meshes_explain_themselves(cfg, message):
  with pytest.raises(sharding.MeshError, match=message):
    sharding.make_mesh(cfg)


class _AnnotatedMlp(nn.Module):
  """A two-layer MLP with logical annotations on params and activations."""

  @nn.compact
  def __call__(self, x):
    w1 = self.param("w1", nn.with_logical_partitioning(nn.initializers.normal(0.5), ("embed", "mlp")),
                    (x.shape[-1], 32))
    w2 = self.param("w2", nn.with_logical_partitioning(nn.initializers.normal(0.5), ("mlp", "embed")),
                    (32, x.shape[-1]))
    h = nn.with_logical_constraint(jax.nn.gelu(x @ w1), ("batch", "length", "act_mlp"))
    return nn.with_logical_constraint(h @ w2, ("batch", "length", "act_embed"))


@pytest.mark.parametrize("mesh_cfg", [dict(data=2, fsdp=2, tensor=2), dict(fsdp=-1),
                                      dict(data=1, tensor=-1)])
def test_logical_sharding_gives_the_same_numbers(mesh_cfg):
  model = _AnnotatedMlp()
  x = jax.random.normal(jax.random.key(1), (8, 5, 16))
  variables = model.init(jax.random.key(0), x)
  expected = model.apply(nn.unbox(variables), x)

  mesh = sharding.make_mesh(mesh_cfg)
  rules = common.LOGICAL_AXIS_RULES
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    shardings = sharding.logical_to_shardings(abstract, mesh, rules)
    sharded_vars = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), x)
    xs = jax.device_put(x, sharding.batch_sharding(mesh, 3, rules))
    got = jax.jit(model.apply)(sharded_vars, xs)
  w1 = nn.unbox(sharded_vars)["params"]["w1"]
  assert w1.sharding.spec == jax.sharding.PartitionSpec(
      *[dict(rules)[n] for n in ("embed", "mlp")])
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-5)  # reduction order differs across shards


def test_host_to_global_assembles_the_batch():
  mesh = sharding.make_mesh(dict(data=4, fsdp=2))
  local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  got = sharding.host_to_global(local, mesh)
  assert got["x"].shape == (16, 3)
  assert len(got["x"].sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(got["x"]), local["x"])


@pytest.mark.parametrize("stage_file", STAGES)
@pytest.mark.parametrize("size", common.SIZES)
def test_every_stage_config_loads_and_overrides_apply(stage_file, size):
  cfg = load_config(f"{stage_file}:{size}", ["--config.optim.lr=0.125", "--config.mesh.fsdp=2",
                                             "--config.seed=7"])
  assert cfg.optim.lr == 0.125 and cfg.mesh.fsdp == 2 and cfg.seed == 7
  assert cfg.model.size == size
  assert cfg.stage == int(stage_file.split("stage")[1][0])
  assert cfg.model.moe.num_experts == (2 if cfg.stage == 4 else 1)


def test_7b_configs_hold_the_published_numbers():
  s2 = load_config("configs/stage2_vqa.py:7b")
  s3 = load_config("configs/stage3_ground.py:7b")
  s4 = load_config("configs/stage4_moe.py:7b")
  s1 = load_config("configs/stage1_align.py:7b")
  llm = s4.model.llm
  assert (llm.width, llm.depth, llm.num_heads, llm.mlp_dim) == (4096, 32, 32, 11008)
  assert llm.vocab_size == 32000 + 9 + 256 + 2
  v = s4.model.vision
  assert (v.image_size, v.patch_size, v.width, v.depth, v.select_layer) == (336, 14, 1024, 24, -2)
  sam = s4.model.sam
  assert (sam.image_size, sam.width, sam.depth, sam.window_size) == (256, 768, 12, 14)
  assert tuple(sam.global_attn_indexes) == (2, 5, 8, 11)
  assert s1.optim.lr == 1e-3 and s1.optim.global_batch_size == 256 and s1.trainable == (r"^projector/",)
  assert (s2.lora.rank, s2.optim.lr, s2.optim.epochs) == (16, 1e-4, 3)
  assert set(s2.lora.targets) == {"q", "k", "v", "o", "gate", "up", "down"}
  assert (s3.lora.rank, s3.lora.alpha, s3.optim.lr, s3.optim.epochs) == (8, 16.0, 3e-4, 10)
  assert (s3.loss.dice, s3.loss.bce, s3.loss.focal) == (5.0, 1.0, 1.0)
  assert (s4.loss.dice, s4.loss.bce, s4.data.max_length) == (0.5, 2.0, 1024)
  assert (s4.model.moe.capacity_factor_train, s4.model.moe.capacity_factor_eval) == (1.5, 2.0)
  assert s4.model.moe.aux_loss_coef == 0.0 and s4.model.moe.top_k == 1
  assert (s4.optim.b1, s4.optim.b2, s4.optim.grad_clip, s4.optim.weight_decay) == (0.9, 0.95, 1.0, 0.0)


def test_bad_override_is_named():
  with pytest.raises(ValueError, match="config overrides look like"):
    load_config("configs/stage2_vqa.py:tiny", ["--lr=1"])
  with pytest.raises(ValueError, match="unknown model size"):
    load_config("configs/stage2_vqa.py:13b")
