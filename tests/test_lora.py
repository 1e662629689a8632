"""LoRA: adapter numerics, merge == unmerged forward, unmerge, and the optax trainable mask."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common, stage2_vqa
from medplib_jax.models import kernels
from medplib_jax.models.llama import LlamaForCausalLM
from medplib_jax.models.lora import (LoraDense, LoraError, merge_lora, split_lora, trainable_mask,
                                     unmerge_lora)
from tests.test_llama import tiny_configs

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def randomise_lora_b(params, seed=0):
  """Fresh adapters are no-ops (B = 0); give every B random values so the tests see them."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [jax.random.normal(k, v.shape, v.dtype) * 0.05 if str(p[-1].key).endswith("_lora_b") else v
         for k, (p, v) in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, out)


def test_lora_dense_against_numpy():
  layer = LoraDense(5, rank=2, alpha=6.0, kernel_axes=("embed", "mlp"))
  x = jax.random.normal(jax.random.key(0), (3, 4))
  params = nn.unbox(layer.init(jax.random.key(1), x))["params"]
  assert params["kernel_lora_a"].shape == (4, 2) and params["kernel_lora_b"].shape == (2, 5)
  assert not np.any(np.asarray(params["kernel_lora_b"]))
  params = randomise_lora_b(params)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  expected = np.asarray(x, np.float64) @ (p["kernel"] + 3.0 * p["kernel_lora_a"] @ p["kernel_lora_b"])
  np.testing.assert_allclose(np.asarray(layer.apply({"params": params}, x)), expected, atol=1e-5)
  assert "kernel_lora_a" not in LoraDense(5).init(jax.random.key(1), x)["params"]


@pytest.mark.parametrize("num_experts", [1, 2])
def test_merged_equals_unmerged_and_unmerge_restores(num_experts):
  _, cfg = tiny_configs()
  lora = common.lora_config(rank=4, alpha=8.0, dropout=0.1, targets=ALL_TARGETS)
  moe = common.moe_config(num_experts)
  ids = jax.random.randint(jax.random.key(0), (2, 6), 0, cfg.vocab_size)
  with_lora = LlamaForCausalLM(cfg, moe, lora)
  params = randomise_lora_b(nn.unbox(jax.jit(with_lora.init)(jax.random.key(1), ids))["params"])
  if num_experts > 1:
    assert params["layers"]["mlp"]["gate_proj_lora_a"].shape == (2, 2, 64, 4)  # [layers, E, D, r]
  merged = merge_lora(params, 8.0 / 4)
  assert not any("_lora_" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(merged))
  plain = LlamaForCausalLM(cfg, moe, None)

  @jax.jit
  def forwards(params, merged, base):
    return (with_lora.apply({"params": params}, ids)["logits"],
            plain.apply({"params": merged}, ids)["logits"], plain.apply({"params": base}, ids)["logits"])

  unmerged_out, merged_out, base_out = forwards(params, merged, split_lora(params)[0])
  np.testing.assert_allclose(np.asarray(merged_out), np.asarray(unmerged_out), atol=2e-5)
  assert np.max(np.abs(np.asarray(base_out - unmerged_out))) > 1e-3  # the adapters do matter

  restored = unmerge_lora(merged, split_lora(params)[1], 8.0 / 4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
               restored, params)


def test_merge_rejects_half_an_adapter():
  with pytest.raises(LoraError, match="kernel_lora_b"):
    merge_lora({"q": {"kernel": jnp.ones((2, 2)), "kernel_lora_a": jnp.ones((2, 1))}}, 1.0)


def test_training_step_changes_only_the_trainable_params():
  _, cfg = tiny_configs()
  lora = common.lora_config(rank=4, alpha=8.0, dropout=0.1, targets=("q", "v", "gate"))
  model = LlamaForCausalLM(cfg, common.moe_config(1), lora)
  ids = jax.random.randint(jax.random.key(0), (2, 6), 0, cfg.vocab_size)
  params = {"llm": randomise_lora_b(nn.unbox(jax.jit(model.init)(jax.random.key(1), ids))["params"])}
  # Stage-2 selection: lm_head, embeddings, every norm (+ projector, absent here) and LoRA.
  mask = trainable_mask(params, stage2_vqa.get_config("tiny").trainable)
  assert mask["llm"]["layers"]["self_attn"]["q_proj"]["kernel_lora_a"]
  assert not mask["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert mask["llm"]["layers"]["input_layernorm"]["scale"] and mask["llm"]["norm"]["scale"]
  assert not mask["llm"]["layers"]["mlp"]["down_proj"]["kernel"]

  labels = jax.tree.map(lambda t: "train" if t else "frozen", mask)
  tx = optax.multi_transform({"train": optax.adamw(1e-2), "frozen": optax.set_to_zero()}, labels)
  state = tx.init(params)

  def loss_fn(p):
    logits = model.apply({"params": p["llm"]}, ids, deterministic=False,
                         rngs={"dropout": jax.random.key(2)})["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  @jax.jit
  def train_step(params, state):
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
    return optax.apply_updates(params, updates), state

  new, _ = train_step(params, state)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, new)
  assert changed == mask


def test_trainable_mask_regexes_and_expert_adapters():
  params = {"llm": {"layers": {"mlp": {"router": {"kernel": jnp.zeros((2, 4, 2))},
                                       "gate_proj": jnp.zeros((2, 2, 4, 8)),
                                       "gate_proj_lora_a": jnp.zeros((2, 2, 4, 1)),
                                       "gate_proj_lora_b": jnp.zeros((2, 2, 1, 8))}},
                    "lm_head": {"kernel": jnp.zeros((4, 9))}}}
  mask = trainable_mask(params, (r"/router/", r"^llm/lm_head"))
  mlp = mask["llm"]["layers"]["mlp"]
  assert mlp["router"]["kernel"] and mlp["gate_proj_lora_a"] and mlp["gate_proj_lora_b"]
  assert not mlp["gate_proj"] and mask["llm"]["lm_head"]["kernel"]
  no_lora = trainable_mask(params, (r"^llm/lm_head",), train_lora=False)
  assert not no_lora["llm"]["layers"]["mlp"]["gate_proj_lora_a"]


@pytest.mark.parametrize("p", [0.95, 0.5, 1 / 3, 0.0, 1.0])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (300, 257)])
def test_cpu_bernoulli_is_16_bit_words_of_jax_threefry(p, shape):
  """The cpu kernel's mask equals one built from jax's own Threefry-2x32 (jax.extend.random):
  hash j of a row (counter = its index in the [..., ceil(D / 4)] grid) holds the 16-bit words
  of columns j, q + j, 2q + j, 3q + j, compared with round(p * 2**16); for new-style and raw
  uint32 keys."""
  from jax.extend.random import threefry_2x32
  *lead, d = shape
  q = -(-d // 4)
  n = int(np.prod(lead)) * q
  for key in (jax.random.key(3), jax.random.PRNGKey(4)):
    mine = np.asarray(jax.jit(lambda k: kernels.bernoulli(k, p, shape, "cpu"))(key))
    data = key if key.dtype == jnp.uint32 else jax.random.key_data(key)
    counters = jnp.concatenate([jnp.zeros(n, jnp.uint32), jnp.arange(n, dtype=jnp.uint32)])
    hashed = np.asarray(threefry_2x32((data[0], data[1]), counters))
    hi, lo = hashed[:n].reshape(*lead, q), hashed[n:].reshape(*lead, q)
    words = np.concatenate([hi >> 16, hi & 0xFFFF, lo >> 16, lo & 0xFFFF], axis=-1)[..., :d]
    np.testing.assert_array_equal(mine, words < round(p * 2 ** 16))


@pytest.mark.parametrize("kernel_set", ["cpu", "tpu"])
def test_bernoulli_is_the_same_mask_when_sharded(kernel_set):
  """Each shard hashes its own rows: the mask of a jit sharded over 8 devices (rows) and over
  4 x 2 (rows, columns) equals the unsharded one, and the compiled program holds no full-size
  mask (a replicated mask grows with the global batch: issue #23)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  key, shape = jax.random.key(5), (64, 96)
  whole = np.asarray(jax.jit(lambda k: kernels.bernoulli(k, 0.9, shape, kernel_set))(key))
  for mesh_shape, spec in (((8, 1), P("r", None)), ((4, 2), P("r", "c"))):
    mesh = jax.make_mesh(mesh_shape, ("r", "c"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    out_sh = NamedSharding(mesh, spec)
    fn = jax.jit(lambda k: kernels.bernoulli(k, 0.9, shape, kernel_set), out_shardings=out_sh)
    np.testing.assert_array_equal(np.asarray(fn(key)), whole)
    if spec == P("r", None):
      temp = fn.lower(key).compile().memory_analysis().temp_size_in_bytes
      assert temp < 64 * 96 * 4 // 2, f"{kernel_set}: {temp} bytes of temporaries per device"


def test_bernoulli_rate_and_key_dependence():
  bernoulli = lambda key, p, shape: kernels.bernoulli(key, p, shape, "cpu")  # noqa: E731
  key = jax.random.key(0)
  mask = np.asarray(bernoulli(key, 0.95, (1000, 1000)))
  assert abs(mask.mean() - 0.95) < 1e-3
  # The four words of one hash land a quarter row apart; neighbours stay uncorrelated.
  flat = mask.reshape(-1).astype(np.float32)
  assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 5e-3
  other = np.asarray(bernoulli(jax.random.fold_in(key, 1), 0.95, (1000, 1000)))
  assert 0.08 < (mask != other).mean() < 0.11  # independent masks: 2 * 0.95 * 0.05 differ


@pytest.mark.parametrize("kernel_set", ["gpu", "tpu"])
@pytest.mark.parametrize("p", [0.95, 0.5, 1 / 3, 0.0, 1.0])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (300, 257)])
def test_accelerator_bernoulli_is_jax_random_bernoulli(kernel_set, p, shape):
  """The gpu / tpu kernels' written-out mask is jax.random.bernoulli's, bit for bit."""
  for key in (jax.random.key(3), jax.random.PRNGKey(4)):
    mine = jax.jit(lambda k: kernels.bernoulli(k, p, shape, kernel_set))(key)
    wrapped = key if key.dtype != jnp.uint32 else jax.random.wrap_key_data(key)
    np.testing.assert_array_equal(np.asarray(mine),
                                  np.asarray(jax.random.bernoulli(wrapped, p, shape)))


def test_kernel_sets_give_the_same_model(num_experts=2):
  """The MoE decoder with the cpu, gpu and tpu kernel sets (models/kernels.py) on the same params:
  equal logits and gradients without dropout; with dropout each set's masks keep the expected
  share of the LoRA inputs (the loss moves by a comparable amount)."""
  _, cfg = tiny_configs()
  lora = common.lora_config(rank=4, alpha=8.0, dropout=0.1, targets=ALL_TARGETS)
  ids = jax.random.randint(jax.random.key(0), (2, 6), 0, cfg.vocab_size)
  mask = jnp.asarray([[True] * 6, [False] * 2 + [True] * 4])
  results = {}
  for kernel_set in ("cpu", "gpu", "tpu"):
    c = cfg.copy_and_resolve_references()
    c.kernels = kernel_set
    model = LlamaForCausalLM(c, common.moe_config(num_experts), lora)
    if not results:
      params = randomise_lora_b(nn.unbox(jax.jit(model.init)(jax.random.key(1), ids))["params"])

    def loss(p, deterministic, model=model):
      logits = model.apply({"params": p}, ids, attention_mask=mask, deterministic=deterministic,
                           rngs={"dropout": jax.random.key(2), "router": jax.random.key(3)})["logits"]
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, True)
    results[kernel_set] = (value, grads, jax.jit(loss, static_argnums=1)(params, False))
  for kernel_set in ("gpu", "tpu"):
    np.testing.assert_allclose(results[kernel_set][0], results["cpu"][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 results[kernel_set][1], results["cpu"][1])
  shifts = [abs(float(results[k][2] - results[k][0])) for k in ("cpu", "tpu")]
  assert all(s > 0 for s in shifts) and max(shifts) < 20 * min(shifts)
