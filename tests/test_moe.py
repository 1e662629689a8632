"""MoE feed-forward against plain-numpy re-derivations of DeepSpeed's TopKGate and dense FFNs."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ml_collections

from configs.common import LOGICAL_AXIS_RULES, lora_config, moe_config
from medplib_jax import sharding
from medplib_jax.models.moe import (MoeConfigError, MoeFeedForward, expert_capacity,
                                     split_expert_params, upcycle_ffns)

WIDTH, MLP = 8, 12


# ---- independent numpy references ----------------------------------------------------------------

def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_silu(z):
  return z / (1.0 + np.exp(-z))


def np_expert(params, e, x, lora_scale=0.0):
  """SwiGLU expert e with LoRA merged into its weights: x [S, D] -> [S, D] (float64)."""
  def weight(name):
    w = np.asarray(params[name][e], np.float64)
    if name + "_lora_a" in params:
      w = w + lora_scale * (np.asarray(params[name + "_lora_a"][e], np.float64)
                            @ np.asarray(params[name + "_lora_b"][e], np.float64))
    return w
  return (np_silu(x @ weight("gate_proj")) * (x @ weight("up_proj"))) @ weight("down_proj")


def np_top1gating(logits, capacity_factor, min_capacity):
  """DeepSpeed top1gating without noise, tokens kept in position order.

  Returns combine weights [S, E, C], l_aux and exp_counts."""
  s, e = logits.shape
  gates = np_softmax(logits)
  capacity = max(math.ceil(s / e * capacity_factor), min_capacity)
  mask1 = np.eye(e)[gates.argmax(1)]
  exp_counts = mask1.sum(0)
  l_aux = np.sum(gates.mean(0) * mask1.mean(0)) * e
  locations1 = np.cumsum(mask1, 0) - 1
  mask1 = mask1 * (locations1 < capacity)
  locations1_s = (locations1 * mask1).sum(1).astype(int)
  gates = gates * mask1
  combine = np.einsum("se,sc->sec", gates, np.eye(capacity)[locations1_s])
  return combine, l_aux, exp_counts


def np_top2gating(logits, capacity_factor, min_capacity):
  """DeepSpeed top2gating with the second expert taken without Gumbel sampling."""
  s, e = logits.shape
  gates = np_softmax(logits)
  capacity = max(math.ceil(s / e * capacity_factor * 2), min_capacity)
  mask1 = np.eye(e)[gates.argmax(1)]
  mask2 = np.eye(e)[np.where(mask1 > 0, -np.inf, logits).argmax(1)]
  locations1 = np.cumsum(mask1, 0) - 1
  locations2 = np.cumsum(mask2, 0) - 1 + mask1.sum(0, keepdims=True)
  exp_counts = (mask1 + mask2).sum(0)
  l_aux = np.mean(gates.mean(0) * mask1.mean(0)) * e * e
  mask1 = mask1 * (locations1 < capacity)
  mask2 = mask2 * (locations2 < capacity)
  loc1 = (locations1 * mask1).sum(1).astype(int)
  loc2 = (locations2 * mask2).sum(1).astype(int)
  g1 = (gates * mask1).sum(1)
  g2 = (gates * mask2).sum(1)
  denom = np.maximum(g1 + g2, np.finfo(np.float32).eps)
  combine = (np.einsum("se,sc->sec", (g1 / denom)[:, None] * mask1, np.eye(capacity)[loc1])
             + np.einsum("se,sc->sec", (g2 / denom)[:, None] * mask2, np.eye(capacity)[loc2]))
  return combine, l_aux, exp_counts


def np_moe_layer(params, x, combine, lora_scale=0.0):
  """DeepSpeed MOELayer: dispatch einsum, experts, combine einsum."""
  dispatched = np.einsum("sec,sm->ecm", (combine > 0).astype(np.float64), x)
  expert_out = np.stack([np_expert(params, e, dispatched[e], lora_scale)
                         for e in range(dispatched.shape[0])])
  return np.einsum("sec,ecm->sm", combine, expert_out)


# ---- helpers -------------------------------------------------------------------------------------

def moe_ffn(*, width=WIDTH, mlp_dim=MLP, kernels="auto", lora_rank=0, lora_alpha=16.0,
            lora_dropout=0.0, lora_targets=(), decode_max_tokens=8, name=None, **routing):
  """MoeFeedForward from configs, as the decoder builds it; `routing` overrides fields of
  moe_config(2). Frozen configs are hashable, so the module can be a static jit argument."""
  moe = moe_config(2)
  assert set(routing) <= set(moe), sorted(set(routing) - set(moe))
  moe.update(routing)
  llm = ml_collections.FrozenConfigDict(dict(width=width, mlp_dim=mlp_dim, kernels=kernels))
  lora = ml_collections.FrozenConfigDict(lora_config(lora_rank, lora_alpha, lora_dropout,
                                                     lora_targets)) if lora_rank else None
  return MoeFeedForward(llm, ml_collections.FrozenConfigDict(moe), lora,
                        decode_max_tokens=decode_max_tokens, name=name)


def with_routing(module, **routing):
  """The module with some moe_config fields changed."""
  moe = ml_collections.ConfigDict(module.moe_config)
  moe.update(routing)
  return module.clone(moe_config=ml_collections.FrozenConfigDict(moe))


def make_params(module, x, seed=0):
  """Random params of the module's shapes, drawn with numpy (LoRA B non-zero, so LoRA is used)."""
  shapes = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), x, True)))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[-2]), jnp.float32), shapes)


def with_router_logits(params, x, logits):
  """Sets the router kernel so that x [T, D] @ kernel = logits [T, E] (T == D, x invertible)."""
  kernel = np.linalg.solve(np.asarray(x, np.float64), np.asarray(logits, np.float64))
  return {**params, "router": {"kernel": jnp.asarray(kernel, jnp.float32)}}


def tokens(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# Hand-made logits for 8 tokens and 2 experts: 6 tokens prefer expert 0, 2 prefer expert 1.
FORCED_LOGITS = np.array([[2.0, 0.0], [1.0, -1.0], [0.5, 2.5], [3.0, 0.0],
                          [0.2, -0.4], [1.5, 0.0], [-1.0, 1.0], [0.7, 0.0]])


# ---- capacity mode -------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k,decode_max_tokens", [(1, 0), (2, 0), (1, 8), (2, 8)],
                         ids=["top1-buffers", "top2-buffers", "top1-decode", "top2-decode"])
def test_capacity_matches_deepspeed_rule(top_k, decode_max_tokens):
  # 8 tokens: decode_max_tokens=8 takes the decode path (experts under lax.cond), 0 the buffers.
  module = moe_ffn(top_k=top_k, capacity_factor_eval=0.5, min_capacity=1,
                   random_token_selection=False, decode_max_tokens=decode_max_tokens,
                   lora_rank=2, lora_alpha=4.0, lora_targets=("gate", "down"))
  x = tokens(1, (2, 4, WIDTH))
  flat = np.asarray(x.reshape(8, WIDTH), np.float64)
  params = with_router_logits(make_params(module, x), flat, FORCED_LOGITS)
  y, stats = jax.jit(module.apply, static_argnums=2)({"params": params}, x, True)

  gating = np_top1gating if top_k == 1 else np_top2gating
  combine, l_aux, exp_counts = gating(FORCED_LOGITS, 0.5, 1)
  want = np_moe_layer(params, flat, combine, lora_scale=2.0)
  np.testing.assert_allclose(np.asarray(y).reshape(8, WIDTH), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["aux_loss"], l_aux, rtol=1e-5)
  np.testing.assert_array_equal(stats["tokens_per_expert"], exp_counts)
  kept = (combine > 0).sum()
  np.testing.assert_allclose(stats["dropped_fraction"], 1.0 - kept / (8 * top_k), rtol=1e-6)
  # The rule really dropped tokens here: capacity 2 (top-1) / 4 (top-2) for 6 first choices.
  assert float(stats["dropped_fraction"]) > 0.0
  dropped = combine.sum((1, 2)) == 0
  np.testing.assert_array_equal(np.asarray(y).reshape(8, WIDTH)[dropped], 0.0)


def test_routing_groups_match_deepspeed_rule_per_group():
  """routing_groups=2: the numpy TopKGate applied to each block of 2 sequences on its own
  (capacity 2 per group, where the whole batch of 16 tokens would give capacity 4)."""
  width = 16
  module = moe_ffn(width=width, routing_groups=2, capacity_factor_eval=0.5, min_capacity=1,
                   random_token_selection=False)
  x = tokens(11, (4, 4, width))
  flat = np.asarray(x.reshape(16, width), np.float64)
  # Group 0 as FORCED_LOGITS (6 tokens on expert 0), group 1 the mirror image (6 on expert 1).
  logits = np.concatenate([FORCED_LOGITS, FORCED_LOGITS[:, ::-1]])
  params = with_router_logits(make_params(module, x), flat, logits)
  y, stats = jax.jit(module.apply, static_argnums=2)({"params": params}, x, True)

  want, l_aux, counts = [], [], []
  for g in range(2):
    combine, aux, exp_counts = np_top1gating(logits[8 * g:8 * g + 8], 0.5, 1)
    want.append(np_moe_layer(params, flat[8 * g:8 * g + 8], combine))
    l_aux.append(aux)
    counts.append(exp_counts)
  np.testing.assert_allclose(np.asarray(y).reshape(16, width), np.concatenate(want),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["aux_loss"], np.mean(l_aux), rtol=1e-5)
  np.testing.assert_array_equal(stats["tokens_per_expert"], np.sum(counts, 0))
  # Each group drops 4 of its 6 tokens on the crowded expert; one group of 16 would drop 0 + 4.
  np.testing.assert_allclose(stats["dropped_fraction"], 8 / 16, rtol=1e-6)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_routing_groups_equal_separate_calls(dispatch):
  module = moe_ffn(num_experts=4, top_k=2, dispatch=dispatch, capacity_factor_train=0.5,
                   min_capacity=1, random_token_selection=False, decode_max_tokens=0,
                   lora_rank=2, lora_targets=("up",))
  x = tokens(12, (6, 3, WIDTH))
  params = make_params(module, x)
  params["router"]["kernel"] = 3.0 * params["router"]["kernel"]  # uneven loads: drops in capacity
  apply = jax.jit(lambda m, x: m.apply({"params": params}, x, False), static_argnums=0)
  y, stats = apply(with_routing(module, routing_groups=3), x)
  parts = [apply(module, x[2 * g:2 * g + 2]) for g in range(3)]
  np.testing.assert_allclose(y, np.concatenate([p[0] for p in parts]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["aux_loss"], np.mean([p[1]["aux_loss"] for p in parts]),
                             rtol=1e-5)
  np.testing.assert_array_equal(stats["tokens_per_expert"],
                                np.sum([p[1]["tokens_per_expert"] for p in parts], 0))
  np.testing.assert_allclose(stats["dropped_fraction"],
                             np.mean([p[1]["dropped_fraction"] for p in parts]), rtol=1e-6)
  if dispatch == "capacity":
    assert float(stats["dropped_fraction"]) > 0.0


@pytest.mark.parametrize("dispatch,top_k", [("capacity", 1), ("capacity", 2), ("dropless", 2)])
def test_decode_path_equals_buffers(dispatch, top_k):
  module = moe_ffn(num_experts=4, top_k=top_k, dispatch=dispatch, lora_rank=2,
                   lora_targets=("gate", "up", "down"))
  x = tokens(13, (3, 2, WIDTH))  # 6 tokens: under the default decode_max_tokens of 8
  params = make_params(module, x)
  apply = jax.jit(lambda m, x: m.apply({"params": params}, x, True), static_argnums=0)
  y_decode, stats = apply(module, x)
  y_buffers, stats_buffers = apply(module.clone(decode_max_tokens=0), x)
  # float32 sums in another order (outputs up to ~100 here)
  np.testing.assert_allclose(y_decode, y_buffers, rtol=1e-4, atol=1e-5 * np.abs(y_buffers).max())
  jax.tree.map(np.testing.assert_array_equal, stats, stats_buffers)
  # One conditional per expert (skipped when nothing is routed there), no batched expert dots.
  text = jax.jit(lambda x: module.apply({"params": params}, x, True)).lower(x).as_text()
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert text.count("stablehlo.case") == 4 and dots and not any("batching_dims" in d for d in dots)


def test_decode_path_skips_unrouted_experts():
  """A token routed to expert 0 only: expert 1's branch is not taken, so even NaN weights there
  leave the output finite and equal to expert 0's (the buffer path computes expert 1 too)."""
  module = moe_ffn()
  x = tokens(15, (1, 1, WIDTH))
  params = make_params(module, x)
  params["router"]["kernel"] = jnp.zeros_like(params["router"]["kernel"])  # tie -> expert 0
  params = {**params, **{n: params[n].at[1].set(jnp.nan) for n in ("gate_proj", "up_proj", "down_proj")}}
  y, _ = jax.jit(module.apply, static_argnums=2)({"params": params}, x, True)
  want = 0.5 * np_expert(params, 0, np.asarray(x[0], np.float64))
  np.testing.assert_allclose(np.asarray(y[0]), want, rtol=1e-4, atol=1e-5)


def test_capacity_formula():
  assert expert_capacity(1024, 2, 1, 1.5, 4) == 768
  assert expert_capacity(1024, 2, 1, 2.0, 4) == 1024  # eval: nothing can be dropped
  assert expert_capacity(5, 2, 1, 1.5, 4) == 4         # ceil(3.75) = 4
  assert expert_capacity(3, 2, 1, 1.0, 4) == 4         # min_capacity
  assert expert_capacity(10, 2, 2, 1.0, 1) == 10       # top-2 doubles the factor


def test_random_token_selection_keeps_capacity_of_routed_tokens():
  module = moe_ffn(capacity_factor_train=0.5, min_capacity=1)
  x = tokens(2, (1, 8, WIDTH))
  flat = np.asarray(x.reshape(8, WIDTH), np.float64)
  params = with_router_logits(make_params(module, x), flat, FORCED_LOGITS)
  routed_to = FORCED_LOGITS.argmax(1)
  capacity = expert_capacity(8, 2, 1, 0.5, 1)
  gates = np_softmax(FORCED_LOGITS)
  expert_out = np.stack([np_expert(params, e, flat) for e in range(2)])
  kept_sets = set()
  train = jax.jit(lambda key: module.apply({"params": params}, x, False, rngs={"router": key}))
  for seed in range(6):
    y, stats = train(jax.random.key(seed))
    y = np.asarray(y).reshape(8, WIDTH)
    kept = np.abs(y).sum(1) > 0
    for e in range(2):
      routed = routed_to == e
      assert kept[routed].sum() == min(capacity, routed.sum())
    # Every kept token went through the expert it was routed to, scaled by its gate.
    for t in np.flatnonzero(kept):
      np.testing.assert_allclose(y[t], gates[t, routed_to[t]] * expert_out[routed_to[t], t],
                                 rtol=1e-4, atol=1e-5)
    kept_sets.add(tuple(kept))
    np.testing.assert_allclose(stats["dropped_fraction"], 1 - kept.sum() / 8, rtol=1e-6)
  assert len(kept_sets) > 1, "random token selection should vary with the 'router' key"


def test_aux_loss_worked_example():
  # gates: [.75 .25] [.75 .25] [.25 .75] [.5 .5] -> first choices 0, 0, 1, 0 (tie -> expert 0).
  # me = [.5625, .4375], ce = [.75, .25]; l_aux = 2 * (.5625 * .75 + .4375 * .25) = 1.0625.
  logits = np.array([[math.log(3.0), 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)], [0.0, 0.0]])
  module = moe_ffn(width=4)
  x = tokens(3, (1, 4, 4))
  params = with_router_logits(make_params(module, x), np.asarray(x[0], np.float64), logits)
  _, stats = jax.jit(module.apply, static_argnums=2)({"params": params}, x, True)
  np.testing.assert_allclose(stats["aux_loss"], 1.0625, rtol=1e-5)
  np.testing.assert_array_equal(stats["tokens_per_expert"], [3, 1])
  np.testing.assert_allclose(stats["dropped_fraction"], 0.0)


# ---- dropless mode -------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_equals_dense_per_token(top_k):
  module = moe_ffn(num_experts=4, top_k=top_k, dispatch="dropless", lora_rank=2, lora_alpha=2.0,
                   lora_targets=("up", "down"))
  x = tokens(4, (3, 5, WIDTH))
  params = make_params(module, x)
  params["router"]["kernel"] = 3.0 * params["router"]["kernel"]  # uneven expert loads
  y, stats = jax.jit(module.apply, static_argnums=2)({"params": params}, x, True)

  flat = np.asarray(x.reshape(-1, WIDTH), np.float64)
  gates = np_softmax(flat @ np.asarray(params["router"]["kernel"], np.float64))
  want = np.zeros_like(flat)
  choices = np.argsort(-gates, axis=1)[:, :top_k]
  for t in range(flat.shape[0]):
    weights = gates[t, choices[t]]
    if top_k == 2:
      weights = weights / weights.sum()
    for e, w in zip(choices[t], weights):
      want[t] += w * np_expert(params, e, flat[t:t + 1], lora_scale=1.0)[0]
  np.testing.assert_allclose(np.asarray(y).reshape(-1, WIDTH), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(stats["tokens_per_expert"],
                                np.bincount(choices.reshape(-1), minlength=4))
  assert float(stats["dropped_fraction"]) == 0.0


# ---- sharding ------------------------------------------------------------------------------------

MESHES = {
    "data2_expert2_fsdp2": (dict(data=2, fsdp=2, expert=2, tensor=1), LOGICAL_AXIS_RULES),
    "experts_on_fsdp": (dict(data=2, fsdp=4, expert=1, tensor=1),
                        (("exp", "fsdp"), ("embed", None)) + tuple(
                            r for r in LOGICAL_AXIS_RULES if r[0] not in ("exp", "embed"))),
    "expert4_tensor2": (dict(data=1, fsdp=1, expert=4, tensor=2), LOGICAL_AXIS_RULES),
}


@pytest.mark.parametrize("dispatch,routing_groups", [("capacity", 1), ("dropless", 1),
                                                     ("capacity", 2)])
def test_sharded_equals_single_device(dispatch, routing_groups):
  # A fixed group count gives the same numbers on every layout (2 groups on 4, 8 or 1 batch
  # shards): groups are blocks of the batch, not of the mesh.
  module = moe_ffn(num_experts=4, top_k=2, dispatch=dispatch, capacity_factor_train=0.6,
                   min_capacity=1, lora_rank=2, routing_groups=routing_groups,
                   lora_targets=("gate",))
  x = tokens(5, (4, 5, WIDTH))  # 20 tokens: not a multiple of 8, so the token padding is used
  params = make_params(module, x)

  def loss(params, x):
    y, stats = module.apply({"params": params}, x, False, rngs={"router": jax.random.key(7)})
    return jnp.sum(y ** 2) + stats["aux_loss"], (y, stats)

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, (y0, stats0)), grads0 = step(params, x)
  if dispatch == "capacity":
    assert float(stats0["dropped_fraction"]) > 0.0
  for mesh_cfg, rules in MESHES.values():
    mesh = sharding.make_mesh(mesh_cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      abstract = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x, True))
      shardings = sharding.logical_to_shardings(abstract, mesh, rules)["params"]
      sharded = jax.device_put(params, shardings)
      (_, (y1, stats1)), grads1 = step(sharded, x)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
    for key in stats0:
      np.testing.assert_allclose(stats1[key], stats0[key], rtol=1e-6)
    # float32 sums in another order: tolerance relative to each gradient's scale
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()),
                 grads1, grads0)


def test_kernel_sets_agree():
  """The gpu / tpu expert einsums over [G, E, C, D] buffers and the cpu experts-leading dots
  (models/kernels.py) give the same outputs, stats and gradients: 2 routing groups with drops,
  LoRA; the tpu set also sharded with the experts local (on fsdp) and expert-parallel."""
  x = tokens(16, (4, 5, WIDTH))
  results = {}
  for kernel_set, mesh_name in (("cpu", None), ("gpu", None), ("tpu", None),
                                ("tpu", "experts_on_fsdp"), ("tpu", "data2_expert2_fsdp2")):
    module = moe_ffn(num_experts=4, top_k=2, capacity_factor_train=0.6, min_capacity=1,
                     routing_groups=2, lora_rank=2, lora_targets=("gate", "down"),
                     kernels=kernel_set)
    if not results:
      params = make_params(module, x)

    def loss(params, x, module=module):
      y, stats = module.apply({"params": params}, x, False, rngs={"router": jax.random.key(7)})
      return jnp.sum(y ** 2), (y, stats)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    if mesh_name is None:
      results[kernel_set] = step(params, x)
      continue
    mesh_cfg, rules = MESHES[mesh_name]
    mesh = sharding.make_mesh(mesh_cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      abstract = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x, True))
      shardings = sharding.logical_to_shardings(abstract, mesh, rules)["params"]
      results[f"tpu_{mesh_name}"] = step(jax.device_put(params, shardings), x)
  (_, (y0, stats0)), grads0 = results.pop("cpu")
  assert float(stats0["dropped_fraction"]) > 0.0
  for (_, (y1, stats1)), grads1 in results.values():
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stats1, stats0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()),
                 grads1, grads0)


def test_one_group_per_batch_shard_keeps_expert_work_per_device():
  """routing_groups=0 on 8 fsdp shards: 8 groups, one per device, so each device runs the
  experts on its own tokens; one global group makes every device run them on all tokens."""
  module = moe_ffn(routing_groups=0)
  x = tokens(14, (8, 16, WIDTH))
  params = make_params(module, x)
  mesh = sharding.make_mesh(dict(data=1, fsdp=8, expert=1, tensor=1))
  flops = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    assert module._num_groups(8) == 8 and module._num_groups(1) == 1  # decode batch 1: 1 group
    x_sharded = jax.device_put(x, sharding.batch_sharding(mesh, 3, LOGICAL_AXIS_RULES))
    for groups in (0, 1):
      fn = jax.jit(lambda p, x, m=with_routing(module, routing_groups=groups): m.apply({"params": p}, x, False,
                                                       rngs={"router": jax.random.key(0)})[0])
      cost = fn.lower(params, x_sharded).compile().cost_analysis()
      flops[groups] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
      y = fn(params, x_sharded)
  assert flops[0] < flops[1] / 4, flops
  assert y.shape == x.shape


def test_expert_parallel_uses_all_to_all():
  module = moe_ffn()
  x = tokens(6, (4, 4, WIDTH))
  params = make_params(module, x)
  with jax.set_mesh(sharding.make_mesh(dict(data=2, fsdp=2, expert=2))), \
       nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    text = jax.jit(lambda p, x: module.apply({"params": p}, x, True)).lower(params, x).as_text()
  assert "all_to_all" in text


# ---- params, upcycling, scan ---------------------------------------------------------------------

def test_param_layout_and_lora_init():
  module = moe_ffn(lora_rank=3, lora_targets=("gate", "up", "down", "q", "v"))
  boxed = jax.jit(module.init, static_argnums=2)(jax.random.key(0), jnp.zeros((1, 2, WIDTH)), True)
  boxed = boxed["params"]
  names = {k: v.names for k, v in boxed.items() if hasattr(v, "names")}
  assert names["gate_proj"] == ("exp", "embed", "mlp")
  assert names["down_proj"] == ("exp", "mlp", "embed")
  assert boxed["router"]["kernel"].names == ("embed", None)
  params = nn.unbox(boxed)
  assert params["gate_proj_lora_a"].shape == (2, WIDTH, 3)
  assert params["down_proj_lora_b"].shape == (2, 3, WIDTH)
  assert not np.any(params["up_proj_lora_b"])
  assert set(params) == {"router", "gate_proj", "up_proj", "down_proj"} | {
      f"{p}_proj_lora_{s}" for p in ("gate", "up", "down") for s in "ab"}


def test_bad_config_is_rejected():
  x = jnp.zeros((1, 2, WIDTH))
  with pytest.raises(MoeConfigError, match="dispatch"):
    moe_ffn(dispatch="sparse").init(jax.random.key(0), x, True)
  with pytest.raises(MoeConfigError, match="top_k"):
    moe_ffn(top_k=3, num_experts=4).init(jax.random.key(0), x, True)
  with pytest.raises(MoeConfigError, match="routing_groups"):
    moe_ffn(routing_groups=2).init(jax.random.key(0), jnp.zeros((3, 2, WIDTH)), True)
  with pytest.raises(MoeConfigError, match="routing_groups"):
    moe_ffn(routing_groups=-1).init(jax.random.key(0), x, True)
  with pytest.raises(MoeConfigError, match="up_proj"):
    upcycle_ffns([{"gate_proj": {"kernel": jnp.zeros((2, 3))}}])


class _ScannedMoe(nn.Module):
  """Two MoE layers under nn.scan with residual connections, as the decoder stacks them."""
  dispatch: str

  @nn.compact
  def __call__(self, x):
    def body(layer, carry, _):
      y, stats = layer(carry, True)
      return carry + y, stats
    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
    return scan(moe_ffn(dispatch=self.dispatch, name="moe"), x, None)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_upcycled_scanned_layers(dispatch):
  rng = np.random.default_rng(0)
  def dense(scale):
    return {"gate_proj": {"kernel": (scale * rng.standard_normal((2, WIDTH, MLP))).astype(np.float32)},
            "up_proj": {"kernel": (scale * rng.standard_normal((2, WIDTH, MLP))).astype(np.float32)},
            "down_proj": {"kernel": (scale * rng.standard_normal((2, MLP, WIDTH))).astype(np.float32)}}
  stage3, stage2 = dense(0.3), dense(0.3)
  router = (0.5 * rng.standard_normal((2, WIDTH, 2))).astype(np.float32)
  moe = upcycle_ffns([stage3, stage2], router_kernel=router)
  assert moe["gate_proj"].shape == (2, 2, WIDTH, MLP)
  np.testing.assert_array_equal(moe["down_proj"][:, 0], stage3["down_proj"]["kernel"])
  np.testing.assert_array_equal(moe["up_proj"][:, 1], stage2["up_proj"]["kernel"])

  x = tokens(8, (2, 3, WIDTH))
  model = _ScannedMoe(dispatch)
  y, stats = jax.jit(model.apply)({"params": {"moe": moe}}, x)
  assert stats["aux_loss"].shape == (2,) and stats["tokens_per_expert"].shape == (2, 2)

  h = np.asarray(x.reshape(-1, WIDTH), np.float64)
  for layer in range(2):
    layer_params = {k: np.asarray(moe[k][layer]) for k in ("gate_proj", "up_proj", "down_proj")}
    gates = np_softmax(h @ router[layer])
    choice = gates.argmax(1)
    out = np.stack([np_expert(layer_params, e, h) for e in range(2)])
    h = h + gates[np.arange(len(h)), choice][:, None] * out[choice, np.arange(len(h))]
  np.testing.assert_allclose(np.asarray(y).reshape(-1, WIDTH), h, rtol=1e-4, atol=1e-5)

  with jax.set_mesh(sharding.make_mesh(dict(data=2, fsdp=2, expert=2))), \
       nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    y_ep, _ = jax.jit(lambda p, x: model.apply({"params": {"moe": p}}, x))(moe, x)
  np.testing.assert_allclose(y_ep, y, rtol=1e-5, atol=1e-6)


def test_upcycle_default_router_is_uniform():
  rng = np.random.default_rng(1)
  ffn = {n: {"kernel": rng.standard_normal(s)} for n, s in
         (("gate_proj", (WIDTH, MLP)), ("up_proj", (WIDTH, MLP)), ("down_proj", (MLP, WIDTH)))}
  moe = upcycle_ffns([ffn, ffn])
  np.testing.assert_array_equal(moe["router"]["kernel"], np.zeros((WIDTH, 2)))
  x = tokens(9, (1, 4, WIDTH))
  y, stats = jax.jit(moe_ffn().apply, static_argnums=2)({"params": moe}, x, True)
  # Equal gates: every token picks expert 0 (first maximum) with probability 1/2.
  np.testing.assert_array_equal(stats["tokens_per_expert"], [4, 0])
  want = 0.5 * np_expert({k: v["kernel"][None] for k, v in ffn.items()}, 0,
                         np.asarray(x[0], np.float64))
  np.testing.assert_allclose(np.asarray(y[0]), want, rtol=1e-4, atol=1e-5)


# ---- split-expert inference layout ---------------------------------------------------------------

@pytest.mark.parametrize("dispatch,top_k,decode_max_tokens", [
    ("capacity", 1, 8), ("capacity", 2, 0), ("dropless", 1, 0), ("dropless", 2, 8)])
def test_split_experts_equal_stacked(dispatch, top_k, decode_max_tokens):
  stacked = moe_ffn(num_experts=3, top_k=top_k, dispatch=dispatch,
                    decode_max_tokens=decode_max_tokens)
  split = with_routing(stacked, split_experts=True)
  x = tokens(21, (2, 3, WIDTH))
  params = make_params(stacked, x)
  converted = split_expert_params(params)
  assert sorted(converted) == sorted(["router"] + [f"{n}_{e}" for n in ("gate_proj", "up_proj", "down_proj")
                                                   for e in range(3)])
  # The converted tree is exactly the split module's own param structure.
  shapes = nn.unbox(jax.eval_shape(lambda: split.init(jax.random.key(0), x, True)))["params"]
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda a: a.shape, converted)
  y_stacked, stats = stacked.apply({"params": params}, x, True)
  y_split, stats_split = split.apply({"params": converted}, x, True)
  np.testing.assert_allclose(y_split, y_stacked, rtol=1e-5, atol=1e-5 * np.abs(y_stacked).max())
  jax.tree.map(np.testing.assert_array_equal, stats, stats_split)


def test_split_experts_reject_lora_and_expert_parallel():
  with pytest.raises(MoeConfigError, match="merge"):
    split_expert_params({"router": {}, "gate_proj_lora_a": jnp.zeros((2, 4, 1))})
  x = tokens(2, (1, 1, WIDTH))
  lora = moe_ffn(split_experts=True, lora_rank=2, lora_targets=("gate",))
  with pytest.raises(MoeConfigError, match="LoRA"):
    lora.init(jax.random.key(0), x, True)
  module = moe_ffn(split_experts=True)
  params = nn.unbox(module.init(jax.random.key(0), x, True))
  mesh = sharding.make_mesh(dict(data=4, fsdp=1, expert=2, tensor=1))
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    with pytest.raises(MoeConfigError, match="expert-parallel"):
      jax.jit(lambda p, x: module.apply(p, x, True)).lower(params, x)
