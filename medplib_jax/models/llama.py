"""LLaMA decoder (HF `LlamaForCausalLM` numerics) with an explicit KV cache, MoE FFNs and LoRA.

Pre-norm blocks: x + attn(rmsnorm(x)), then x + ffn(rmsnorm(x)); rotary embeddings on the split
halves (HF `rotate_half`), real tokens' positions counted from the attention mask so left- and
right-padded batches see the same positions as unpadded ones, padding positioned as the reference
(`positions_from_mask`); grouped-query attention when num_kv_heads <
num_heads; SwiGLU FFN (or `MoeFeedForward` when num_experts > 1); final RMSNorm; untied LM head.

KV cache (a plain pytree, see `init_cache`): the model is called on a chunk of L new tokens
(the whole prompt for prefill, L = 1 for decode) which are written at cache slots
[index, index + L) of every row; attention sees every valid slot at or before its own.

Layer layouts: `scan_layers=True` stacks the layers' params on a leading axis and runs them under
`nn.scan` (compile time independent of depth, remat; what training uses). `scan_layers=False`
unrolls them (params `layers_N`), so a decode step reads each layer's weights and cache where they
lie instead of slicing them from a stack; `inference_layout` converts a trained model.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from medplib_jax.models import kernels as kernel_sets
from medplib_jax.models.lora import LoraDense, check_targets
from medplib_jax.models.moe import MoeFeedForward, split_expert_params

_POLICIES = jax.checkpoint_policies
# llm.remat_policy -> what a rematerialised layer keeps for its backward pass. The named
# activations (checkpoint_name below) let a policy keep chosen projections, as maxtext's do.
REMAT_POLICIES = {
    "none": None,  # no remat: autodiff keeps what it needs
    "nothing_saveable": _POLICIES.nothing_saveable,
    "everything_saveable": _POLICIES.everything_saveable,
    "dots_saveable": _POLICIES.dots_saveable,
    "dots_with_no_batch_dims_saveable": _POLICIES.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": _POLICIES.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_out_proj": _POLICIES.save_only_these_names("out_proj"),
    "save_qkv_and_out_proj": _POLICIES.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "out_proj"),
    "save_mlp_hidden": _POLICIES.save_only_these_names("mlp_hidden"),
}


class LlamaConfigError(ValueError):
  """A config field the decoder cannot use."""


def init_cache(config, batch_size: int, max_length: int, dtype=jnp.float32) -> dict:
  """An empty KV cache for `max_length` slots.

  Returns dict(k, v [layers, B, num_kv_heads, S, head_dim] in `dtype` (heads before slots, so
  attention reads it without a transpose), mask [B, S] bool (slot holds a real token), index []
  int32 (next slot to write, shared by all rows), lengths [B] int32 (real tokens so far per row;
  the next token's rotary position)).
  """
  shape = (config.depth, batch_size, config.num_kv_heads, max_length, config.head_dim)
  return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
              mask=jnp.zeros((batch_size, max_length), bool), index=jnp.zeros((), jnp.int32),
              lengths=jnp.zeros((batch_size,), jnp.int32))


def unstack_layers(params: dict, depth: int) -> dict:
  """A `scan_layers=True` param tree (`layers/...` stacked on axis 0) -> the unrolled layout
  (`layers_0/...`, `layers_1/...`) of the same model with `scan_layers=False`."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for n in range(depth):
    out[f"layers_{n}"] = jax.tree.map(lambda a, n=n: a[n], params["layers"])
  return out


def inference_layout(llm_config, moe_config, params: dict):
  """A trained decoder (LoRA merged) in its decoding layout: layers unrolled and MoE experts split
  (`moe.split_expert_params`), so a decode step reads every weight in place, not sliced from a
  stack. Returns (llm_config, moe_config, params); parts already converted are left as they are."""
  llm_config, moe_config = llm_config.copy_and_resolve_references(), moe_config.copy_and_resolve_references()
  if llm_config.scan_layers:
    params = unstack_layers(params, llm_config.depth)
    llm_config.scan_layers = False
  if moe_config.num_experts > 1 and not moe_config.split_experts:
    params = dict(params)
    for n in range(llm_config.depth):
      layer = params[f"layers_{n}"]
      params[f"layers_{n}"] = dict(layer, mlp=split_expert_params(layer["mlp"]))
    moe_config.split_experts = True
  return llm_config, moe_config, params


def positions_from_mask(attention_mask, offset=None):
  """Rotary positions [B, L] (plus `offset` [B]) as the reference's HF LLaMA gives them.

  A real token's position is the count of real tokens before it. Right padding keeps counting
  (HF's `arange` positions in training); left padding gets 1 (HF `generate`'s masked_fill).
  Padding rows are masked out as keys, but their states reach the MoE router, whose capacity
  counts them (SPEC.md), so their positions are the reference's too.
  """
  mask = attention_mask.astype(bool)
  count = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
  slots = jnp.arange(mask.shape[-1])[None, :]
  first = jnp.argmax(mask, axis=-1)[:, None]  # first real token (0 for an all-padding row)
  pos = jnp.where(mask, count, jnp.where(slots < first, 1, slots - first))
  if offset is not None:
    pos = pos + offset[:, None]
  return pos


def rotary(x, positions, theta: float):
  """HF rotary embedding on the split halves. x [B, L, N, Hd], positions [B, L] -> [B, L, N, Hd]."""
  hd = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Hd/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, the statistics in float32 (as HF). x [..., D] -> [..., D]."""
  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


def _lora_kwargs(lora_config, target: str, kernels: str) -> dict:
  """LoraDense settings for one target: rank 0 unless the target is selected."""
  if lora_config is None or not lora_config.rank or target not in tuple(lora_config.targets):
    return dict(rank=0, kernels=kernels)
  return dict(rank=int(lora_config.rank), alpha=float(lora_config.alpha),
              dropout=float(lora_config.dropout), kernels=kernels)


class Attention(nn.Module):
  """Multi-head (grouped-query) self-attention with rotary positions and an optional KV cache."""
  config: Any
  lora_config: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache, cache_index, deterministic):
    """x [B, L, D], positions [B, L], mask [B, L, S] bool (query may see key slot),
    cache_index [] (slot of x[:, 0]), layer_cache one of
      None (no cache: full causal attention),
      dict(k, v [B, K, S, Hd]): this layer's cache (scanned layers),
      dict(k, v [layers, B, K, S, Hd], layer=int): the whole stack, written in place at `layer`.

    Returns (out [B, L, D], the updated cache in the form given, or None).
    """
    cfg = self.config
    b, l, _ = x.shape
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def proj(name, target, features, axes):
      return LoraDense(features, kernel_axes=axes, dtype=self.dtype, param_dtype=self.param_dtype,
                       name=name, **_lora_kwargs(self.lora_config, target, cfg.kernels))

    q = proj("q_proj", "q", h * hd, ("embed", "heads"))(x, deterministic).reshape(b, l, h, hd)
    k = proj("k_proj", "k", kvh * hd, ("embed", "heads"))(x, deterministic).reshape(b, l, kvh, hd)
    v = proj("v_proj", "v", kvh * hd, ("embed", "heads"))(x, deterministic).reshape(b, l, kvh, hd)
    q = checkpoint_name(q, "query_proj")
    k, v = checkpoint_name(k, "key_proj"), checkpoint_name(v, "value_proj")
    q = nn.with_logical_constraint(rotary(q, positions, cfg.rope_theta),
                                   ("batch", "length", "act_heads", "act_kv"))
    k = rotary(k, positions, cfg.rope_theta)
    if layer_cache is None:
      k = nn.with_logical_constraint(k, ("batch", "length", "act_heads", "act_kv"))
      v = nn.with_logical_constraint(v, ("batch", "length", "act_heads", "act_kv"))
      out = kernel_sets.attention(q, k, v, mask, cfg.kernels)
      new_cache = None
    else:
      keys, values, new_cache = _write_cache(layer_cache, k, v, cache_index)
      out = _cached_attention(q, keys.astype(self.dtype), values.astype(self.dtype), mask)
    out = out.reshape(b, l, h * hd)
    out = proj("o_proj", "o", cfg.width, ("heads", "embed"))(out, deterministic)
    return checkpoint_name(out, "out_proj"), new_cache


def _write_cache(layer_cache, k, v, cache_index):
  """Writes the chunk's k, v [B, L, K, Hd] at slots [cache_index, cache_index + L).

  Returns (keys, values [B, K, S, Hd] of this layer, the updated cache in the form given).
  """
  layer = layer_cache.get("layer")
  k, v = (jnp.swapaxes(t, 1, 2).astype(layer_cache["k"].dtype) for t in (k, v))
  if layer is None:
    start = (0, 0, cache_index, 0)
    keys = jax.lax.dynamic_update_slice(layer_cache["k"], k, start)
    values = jax.lax.dynamic_update_slice(layer_cache["v"], v, start)
    return keys, values, dict(k=keys, v=values)
  start = (layer, 0, 0, cache_index, 0)
  stack_k = jax.lax.dynamic_update_slice(layer_cache["k"], k[None], start)
  stack_v = jax.lax.dynamic_update_slice(layer_cache["v"], v[None], start)
  return stack_k[layer], stack_v[layer], dict(k=stack_k, v=stack_v, layer=layer)


def _cached_attention(q, keys, values, mask):
  """Softmax attention of a chunk against the cache, in the cache's heads-first layout.

  q [B, L, H, Hd]; keys, values [B, K, S, Hd] (H = K * groups); mask [B, L, S] -> [B, L, H, Hd].
  Scores and softmax in float32; a query with no visible slot gets a uniform average (as
  `jax.nn.dot_product_attention`), never NaN.
  """
  b, l, h, hd = q.shape
  kvh = keys.shape[1]
  q = q.reshape(b, l, kvh, h // kvh, hd)
  scores = jnp.einsum("blkgd,bksd->bkgls", q, keys, preferred_element_type=jnp.float32)
  scores = scores * (hd ** -0.5)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
  out = jnp.einsum("bkgls,bksd->blkgd", probs, values)
  return out.reshape(b, l, h, hd)


class Mlp(nn.Module):
  """SwiGLU FFN: down(silu(gate(x)) * up(x)). x [B, L, D] -> [B, L, D]."""
  config: Any
  lora_config: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic):
    cfg = self.config

    def proj(name, target, features, axes):
      return LoraDense(features, kernel_axes=axes, dtype=self.dtype, param_dtype=self.param_dtype,
                       name=name, **_lora_kwargs(self.lora_config, target, cfg.kernels))

    gate = proj("gate_proj", "gate", cfg.mlp_dim, ("embed", "mlp"))(x, deterministic)
    up = proj("up_proj", "up", cfg.mlp_dim, ("embed", "mlp"))(x, deterministic)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    hidden = checkpoint_name(hidden, "mlp_hidden")
    return proj("down_proj", "down", cfg.width, ("mlp", "embed"))(hidden, deterministic)


class DecoderLayer(nn.Module):
  """One pre-norm block. Called as (hidden, layer_cache, positions, mask, cache_index,
  deterministic) -> (hidden, (new_layer_cache, moe_stats)) so it can be scanned."""
  config: Any
  moe_config: Any
  lora_config: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, layer_cache, positions, mask, cache_index, deterministic):
    cfg, moe = self.config, self.moe_config
    norm = lambda name: RMSNorm(cfg.norm_eps, self.dtype, self.param_dtype, name=name)  # noqa: E731
    attn_out, new_cache = Attention(cfg, self.lora_config, self.dtype, self.param_dtype,
                                    name="self_attn")(norm("input_layernorm")(hidden), positions,
                                                      mask, layer_cache, cache_index, deterministic)
    hidden = hidden + attn_out
    x = norm("post_attention_layernorm")(hidden)
    if moe is not None and moe.num_experts > 1:
      y, stats = MoeFeedForward(cfg, moe, self.lora_config, self.dtype, self.param_dtype,
                                name="mlp")(x, deterministic)
    else:
      y = Mlp(cfg, self.lora_config, self.dtype, self.param_dtype, name="mlp")(x, deterministic)
      stats = {}
    hidden = nn.with_logical_constraint(hidden + y, ("batch", "length", "act_embed"))
    return hidden, (new_cache, stats)


class LlamaForCausalLM(nn.Module):
  """LLaMA decoder + LM head.

  config: llm_config fields (vocab_size, width, depth, num_heads, num_kv_heads, head_dim,
  mlp_dim, norm_eps, rope_theta, max_length, scan_layers, remat_policy, kernels (the backend
  kernel set, models/kernels.py)); moe_config: moe_config fields (num_experts 1 = dense
  SwiGLU); lora_config: (rank, alpha, dropout, targets) or None.
  """
  config: Any
  moe_config: Any = None
  lora_config: Any = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    if cfg.num_heads % cfg.num_kv_heads:
      raise LlamaConfigError(f"llm.num_heads={cfg.num_heads} is not a multiple of "
                             f"llm.num_kv_heads={cfg.num_kv_heads}")
    if cfg.remat_policy not in REMAT_POLICIES:
      raise LlamaConfigError(f"llm.remat_policy={cfg.remat_policy!r}; choose one of "
                             f"{tuple(REMAT_POLICIES)}")
    if self.lora_config is not None and self.lora_config.rank:
      check_targets(self.lora_config.targets)
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    block = DecoderLayer
    if cfg.remat_policy != "none":
      # deterministic, the last argument, is a Python bool: static under remat.
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy],
                       prevent_cse=not cfg.scan_layers, static_argnums=(6,))
    layer_args = (cfg, self.moe_config, self.lora_config, self.dtype, self.param_dtype)
    if cfg.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True,
                                                          "router": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.depth, metadata_params={nn.PARTITION_NAME: "layers"})(*layer_args)
    else:
      self.layers = [block(*layer_args) for _ in range(cfg.depth)]
    self.norm = RMSNorm(cfg.norm_eps, self.dtype, self.param_dtype)
    self.lm_head = LoraDense(cfg.vocab_size, kernel_axes=("embed", "vocab"), dtype=self.dtype,
                             param_dtype=self.param_dtype, kernels=cfg.kernels)

  def embed(self, input_ids):
    """Token embeddings: input_ids [B, L] int -> [B, L, D] in the compute dtype."""
    return self.embed_tokens(input_ids)

  def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, deterministic=True,
               cache=None, decode_positions=None):
    """Runs the decoder on ids or embeddings.

    input_ids [B, L] int or inputs_embeds [B, L, D] (exactly one); attention_mask [B, L] bool
    (True = real token; default all True), any padding side.
    Without `cache`: a full causal forward (training, scoring).
    With `cache` (from `init_cache` or a previous call): the L tokens go to slots
    [cache.index, cache.index + L); padded tokens of the chunk are never attended to.
    decode_positions [B, L] int overrides the rotary positions (default: counted from the mask,
    continuing from cache.lengths).

    Returns dict(logits [B, L, V] float32, hidden [B, L, D] (after the final norm),
    moe_aux_loss [] (sum over layers), moe_stats (per-layer means; {} when dense), and `cache`
    (the updated cache) when a cache was given).
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("LlamaForCausalLM: pass exactly one of input_ids or inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    b, l = x.shape[:2]
    if attention_mask is None:
      attention_mask = jnp.ones((b, l), bool)
    attention_mask = attention_mask.astype(bool)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

    if cache is None:
      positions = positions_from_mask(attention_mask)
      causal = jnp.tril(jnp.ones((l, l), bool))
      mask = causal[None] & attention_mask[:, None, :]
      layer_caches, index = None, jnp.zeros((), jnp.int32)
    else:
      index = cache["index"]
      positions = positions_from_mask(attention_mask, cache["lengths"])
      slot_mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (0, index))
      slots = jnp.arange(slot_mask.shape[1])
      mask = slot_mask[:, None, :] & (slots[None, None, :] <= index + jnp.arange(l)[None, :, None])
      layer_caches = dict(k=cache["k"], v=cache["v"])
    if decode_positions is not None:
      positions = decode_positions

    if self.config.scan_layers:
      x, (new_layer_caches, stats) = self.layers(x, layer_caches, positions, mask, index,
                                                 deterministic)
    else:
      per_layer = []
      for i, layer in enumerate(self.layers):
        # The whole stacked cache goes to every layer, which writes its slice in place.
        layer_cache = None if layer_caches is None else dict(layer_caches, layer=i)
        x, (layer_caches_out, layer_stats) = layer(x, layer_cache, positions, mask, index,
                                                   deterministic)
        if layer_caches is not None:
          layer_caches = dict(k=layer_caches_out["k"], v=layer_caches_out["v"])
        per_layer.append(layer_stats)
      new_layer_caches = layer_caches
      stats = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)

    hidden = nn.with_logical_constraint(self.norm(x), ("batch", "length", "act_embed"))
    logits = self.lm_head(hidden).astype(jnp.float32)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
    stats = dict(stats)
    aux = stats.pop("aux_loss", None)
    out = dict(logits=logits, hidden=hidden,
               moe_aux_loss=jnp.zeros((), jnp.float32) if aux is None else jnp.sum(aux),
               moe_stats={k: jnp.mean(v, axis=0) for k, v in stats.items()})
    if cache is not None:
      out["cache"] = dict(k=new_layer_caches["k"], v=new_layer_caches["v"], mask=slot_mask,
                          index=index + l,
                          lengths=cache["lengths"] + jnp.sum(attention_mask, -1, dtype=jnp.int32))
    return out
