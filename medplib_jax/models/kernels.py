"""Backend kernels: the ops whose best form differs between XLA:CPU and XLA:TPU / GPU.

The model files call these with a kernel-set name (`model.llm.kernels` in the config): "cpu", "gpu",
"tpu", or "auto" (the set of the backend that runs the trace). Every set computes the same math
(tests compare them); only the "cpu" set holds forms chosen by XLA:CPU measurements
(docs/benchmarks.md, "Why the kernels look the way they do"), so a CPU speed-up never changes
what a TPU or GPU compiles. The ahead-of-time memory check (`medplib train --compile-only`,
`make aot`) compiles the set of the target backend on CPU devices.

| op | cpu | gpu | tpu |
|---|---|---|---|
| `attention` (full causal, no cache) | heads-first einsums, written-out gradient | cuDNN in half precision, else as tpu | heads-first einsums, autodiff |
| `bernoulli` (dropout masks) | 16 threefry bits per element | `jax.random.bernoulli`'s bits | `jax.random.bernoulli`'s bits |
| `dropout` | the forward's mask saved for the backward | autodiff of `where` | autodiff of `where` |
| `flat_rows` (dense layers on [N, in]) | yes | no | no |
| `expert_ffn` (MoE expert buffers [G, E, C, D]) | dots on [E, G * C, D], experts leading | einsums over the buffers | einsums over the buffers |
"""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

KERNEL_SETS = ("auto", "cpu", "gpu", "tpu")


def resolve(kernels: str) -> str:
  """"auto" -> the running backend's set; any other name is checked and returned."""
  if kernels not in KERNEL_SETS:
    raise ValueError(f"model.kernels={kernels!r}; choose one of {KERNEL_SETS}")
  if kernels != "auto":
    return kernels
  backend = jax.default_backend()
  return backend if backend in ("cpu", "tpu") else "gpu"


def flat_rows(kernels: str) -> bool:
  """Whether dense layers run their dots on x flattened to [N, in] (XLA:CPU's weight gradient of
  a dot over [B, L, in] is slower than over the same rows as one matrix)."""
  return resolve(kernels) == "cpu"


# --- attention ------------------------------------------------------------------------------------

def attention(q, k, v, mask, kernels: str):
  """Full-sequence softmax attention, scores and softmax in float32, scaled after the product
  (HF); a query row with no visible key averages uniformly instead of giving NaN.

  q [B, L, H, Hd]; k, v [B, L, K, Hd] (H = K * groups); mask [B, L, L] bool -> [B, L, H, Hd].
  gpu in half precision: cuDNN flash attention. Otherwise contractions over [B, H, L, Hd]
  (grouped k / v heads repeated to H, as HF `repeat_kv`): autodiff on tpu / gpu, a written-out
  gradient on cpu (`_softmax_attention`).
  """
  kernels = resolve(kernels)
  if kernels == "gpu" and jnp.dtype(q.dtype) in (jnp.bfloat16, jnp.float16):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
  groups = q.shape[2] // k.shape[2]
  if groups > 1:
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  q, k, v = (nn.with_logical_constraint(jnp.swapaxes(t, 1, 2),
                                        ("batch", "act_heads", "length", "act_kv"))
             for t in (q, k, v))
  if kernels == "cpu":
    return jnp.swapaxes(_softmax_attention(q, k, v, mask), 1, 2)
  probs = jax.nn.softmax(_masked_scores(q, k, mask), axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum("bhls,bhsd->bhld", probs, v), 1, 2)


def _masked_scores(q, k, mask):
  """Scaled float32 scores of q [B, H, L, Hd] against k [B, H, S, Hd], float32 min where `mask`
  [B, L, S] is False -> [B, H, L, S]."""
  scores = jnp.einsum("bhld,bhsd->bhls", q, k, preferred_element_type=jnp.float32)
  return jnp.where(mask[:, None], scores * (q.shape[-1] ** -0.5), jnp.finfo(jnp.float32).min)


@jax.custom_vjp
def _softmax_attention(q, k, v, mask):
  """softmax(q k^T / sqrt(Hd), masked) v: q [B, H, L, Hd]; k, v [B, H, S, Hd] -> [B, H, L, Hd].

  The gradient keeps q, k, v, the output and two numbers per row and recomputes the
  probabilities; it takes the softmax term from rowsum(dO * O) (as FlashAttention does) and
  contracts every product over the operands' minor axis (XLA:CPU is slow on the others).
  """
  return _softmax_attention_fwd(q, k, v, mask)[0]


def _softmax_attention_fwd(q, k, v, mask):
  scores = _masked_scores(q, k, mask)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  unnormalised = jnp.exp(scores - row_max)
  row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
  out = jnp.einsum("bhls,bhsd->bhld", (unnormalised / row_sum).astype(v.dtype), v)
  return out, (q, k, v, mask, row_max, row_sum, out)


def _softmax_attention_bwd(residuals, g):
  q, k, v, mask, row_max, row_sum, out = residuals
  probs = jnp.exp(_masked_scores(q, k, mask) - row_max) / row_sum
  t = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
  dv = t(jnp.einsum("bhdl,bhls->bhds", t(g), probs.astype(g.dtype)))
  dprobs = jnp.einsum("bhld,bhsd->bhls", g, v, preferred_element_type=jnp.float32)
  row_dot = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  dscores = jnp.where(mask[:, None], probs * (dprobs - row_dot), 0.0) * (q.shape[-1] ** -0.5)
  dq = jnp.einsum("bhls,bhsd->bhld", dscores.astype(k.dtype), k)
  dk = t(jnp.einsum("bhdl,bhls->bhds", t(q), dscores.astype(q.dtype)))
  return dq, dk, dv, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


# --- dropout --------------------------------------------------------------------------------------

_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k0, k1, x0, x1):
  """The Threefry-2x32 hash (20 rounds) of counters (x0, x1) under key (k0, k1), all uint32,
  unrolled into elementwise ops (jax's own lowering is a rolled loop XLA:CPU does not vectorise)."""
  ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for block in range(5):
    for r in _THREEFRY_ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
    x0 = x0 + ks[(block + 1) % 3]
    x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def _linear_index(grid):
  """uint32 [*grid]: each element's row-major index, from per-axis iotas (so every axis of the
  result stays shardable: each shard computes its own slice)."""
  strides = np.cumprod((1,) + tuple(grid)[:0:-1])[::-1]
  return sum(jax.lax.broadcasted_iota(jnp.uint32, grid, axis) * np.uint32(stride)
             for axis, stride in enumerate(strides))


def bernoulli(key, p: float, shape, kernels: str):
  """A Bernoulli(p) bool mask of `shape`, hashed with Threefry-2x32 in written-out elementwise
  ops on counters from per-axis iotas, so each shard hashes only its own slice.

  gpu / tpu: `jax.random.bernoulli(key, p, shape)` bit for bit (partitionable threefry: 32 bits
  per element, the hash of its row-major index), written out so that the memory check compiled
  on CPU sees the ops a TPU compiles.
  cpu: 16 bits per element, a quarter of the hashes. For shape [..., D] and q = ceil(D / 4),
  the hash of counter (0, index of (..., j) in the [..., q] grid) gives the four 16-bit words
  of columns j, q + j, 2q + j and 3q + j of that row, each compared with round(p * 2**16).
  Other key kinds, 0-d shapes and 2**32 hashes or more use jax.random.bernoulli.
  """
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  shape = tuple(shape)
  cpu = resolve(kernels) == "cpu"
  grid = shape[:-1] + (-(-shape[-1] // 4),) if cpu and shape else shape
  if (not shape or str(jax.random.key_impl(key)) != "threefry2x32"
      or int(np.prod(grid)) >= 2 ** 32 or not jax.config.jax_threefry_partitionable):
    return jax.random.bernoulli(key, p, shape)
  data = jax.random.key_data(key)
  counter = _linear_index(grid)
  hi, lo = _threefry2x32(data[0], data[1], jnp.zeros_like(counter), counter)
  if not cpu:
    # jax.random.uniform's float is mantissa / 2**23 (the top 23 bits); u < p <=> mantissa < p * 2**23.
    threshold = np.uint32(min(np.ceil(np.float64(np.float32(p)) * 2.0 ** 23), 2 ** 23))
    return ((hi ^ lo) >> np.uint32(9)) < threshold
  words = jnp.concatenate([hi >> np.uint32(16), hi & np.uint32(0xFFFF),
                           lo >> np.uint32(16), lo & np.uint32(0xFFFF)], axis=-1)
  threshold = np.uint32(int(round(float(p) * 2 ** 16)))
  return words[..., :shape[-1]] < threshold


def dropout(x, rate: float, key, kernels: str):
  """Inverted dropout as flax `nn.Dropout` scales it: x / (1 - rate) where kept, 0 elsewhere;
  the keep mask is `bernoulli(key, 1 - rate, x.shape, kernels)`. key None or rate 0: x unchanged."""
  if key is None or rate == 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep = bernoulli(key, 1.0 - rate, x.shape, kernels)
  if resolve(kernels) == "cpu":
    return _keep_scaled(x, keep, 1.0 - rate)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _keep_scaled(x, keep, keep_prob: float):
  """where(keep, x / keep_prob, 0), its gradient reading the mask the forward saved (XLA:CPU
  otherwise fuses the mask's hash into every consumer, forward and backward alike)."""
  return jnp.where(keep, x / keep_prob, 0.0).astype(x.dtype)


def _keep_scaled_fwd(x, keep, keep_prob):
  keep = jax.lax.optimization_barrier(keep)  # one materialised mask for both passes
  return _keep_scaled(x, keep, keep_prob), keep


def _keep_scaled_bwd(keep_prob, keep, g):
  return jnp.where(keep, g / keep_prob, 0.0).astype(g.dtype), None


_keep_scaled.defvjp(_keep_scaled_fwd, _keep_scaled_bwd)


# --- MoE expert buffers ---------------------------------------------------------------------------

def expert_matmul(h, w, kernels: str):
  """Expert buffers h [..., E, N, in] @ expert weights w [E, in, out] -> [..., E, N, out].

  cpu: h must be [E, N, in], one dot with the expert axis leading on both operands (XLA:CPU runs
  a dot whose batch axis is not the leading one several times slower).
  """
  if resolve(kernels) == "cpu":
    return jax.lax.dot_general(h, w, (((2,), (1,)), ((0,), (0,))))
  return jnp.einsum("...ecd,edf->...ecf", h, w)


def expert_ffn(ffn, buffers, group_axis, kernels: str):
  """The experts' FFN on dispatched buffers [G, E, C, D] -> [G, E, C, D].

  `ffn(h, matmul)` computes the FFN on h, `matmul(h, w)` applying the expert weights w
  [E, in, out] along h's expert axis; `group_axis` is the groups' logical axis ("batch" or None).
  gpu / tpu: h is the buffers as they are. cpu: h is [E, G * C, D], each expert's rows of all
  groups in one block (group-major, so the rows stay on the batch shards), for `expert_matmul`.
  """
  matmul = partial(expert_matmul, kernels=kernels)
  if resolve(kernels) != "cpu":
    axes = (group_axis, "act_exp", None, "act_embed")
    out = ffn(nn.with_logical_constraint(buffers, axes), matmul)
    return nn.with_logical_constraint(out, axes)
  groups, experts, rows, width = buffers.shape
  axes = ("act_exp", group_axis, "act_embed")
  h = jnp.swapaxes(buffers, 0, 1).reshape(experts, groups * rows, width)
  out = nn.with_logical_constraint(ffn(nn.with_logical_constraint(h, axes), matmul), axes)
  return jnp.swapaxes(out.reshape(experts, groups, rows, -1), 0, 1)
