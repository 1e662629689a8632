"""Batched autoregressive generation on a fixed-size KV cache, fully jitted with static shapes.

One prefill call writes the prompts into a cache of `prompt_len + max_new_tokens` slots, then a
`lax.while_loop` runs one-token decode steps until every row has produced `eos_id` or
`max_new_tokens` tokens. Prompts may be left- or right-padded: positions and attention come from
the mask, and the first token is predicted from each row's last real prompt token. (Left padding
is what transformers' `generate` expects; with it both give the same greedy tokens.)
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from medplib_jax.models.llama import init_cache


class GenerateOutput(NamedTuple):
  """tokens [B, T] int32: generated ids, `pad_id` after a row's eos (the eos itself is kept).
  hidden [B, T, D]: post-final-norm hidden state of the position each token was predicted from
  (for token 0 the last real prompt position, for token t > 0 the position of token t - 1);
  zeros after a row's eos. A `<SEG>` at t is decoded from hidden[:, t].
  lengths [B] int32: generated tokens per row, eos included.
  """
  tokens: jax.Array
  hidden: jax.Array
  lengths: jax.Array


class _ByIdentity:
  """Makes an (unhashable, ConfigDict-holding) module usable as a static jit argument."""

  def __init__(self, obj):
    self.obj = obj

  def __hash__(self):
    return id(self.obj)

  def __eq__(self, other):
    return isinstance(other, _ByIdentity) and other.obj is self.obj


def top_p_filter(logits, top_p: float):
  """Keeps the smallest set of tokens whose probability mass reaches `top_p` (nucleus), the
  others set to -inf; the most likely token always stays. logits [B, V] -> [B, V]."""
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def _select(logits, key, temperature, top_p):
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    logits = top_p_filter(logits, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _generate(static_model, variables, input_ids, inputs_embeds, attention_mask, rng, *,
              max_new_tokens, eos_id, pad_id, temperature, top_p):
  model = static_model.obj
  b, prompt_len = attention_mask.shape
  cache = init_cache(model.config, b, prompt_len + max_new_tokens, model.dtype)
  out = model.apply(variables, input_ids=input_ids, inputs_embeds=inputs_embeds,
                    attention_mask=attention_mask, cache=cache)
  # The last real prompt slot of each row (prompt_len - 1 for left padding).
  last = prompt_len - 1 - jnp.argmax(attention_mask[:, ::-1], axis=1)
  logits = jnp.take_along_axis(out["logits"], last[:, None, None], axis=1)[:, 0]
  hidden_state = jnp.take_along_axis(out["hidden"], last[:, None, None], axis=1)[:, 0]
  rng, key = jax.random.split(rng)
  token = _select(logits, key, temperature, top_p)
  tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
  hidden = jnp.zeros((b, max_new_tokens, hidden_state.shape[-1]), hidden_state.dtype)
  hidden = hidden.at[:, 0].set(hidden_state)
  done = token == eos_id

  def cond(state):
    step, _, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, tokens, hidden, done, cache, rng = state
    previous = tokens[:, step - 1]
    # Finished rows still run (static shapes) but their tokens are never attended to.
    out = model.apply(variables, input_ids=previous[:, None], attention_mask=~done[:, None],
                      cache=cache)
    rng, key = jax.random.split(rng)
    token = _select(out["logits"][:, 0], key, temperature, top_p)
    token = jnp.where(done, pad_id, token)
    state_h = jnp.where(done[:, None], 0, out["hidden"][:, 0])
    tokens = tokens.at[:, step].set(token)
    hidden = hidden.at[:, step].set(state_h)
    return step + 1, tokens, hidden, done | (token == eos_id), out["cache"], rng

  _, tokens, hidden, _, _, _ = jax.lax.while_loop(
      cond, body, (jnp.ones((), jnp.int32), tokens, hidden, done, out["cache"], rng))
  is_eos = tokens == eos_id
  lengths = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
  return GenerateOutput(tokens, hidden, lengths.astype(jnp.int32))


_generate_jit = jax.jit(_generate, static_argnums=(0,), static_argnames=(
    "max_new_tokens", "eos_id", "pad_id", "temperature", "top_p"))


def generate(model, params, *, input_ids=None, inputs_embeds=None, attention_mask=None,
             max_new_tokens: int, eos_id: int, pad_id: int, rng=None, temperature: float = 0.0,
             top_p: float = 1.0) -> GenerateOutput:
  """Generates up to `max_new_tokens` tokens per prompt.

  model: a `LlamaForCausalLM`; params: its variables ({'params': ...}) or the params tree itself.
  input_ids [B, L] int or inputs_embeds [B, L, D] (the multimodal sequence); attention_mask
  [B, L] bool (default all True), left padding recommended (right padding also works).
  temperature 0 is greedy; otherwise softmax sampling at that temperature, restricted to the
  top-p nucleus when top_p < 1, with `rng` (a jax PRNG key) required.
  Compiles once per (model, shapes, max_new_tokens, eos_id, pad_id, temperature, top_p).
  """
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("generate: pass exactly one of input_ids or inputs_embeds")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0.0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
  if temperature > 0.0 and rng is None:
    raise ValueError("generate: sampling (temperature > 0) needs an rng key")
  prompt = input_ids if input_ids is not None else inputs_embeds
  if attention_mask is None:
    attention_mask = jnp.ones(prompt.shape[:2], bool)
  variables = params if "params" in params else {"params": params}
  return _generate_jit(_ByIdentity(model), variables, input_ids, inputs_embeds,
                       jnp.asarray(attention_mask, bool),
                       jax.random.key(0) if rng is None else rng,
                       max_new_tokens=int(max_new_tokens), eos_id=int(eos_id), pad_id=int(pad_id),
                       temperature=float(temperature), top_p=float(top_p))
