"""LoRA, pure functional: a Dense with low-rank adapters, merge / unmerge, and the trainable mask.

Convention (shared by every module of the project): a weight `X` of shape [..., in, out] gets
siblings `X_lora_a` [..., in, r] and `X_lora_b` [..., r, out] (B starts at zero, so a fresh
adapter changes nothing). The effective weight is `X + (alpha / r) * X_lora_a @ X_lora_b`,
batched over any leading axes (scanned layers, experts); the forward pass computes
`x @ X + (alpha / r) * ((dropout(x) @ A) @ B)` instead, so the merged weight is never built.

Parameter paths are the '/'-joined dict keys of a param tree, e.g.
`llm/layers/self_attn/q_proj/kernel_lora_a` (no `params/` prefix when the tree passed in is the
contents of the `params` collection).
"""

import re
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medplib_jax.models import kernels as kernel_sets

LORA_A = "_lora_a"
LORA_B = "_lora_b"
# LoRA target name -> the Dense / expert-weight module names it applies to.
TARGET_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                  "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class LoraError(ValueError):
  """Bad LoRA settings or a param tree that does not fit them."""


def check_targets(targets: Sequence[str]) -> tuple[str, ...]:
  unknown = [t for t in targets if t not in TARGET_MODULES]
  if unknown:
    raise LoraError(f"unknown LoRA targets {unknown}; choose from {sorted(TARGET_MODULES)}")
  return tuple(targets)


def lora_a_init(key, shape, dtype=jnp.float32):
  """Kaiming-uniform-like init of A [..., in, r]: U(-1/sqrt(in), 1/sqrt(in)) as PEFT does."""
  bound = 1.0 / jnp.sqrt(shape[-2])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoraDense(nn.Module):
  """y = x @ kernel (+ bias) + (alpha / rank) * ((dropout(x) @ kernel_lora_a) @ kernel_lora_b).

  x [..., in] -> y [..., features]. rank 0 is a plain Dense (only `kernel`, `bias`).
  `kernel_axes` are the logical names of the kernel's (in, out) axes; A is (in, None), B
  (None, out). Dropout uses the 'dropout' rng stream when `deterministic` is False.
  With the cpu kernel set the dots run on x flattened to [N, in] (`kernels.flat_rows`).
  """
  features: int
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  use_bias: bool = False
  kernel_axes: tuple = (None, None)
  kernel_init: object = nn.initializers.normal(0.02)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    in_axis, out_axis = self.kernel_axes
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), self.param_dtype)
    lead = x.shape[:-1]
    x = x.astype(self.dtype)
    if kernel_sets.flat_rows(self.kernels):
      x = x.reshape(-1, x.shape[-1])
    y = jnp.dot(x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.rank > 0:
      a = self.param("kernel" + LORA_A, nn.with_logical_partitioning(lora_a_init, (in_axis, None)),
                     (x.shape[-1], self.rank), self.param_dtype)
      b = self.param("kernel" + LORA_B,
                     nn.with_logical_partitioning(nn.initializers.zeros, (None, out_axis)),
                     (self.rank, self.features), self.param_dtype)
      key = None if deterministic or self.dropout == 0.0 else self.make_rng("dropout")
      xd = kernel_sets.dropout(x, self.dropout, key, self.kernels)
      y = y + (self.alpha / self.rank) * jnp.dot(jnp.dot(xd, a.astype(self.dtype)),
                                                 b.astype(self.dtype))
    return y.reshape(lead + (self.features,))


# --- functional tools over param trees -----------------------------------------------------------

def _is_dict(x) -> bool:
  return isinstance(x, Mapping)


def _lora_delta(a, b, alpha_over_rank):
  """(alpha / r) * A @ B, batched over leading axes: [..., in, r] @ [..., r, out] -> [..., in, out]."""
  return alpha_over_rank * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))


def merge_lora(params, alpha_over_rank: float):
  """Folds every `X_lora_a/X_lora_b` pair into `X`; returns a tree without `*_lora_*` leaves.

  params: nested dicts of plain (unboxed) arrays. alpha_over_rank: the LoRA scale alpha / r.
  """
  def walk(tree, path):
    if not _is_dict(tree):
      return tree
    out = {}
    for name, value in tree.items():
      if name.endswith(LORA_A) or name.endswith(LORA_B):
        base = name[:-len(LORA_A)]
        if base not in tree:
          raise LoraError(f"{path}/{name}: LoRA adapter without its weight {base!r}")
        continue
      if _is_dict(value):
        out[name] = walk(value, f"{path}/{name}")
      elif name + LORA_A in tree:
        if name + LORA_B not in tree:
          raise LoraError(f"{path}/{name}: has {name + LORA_A} but no {name + LORA_B}")
        delta = _lora_delta(tree[name + LORA_A], tree[name + LORA_B], alpha_over_rank)
        out[name] = (value.astype(jnp.float32) + delta).astype(value.dtype)
      else:
        out[name] = value
    return out
  return walk(params, "")


def split_lora(params):
  """Splits a tree into (base params without adapters, adapters only); both nested dicts."""
  def walk(tree):
    base, lora = {}, {}
    for name, value in tree.items():
      if _is_dict(value):
        b, l = walk(value)
        base[name] = b
        if l:
          lora[name] = l
      elif name.endswith(LORA_A) or name.endswith(LORA_B):
        lora[name] = value
      else:
        base[name] = value
    return base, lora
  return walk(params)


def unmerge_lora(merged_params, lora_params, alpha_over_rank: float):
  """Inverse of `merge_lora`: subtracts each adapter's delta and puts the adapters back.

  lora_params: a tree holding only the `*_lora_*` leaves (e.g. `split_lora(params)[1]`), at the
  same paths as in the original tree.
  """
  def walk(tree, lora, path):
    out = dict(tree)
    for name, value in lora.items():
      if _is_dict(value):
        if name not in tree:
          raise LoraError(f"{path}/{name}: adapters for a missing module")
        out[name] = walk(tree[name], value, f"{path}/{name}")
      elif name.endswith(LORA_A):
        base = name[:-len(LORA_A)]
        if base not in tree or base + LORA_B not in lora:
          raise LoraError(f"{path}/{name}: no weight {base!r} or no {base + LORA_B}")
        delta = _lora_delta(value, lora[base + LORA_B], alpha_over_rank)
        out[base] = (tree[base].astype(jnp.float32) - delta).astype(tree[base].dtype)
        out[name] = value
      else:
        out[name] = value
    return out
  return walk(merged_params, lora_params, "")


def param_path(key_path) -> str:
  """'/'-joined dict keys of a jax tree path (attribute keys such as boxes' `.value` skipped)."""
  names = []
  for k in key_path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      names.append(str(k.idx))
  return "/".join(names)


def trainable_mask(params, trainable_regexes: Sequence[str] = (), train_lora: bool = True):
  """A pytree of bools over `params`: True where a param is trained.

  A param is trainable when any regex `re.search`-matches its path, or (with `train_lora`) when
  it is a LoRA adapter (`*_lora_a` / `*_lora_b`). Usable as an optax mask, e.g.
  `optax.masked(opt, mask)` or `optax.multi_transform({True: opt, False: optax.set_to_zero()}, mask)`.
  """
  patterns = [re.compile(r) for r in trainable_regexes]

  def one(key_path, _):
    path = param_path(key_path)
    leaf = path.rsplit("/", 1)[-1]
    if train_lora and (leaf.endswith(LORA_A) or leaf.endswith(LORA_B)):
      return True
    return any(p.search(path) for p in patterns)
  return jax.tree_util.tree_map_with_path(one, params)
