"""Mixture-of-Experts SwiGLU feed-forward (stage 4) with DeepSpeed `TopKGate` routing.

y = sum over a token's top-k experts e of combine_e * down_e(silu(x @ gate_e) * (x @ up_e)), with
the experts' weights stacked on a leading expert axis (`gate_proj` [E, D, F]) and the gates
softmax(x @ router) in float32 (`route`). Two dispatch modes (`moe.dispatch`):

* ``capacity`` (the reference): expert e keeps at most C = `expert_capacity` of its assignments,
  first choices before second ones, by random priority in training (DeepSpeed's random token
  selection) or else by position; a dropped assignment adds 0 (the residual carries the token).
  Kept tokens are scattered into buffers [E, C, D], run through the experts and gathered back.
* ``dropless``: assignments sorted by expert through one grouped matmul (`jax.lax.ragged_dot`).

Routing groups (`moe.routing_groups`; DeepSpeed's per-rank gate): the batch is cut into G blocks
of sequences, each routed with its own capacity as a separate call would be, so the buffers are
[G, E, C, D] with G on the batch shards. G = 1 routes the whole batch, G = 0 takes one group per
batch shard of the mesh. Groups are blocks of the batch, not of the mesh: a fixed G gives the
same numbers on every layout.

Expert parallelism: with a mesh `expert` axis > 1 the experts are split over it inside
`jax.shard_map` (capacity: DeepSpeed's two all-to-alls; dropless: each device runs its own experts
on the tokens it holds, then a sum over the axis).

Decode (at most `decode_max_tokens` tokens, no expert axis): each expert runs under a `lax.cond`
taken only when a token is routed to it, so a step reads only the routed experts' weights. `moe.split_experts` is
the inference layout (`gate_proj_0`, ... [D, F]; `split_expert_params`), whose weights a step
reads where they lie instead of slicing them from the stack; it has no LoRA and no expert
parallelism, and a prefill re-stacks it once.

How the expert buffers meet the weights in the dots is the kernel set's (`kernels.expert_ffn`).
"""

import math
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.sharding import PartitionSpec as P

from medplib_jax.models import kernels as kernel_sets
from medplib_jax.models.lora import TARGET_MODULES
from medplib_jax.sharding import batch_shards, mesh_axis_sizes

DISPATCH_MODES = ("capacity", "dropless")
LORA_TARGETS = ("gate", "up", "down")
_PROJ_OF_TARGET = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# Axes over which the expert-parallel path splits tokens; `tensor` also splits them, so no device
# repeats another's expert work.
_TOKEN_AXES = ("data", "fsdp", "expert", "tensor")

# nn.Linear's default (kaiming-uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_expert_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2,
                                                out_axis=-1, batch_axis=(0,))


class MoeConfigError(ValueError):
  """An MoE configuration or upcycling input that cannot work."""


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int) -> int:
  """Tokens one expert may take: ceil(tokens / experts * factor * k), at least min_capacity.

  Computed in float32 as DeepSpeed's `_capacity` does (top-2 gating doubles the factor).
  """
  capacity = int(np.ceil(np.float32(num_tokens / num_experts) * np.float32(capacity_factor * top_k)))
  return max(capacity, int(min_capacity))


class Routing(NamedTuple):
  """Routing decisions for T tokens, k choices each (float arrays are float32)."""
  expert_index: jax.Array      # [T, k] int32, choice 0 is the most probable expert
  rank: jax.Array              # [T, k] int32, priority of the assignment among its expert's
  kept: jax.Array              # [T, k] bool, False where the expert was over capacity
  combine_weight: jax.Array    # [T, k] gate probability applied to the expert output (0 if dropped)
  order: jax.Array             # [k*T] choice-major assignment ids sorted by (expert, rank)
  tokens_per_expert: jax.Array  # [E] int32 routed assignments before dropping
  aux_loss: jax.Array          # [] GShard/Switch load-balancing loss
  dropped_fraction: jax.Array  # [] dropped assignments / all assignments


def route(logits: jax.Array, *, top_k: int, capacity: int | None,
          priority_noise: jax.Array | None = None) -> Routing:
  """DeepSpeed TopKGate on router logits [T, E] (float32).

  gates = softmax(logits); the k most probable experts per token; aux loss =
  E * sum_e mean_t(gates[:, e]) * fraction of first choices on e (before dropping).
  Within an expert all first choices outrank all second choices (DeepSpeed's top-2 buffer
  layout); inside a choice, tokens rank by descending `priority_noise` [T, k] (random token
  selection) or, without noise, by position. An assignment is kept when its rank < capacity
  (`capacity=None`: keep all). Top-1 combines with the raw gate probability, top-2 with the kept
  probabilities renormalised to sum 1 (both as DeepSpeed).
  """
  num_tokens, num_experts = logits.shape
  gates = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top_gates, expert_index = jax.lax.top_k(gates, top_k)
  first_choice = jax.nn.one_hot(expert_index[:, 0], num_experts, dtype=jnp.float32)
  aux_loss = num_experts * jnp.sum(gates.mean(axis=0) * first_choice.mean(axis=0))

  # Assignments in choice-major order: id a = choice * T + token.
  assign_expert = expert_index.T.reshape(-1)
  assign_choice = jnp.repeat(jnp.arange(top_k, dtype=jnp.int32), num_tokens)
  if priority_noise is None:
    within_choice = jnp.tile(jnp.arange(num_tokens, dtype=jnp.int32), top_k)
  else:
    within_choice = -priority_noise.T.reshape(-1)
  order = jnp.lexsort((within_choice, assign_choice, assign_expert))
  tokens_per_expert = jnp.zeros((num_experts,), jnp.int32).at[assign_expert].add(1)
  group_start = jnp.cumsum(tokens_per_expert) - tokens_per_expert
  rank_sorted = jnp.arange(top_k * num_tokens, dtype=jnp.int32) - group_start[assign_expert[order]]
  rank = jnp.zeros((top_k * num_tokens,), jnp.int32).at[order].set(rank_sorted)
  rank = rank.reshape(top_k, num_tokens).T

  kept = jnp.ones_like(rank, bool) if capacity is None else rank < capacity
  combine_weight = jnp.where(kept, top_gates, 0.0)
  if top_k > 1:
    denom = jnp.maximum(combine_weight.sum(-1, keepdims=True), jnp.finfo(jnp.float32).eps)
    combine_weight = combine_weight / denom
  dropped_fraction = jnp.mean(jnp.logical_not(kept), dtype=jnp.float32)
  return Routing(expert_index.astype(jnp.int32), rank, kept, combine_weight, order,
                 tokens_per_expert, aux_loss, dropped_fraction)


def _swiglu_experts(params, h, matmul, *, lora_scale, lora_dropout, dropout_key, dtype, kernels):
  """The experts' SwiGLU FFN on dispatched tokens; `matmul(h, w)` applies the expert weights.

  `params` holds this device's experts (`gate_proj` [E, D, F] ... and LoRA siblings); LoRA adds
  lora_scale * ((dropout(h) @ A) @ B) to each targeted projection.
  """
  def project(name, inp, index):
    out = matmul(inp, params[name].astype(dtype))
    if name + "_lora_a" in params:
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
      low = matmul(kernel_sets.dropout(inp, lora_dropout, key, kernels),
                   params[name + "_lora_a"].astype(dtype))
      out = out + lora_scale * matmul(low, params[name + "_lora_b"].astype(dtype))
    return out

  hidden = nn.silu(project("gate_proj", h, 0)) * project("up_proj", h, 1)
  return project("down_proj", hidden, 2)


def _dispatch(x, expert_index, slot, kept, num_experts, capacity):
  """Capacity dispatch: tokens [T, D] -> (expert buffers [E, C, D], rows [T, k]).

  slot [T, k] is each assignment's row in its expert's buffer (< C where kept); `rows` is its
  row in the flattened [E * C] buffer, E * C (past the end) where dropped.
  """
  rows = jnp.where(kept, expert_index * capacity + slot, num_experts * capacity)  # dump row last
  tokens = jnp.broadcast_to(x[:, None, :], rows.shape + x.shape[-1:])
  buffer = jnp.zeros((num_experts * capacity + 1, x.shape[-1]), x.dtype)
  buffer = buffer.at[rows.reshape(-1)].set(tokens.reshape(-1, x.shape[-1]))
  return buffer[:-1].reshape(num_experts, capacity, -1), rows


def _combine(out, rows, weight):
  """Expert outputs [E, C, D] -> tokens [T, D]: the combine-weighted sum of each token's
  assignments (a dropped one has weight 0, its clamped row is never used)."""
  out = out.reshape(-1, out.shape[-1])
  gathered = out[jnp.minimum(rows, out.shape[0] - 1)]  # [T, k, D]
  return jnp.einsum("tk,tkd->td", weight.astype(out.dtype), gathered)


class MoeFeedForward(nn.Module):
  """Top-k MoE SwiGLU FFN: x [B, L, D] -> (y [B, L, D], stats), built like `llama.Mlp`.

  config: the llm config (width D, mlp_dim F, kernels). moe_config: num_experts E, top_k,
  dispatch, capacity_factor_train / _eval, min_capacity, random_token_selection, routing_groups,
  split_experts, expert_axis. lora_config: rank r, alpha, dropout, targets (only gate / up / down
  apply here), or None.
  Params: router/kernel [D, E]; gate_proj, up_proj [E, D, F]; down_proj [E, F, D]; with LoRA on a
  target, `<proj>_lora_a` [E, in, r] and `<proj>_lora_b` [E, r, out] (zeros).
  stats: aux_loss [] (mean over groups, unscaled: the trainer multiplies `moe.aux_loss_coef`),
  tokens_per_expert [E] (routed before dropping, summed over groups), dropped_fraction [].
  RNG streams when not deterministic: 'router' (random token selection), 'dropout' (LoRA).
  decode_max_tokens: calls with at most this many tokens take the decode path (0: none do).
  """
  config: Any
  moe_config: Any
  lora_config: Any = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  decode_max_tokens: int = 8

  @property
  def _lora_targets(self) -> tuple:
    """The expert projections' LoRA targets; () without LoRA."""
    lora = self.lora_config
    if lora is None or not lora.rank:
      return ()
    return tuple(t for t in lora.targets if t in LORA_TARGETS)

  @property
  def _lora_rank(self) -> int:
    return int(self.lora_config.rank) if self._lora_targets else 0

  def _check(self):
    moe = self.moe_config
    if moe.dispatch not in DISPATCH_MODES:
      raise MoeConfigError(f"moe.dispatch={moe.dispatch!r}; choose one of {DISPATCH_MODES}")
    if moe.top_k not in (1, 2) or moe.top_k > moe.num_experts:
      raise MoeConfigError(f"moe.top_k={moe.top_k} with {moe.num_experts} experts; "
                           "top_k must be 1 or 2 and at most num_experts")
    if moe.routing_groups < 0:
      raise MoeConfigError(f"moe.routing_groups={moe.routing_groups}; use a positive group count "
                           "or 0 for one group per batch shard")
    if moe.split_experts and self._lora_rank:
      raise MoeConfigError("split_experts is an inference layout without LoRA on the experts; "
                           "merge the adapters first (lora.merge_lora)")
    if self.lora_config is not None and self.lora_config.rank:
      unknown = set(self.lora_config.targets) - set(TARGET_MODULES)
      if unknown:
        raise MoeConfigError(f"lora targets {sorted(unknown)} are unknown; "
                             f"expert targets are {LORA_TARGETS}")

  def _num_groups(self, batch):
    groups = self.moe_config.routing_groups
    if groups == 0:
      # A batch smaller than the shard count (e.g. decode on a data-parallel mesh) or not a
      # multiple of it gets the largest group count that divides it.
      return math.gcd(batch, batch_shards())
    if batch % groups:
      raise MoeConfigError(f"moe.routing_groups={groups} does not divide the batch "
                           f"of {batch} sequences")
    return groups

  def _expert_params(self):
    """{name: [E, ...]} when stacked; a list of E dicts {name: [...]} when split."""
    e, d, f = self.moe_config.num_experts, self.config.width, self.config.mlp_dim
    r = self._lora_rank
    shapes = {"gate_proj": ((e, d, f), ("exp", "embed", "mlp")),
              "up_proj": ((e, d, f), ("exp", "embed", "mlp")),
              "down_proj": ((e, f, d), ("exp", "mlp", "embed"))}
    if self.moe_config.split_experts:
      return [{name: self.param(f"{name}_{i}", nn.with_logical_partitioning(
          lambda key, shape, dtype: _expert_init(key, (1,) + shape, dtype)[0], names[1:]),
          shape[1:], self.param_dtype) for name, (shape, names) in shapes.items()}
              for i in range(e)]
    params = {}
    for name, (shape, names) in shapes.items():
      params[name] = self.param(name, nn.with_logical_partitioning(_expert_init, names), shape,
                                self.param_dtype)
    for target in self._lora_targets:
      name = _PROJ_OF_TARGET[target]
      (_, d_in, d_out), (exp, in_name, out_name) = shapes[name]
      params[name + "_lora_a"] = self.param(
          name + "_lora_a", nn.with_logical_partitioning(_expert_init, (exp, in_name, None)),
          (e, d_in, r), self.param_dtype)
      params[name + "_lora_b"] = self.param(
          name + "_lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (exp, None, out_name)),
          (e, r, d_out), self.param_dtype)
    return params

  @nn.compact
  def __call__(self, x, deterministic: bool):
    self._check()
    moe = self.moe_config
    batch, length, width = x.shape
    groups = self._num_groups(batch)
    group_tokens = batch // groups * length
    # The group axis carries the batch sharding only when the batch shards divide it evenly.
    group_axis = "batch" if groups % batch_shards() == 0 else None
    tokens = nn.with_logical_constraint(x.reshape(groups, group_tokens, width),
                                        (group_axis, None, "act_embed"))
    router_init = nn.with_logical_partitioning(_torch_linear_init, ("embed", None))
    logits = nn.Dense(moe.num_experts, use_bias=False, dtype=jnp.float32,
                      param_dtype=self.param_dtype, kernel_init=router_init,
                      name="router")(tokens.astype(jnp.float32))  # [G, S, E]
    params = self._expert_params()

    capacity, noise = None, None
    if moe.dispatch == "capacity":
      factor = moe.capacity_factor_eval if deterministic else moe.capacity_factor_train
      capacity = expert_capacity(group_tokens, moe.num_experts, moe.top_k, factor,
                                 moe.min_capacity)
      if moe.random_token_selection and not deterministic:
        keys = jax.random.split(self.make_rng("router"), groups)  # one selection key per group
        noise = jax.vmap(lambda k: jax.random.uniform(k, (group_tokens, moe.top_k)))(keys)
    routing = jax.vmap(lambda lg, nz: route(lg, top_k=moe.top_k, capacity=capacity,
                                            priority_noise=nz))(logits, noise)

    lora_rank = self._lora_rank
    lora_alpha = float(self.lora_config.alpha) if lora_rank else 16.0
    lora_dropout = float(self.lora_config.dropout) if lora_rank else 0.0
    dropout_key = None
    if not deterministic and lora_dropout > 0.0:
      dropout_key = self.make_rng("dropout")
    ffn = dict(lora_scale=lora_alpha / max(lora_rank, 1), lora_dropout=lora_dropout,
               dtype=self.dtype, kernels=self.config.kernels)
    tokens = tokens.astype(self.dtype)
    flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731  [G, S, ...] -> [G * S, ...]
    expert_parallel = mesh_axis_sizes().get(moe.expert_axis, 1)
    if moe.split_experts and expert_parallel > 1:
      raise MoeConfigError(f"split_experts cannot run expert-parallel (mesh axis "
                           f"{moe.expert_axis!r} has size {expert_parallel}); use stacked experts")
    decode = batch * length <= self.decode_max_tokens and expert_parallel == 1
    if moe.split_experts and not decode:  # the buffer paths want the stack: one per call (prefill)
      params = {name: jnp.stack([p[name] for p in params]) for name in params[0]}
    if decode:
      y = self._used_experts_only(flat(tokens), flat(routing.expert_index), flat(routing.kept),
                                  flat(routing.combine_weight), params, dropout_key, ffn)
    elif moe.dispatch == "capacity" and expert_parallel > 1:
      y = self._capacity_expert_parallel(flat(tokens), flat(routing.expert_index),
                                         flat(routing.kept), flat(routing.combine_weight), params,
                                         capacity, dropout_key, ffn)
    elif moe.dispatch == "capacity":
      y = self._capacity_local(tokens, routing, params, capacity, group_axis, dropout_key, ffn)
    elif expert_parallel > 1:
      y = self._dropless_expert_parallel(flat(tokens), flat(routing.expert_index),
                                         flat(routing.combine_weight), params, dropout_key, ffn)
    else:
      y = self._dropless_local(tokens, routing, params, dropout_key, ffn)

    y = nn.with_logical_constraint(y.reshape(batch, length, width).astype(self.dtype),
                                   ("batch", "length", "act_embed"))
    stats = {"aux_loss": routing.aux_loss.mean(), "tokens_per_expert": routing.tokens_per_expert.sum(0),
             "dropped_fraction": routing.dropped_fraction.mean()}
    return y, stats

  # -- few tokens (decode) ---------------------------------------------------------------------

  def _used_experts_only(self, tokens, expert_index, kept, weight, params, dropout_key, ffn):
    """tokens [T, D], routing arrays [T, k] -> [T, D]: expert e runs on all T tokens under a
    `lax.cond` taken only when a kept assignment is routed to it, each token scaled by its
    combine weight for e (0 where not routed there or dropped): the buffer paths' numbers."""
    y = jnp.zeros(tokens.shape, self.dtype)
    for e in range(self.moe_config.num_experts):
      routed = (expert_index == e) & kept
      scale = jnp.sum(jnp.where(routed, weight, 0.0), axis=-1)  # [T]
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, e)

      def run(x, e=e, key=key):
        # The expert's slice is taken inside the branch: a skipped expert's weights are not read.
        mine = params[e] if self.moe_config.split_experts else {n: w[e] for n, w in params.items()}
        return _swiglu_experts(mine, x, jnp.matmul, dropout_key=key, **ffn).astype(self.dtype)

      out = jax.lax.cond(jnp.any(routed), run, jnp.zeros_like, tokens)
      y = y + scale[:, None].astype(self.dtype) * out
    return y

  # -- capacity mode ---------------------------------------------------------------------------

  def _capacity_local(self, tokens, routing, params, capacity, group_axis, dropout_key, ffn):
    """Per group: scatter into [E, C, D] buffers ([G, E, C, D] in all, the groups on the batch
    shards), the experts on all groups' buffers at once, gather back per group."""
    buffer_rows = min(capacity, tokens.shape[1])  # an expert never receives more than S tokens
    dispatch = partial(_dispatch, num_experts=self.moe_config.num_experts, capacity=buffer_rows)
    buffers, rows = jax.vmap(dispatch)(tokens, routing.expert_index, routing.rank, routing.kept)
    experts = lambda h, matmul: _swiglu_experts(  # noqa: E731
        params, h, matmul, dropout_key=dropout_key, **ffn)
    out = kernel_sets.expert_ffn(experts, buffers, group_axis, self.config.kernels)
    return jax.vmap(_combine)(out, rows, routing.combine_weight)

  def _capacity_expert_parallel(self, tokens, expert_index, kept, weight, params, capacity,
                                dropout_key, ffn):
    """DeepSpeed's exchange: each device fills [E, C_local, D] buffers with its kept tokens,
    all-to-all over the expert axis gives each device its experts' tokens from every peer, the
    experts run, and a second all-to-all returns the outputs. Keep/drop was decided per routing
    group before; tokens [T, D] and the routing arrays [T, k] are the groups flattened."""
    sizes = mesh_axis_sizes()
    num_experts, axis = self.moe_config.num_experts, self.moe_config.expert_axis
    ep = sizes[axis]
    if num_experts % ep:
      raise MoeConfigError(f"{num_experts} experts cannot be split over a mesh axis "
                           f"{axis!r} of size {ep}")
    token_axes = tuple(a for a in _TOKEN_AXES if sizes.get(a, 1) > 1) or (axis,)
    if axis not in token_axes:
      token_axes = token_axes + (axis,)
    shards = int(np.prod([sizes[a] for a in token_axes]))
    num_tokens = tokens.shape[0]
    tokens, expert_index, kept, weight = _pad_tokens(shards, tokens, expert_index, kept, weight)
    local_tokens = tokens.shape[0] // shards
    buffer_rows = min(capacity, local_tokens)
    matmul = partial(kernel_sets.expert_matmul, kernels=self.config.kernels)

    def per_device(x, e_idx, keep, w, p, key):
      # Row of each kept assignment in the local buffer: order among this device's kept ones.
      onehot = jax.nn.one_hot(e_idx.T.reshape(-1), num_experts, dtype=jnp.int32)
      onehot = onehot * keep.T.reshape(-1, 1)
      slot = (jnp.cumsum(onehot, axis=0) - 1) * onehot
      slot = slot.sum(-1).reshape(e_idx.shape[1], -1).T
      if key is not None:
        key = jax.random.fold_in(key, _linear_axis_index(token_axes))
      h, rows = _dispatch(x, e_idx, slot, keep, num_experts, buffer_rows)
      h = jax.lax.all_to_all(h, axis, 0, 1, tiled=True)  # [E / ep, ep * C_local, D]
      h = _swiglu_experts(p, h, matmul, dropout_key=key, **ffn)
      h = jax.lax.all_to_all(h, axis, 1, 0, tiled=True)
      return _combine(h, rows, w)

    param_specs = {name: P(axis) for name in params}
    y = jax.shard_map(
        per_device,
        in_specs=(P(token_axes), P(token_axes), P(token_axes), P(token_axes), param_specs, P()),
        out_specs=P(token_axes))(tokens, expert_index, kept, weight, params, dropout_key)
    return y[:num_tokens]

  # -- dropless mode ---------------------------------------------------------------------------

  def _dropless_local(self, tokens, routing, params, dropout_key, ffn):
    """Assignments of every group sorted by expert through one grouped matmul (`ragged_dot`).

    Nothing is dropped, so groups only shape the stats and the sort spans all tokens of the call
    (`ragged_dot` has no batched form over groups); sharded training wants capacity dispatch or
    an expert axis, which keep tokens per device."""
    groups, group_tokens, width = tokens.shape
    top_k, num_tokens = self.moe_config.top_k, groups * group_tokens
    # Choice-major assignment ids a = choice * T + token over the flattened groups.
    assign_expert = routing.expert_index.reshape(num_tokens, top_k).T.reshape(-1)
    order = jnp.argsort(assign_expert, stable=True)
    sorted_tokens = tokens.reshape(num_tokens, width)[order % num_tokens]
    out = _swiglu_experts(
        params, sorted_tokens,
        lambda h, w: jax.lax.ragged_dot(h, w, routing.tokens_per_expert.sum(0)),
        dropout_key=dropout_key, **ffn)
    per_assignment = jnp.zeros_like(out).at[order].set(out).reshape(top_k, num_tokens, -1)
    weight = routing.combine_weight.reshape(num_tokens, top_k)
    return jnp.einsum("tk,ktd->td", weight.astype(out.dtype), per_assignment)

  def _dropless_expert_parallel(self, tokens, expert_index, weight, params, dropout_key, ffn):
    """Tokens are replicated over the expert axis (the `batch` rule does not use it), so each
    device runs its own experts on every token of its shard routed there; a sum over the expert
    axis assembles the output. Ragged groups need no fixed-size exchange this way."""
    sizes = mesh_axis_sizes()
    num_experts, axis = self.moe_config.num_experts, self.moe_config.expert_axis
    ep = sizes[axis]
    if num_experts % ep:
      raise MoeConfigError(f"{num_experts} experts cannot be split over a mesh axis "
                           f"{axis!r} of size {ep}")
    token_axes = tuple(a for a in _TOKEN_AXES if a != axis and sizes.get(a, 1) > 1)
    shards = int(np.prod([sizes[a] for a in token_axes]))
    num_tokens = tokens.shape[0]
    tokens, expert_index, weight = _pad_tokens(shards, tokens, expert_index, weight)
    local_experts, top_k = num_experts // ep, self.moe_config.top_k

    def per_device(x, e_idx, w, p, key):
      num_local = x.shape[0]
      first = jax.lax.axis_index(axis) * local_experts
      local_e = e_idx.T.reshape(-1) - first
      mine = (local_e >= 0) & (local_e < local_experts)
      order = jnp.argsort(jnp.where(mine, local_e, local_experts), stable=True)
      group_sizes = jnp.zeros((local_experts,), jnp.int32).at[jnp.where(mine, local_e, 0)].add(
          mine.astype(jnp.int32))
      if key is not None:
        key = jax.random.fold_in(key, _linear_axis_index(token_axes + (axis,)))
      out = _swiglu_experts(p, x[order % num_local],
                            lambda h, wt: jax.lax.ragged_dot(h, wt, group_sizes),
                            dropout_key=key, **ffn)  # rows of other experts come out as 0
      out = jnp.zeros_like(out).at[order].set(out).reshape(top_k, num_local, -1)
      y = jnp.einsum("tk,ktd->td", w.astype(out.dtype), out)
      return jax.lax.psum(y, axis)

    spec = P(token_axes) if token_axes else P()
    param_specs = {name: P(axis) for name in params}
    y = jax.shard_map(per_device, in_specs=(spec, spec, spec, param_specs, P()),
                      out_specs=spec)(tokens, expert_index, weight, params, dropout_key)
    return y[:num_tokens]


def _pad_tokens(shards, *arrays):
  """Pads the token axis (0) of each array to a multiple of `shards` with zeros: a padded token
  has combine weight 0 (and is dropped where `kept` is among the arrays)."""
  pad = -arrays[0].shape[0] % shards
  if not pad:
    return arrays
  return tuple(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays)


def _linear_axis_index(axes):
  index = 0
  for a in axes:
    index = index * jax.lax.axis_size(a) + jax.lax.axis_index(a)
  return index


def split_expert_params(mlp: dict) -> dict:
  """Stacked MoeFeedForward params (`gate_proj` [..., E, D, F] ...) -> the split layout
  (`gate_proj_0` [..., D, F], ...) of `split_experts=True`; the router is kept. A leading scanned
  layer axis is allowed. LoRA must be merged first."""
  leftovers = sorted(k for k in mlp if "_lora_" in k)
  if leftovers:
    raise MoeConfigError(f"split_expert_params: merge LoRA first (found {leftovers})")
  out = {"router": mlp["router"]}
  for name in ("gate_proj", "up_proj", "down_proj"):
    stacked = mlp[name]
    for e in range(stacked.shape[-3]):
      out[f"{name}_{e}"] = stacked[..., e, :, :]
  return out


def upcycle_ffns(dense_ffns: list[dict], router_kernel=None) -> dict:
  """MoeFeedForward params from K dense FFNs: expert i <- dense_ffns[i].

  Each dense FFN is {'gate_proj': {'kernel': [D, F]}, 'up_proj': {'kernel': [D, F]},
  'down_proj': {'kernel': [F, D]}}, optionally with a leading scanned-layer axis ([Lyr, D, F]);
  merge LoRA into them first. Returns {'router': {'kernel': [D, K]}, 'gate_proj': [K, D, F], ...}
  with the expert axis after the layer axis ([Lyr, K, D, F] when scanned). The router is zeros
  (uniform routing) unless `router_kernel` is given. Stage 4: dense_ffns = [stage-3 FFN,
  stage-2 FFN].
  """
  if not dense_ffns:
    raise MoeConfigError("upcycle_ffns needs at least one dense FFN")
  out = {}
  for name in ("gate_proj", "up_proj", "down_proj"):
    kernels = []
    for i, ffn in enumerate(dense_ffns):
      try:
        kernel = meta.unbox(ffn[name]["kernel"])
      except (KeyError, TypeError) as err:
        raise MoeConfigError(f"dense FFN {i} has no {name}/kernel (keys: {sorted(ffn)})") from err
      if kernel.shape != meta.unbox(dense_ffns[0][name]["kernel"]).shape:
        raise MoeConfigError(f"dense FFN {i} {name}/kernel has shape {kernel.shape}, FFN 0 has "
                             f"{meta.unbox(dense_ffns[0][name]['kernel']).shape}")
      kernels.append(kernel)
    out[name] = jnp.stack(kernels, axis=-3)
  width = out["gate_proj"].shape[-2]
  expected = out["gate_proj"].shape[:-3] + (width, len(dense_ffns))
  if router_kernel is None:
    router_kernel = jnp.zeros(expected, out["gate_proj"].dtype)
  router_kernel = meta.unbox(router_kernel)
  if router_kernel.shape != expected:
    raise MoeConfigError(f"router kernel has shape {router_kernel.shape}, expected {expected}")
  out["router"] = {"kernel": router_kernel}
  return out
