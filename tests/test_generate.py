"""KV-cache generation vs transformers' `generate` on the same tiny random LLaMA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import common
from medplib_jax.checkpoint.llama import load_llama
from medplib_jax.infer.generate import generate, top_p_filter
from medplib_jax.models.llama import LlamaForCausalLM, unstack_layers
from tests.test_llama import tiny_configs, tiny_hf_llama

torch.set_num_threads(1)
PAD = 0
MAX_NEW = 8


@pytest.fixture(scope="module", params=["scanned", "unrolled"])
def setup(request):
  """Both layer layouts: scanned (training) and unrolled via `unstack_layers` (inference)."""
  hf = tiny_hf_llama(seed=1)
  _, cfg = tiny_configs()
  params, _ = load_llama({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
  if request.param == "unrolled":
    params = unstack_layers(params, cfg.depth)
    cfg = cfg.copy_and_resolve_references()
    cfg.scan_layers = False
  model = LlamaForCausalLM(cfg, common.moe_config(1), None)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 97, size=n) for n in (6, 3, 5)]
  return hf, model, {"params": params}, prompts


def pad(prompts, side):
  width = max(len(p) for p in prompts)
  ids = np.full((len(prompts), width), PAD, np.int64)
  mask = np.zeros_like(ids, dtype=bool)
  for row, p in enumerate(prompts):
    sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
    ids[row, sl], mask[row, sl] = p, True
  return ids, mask


def hf_greedy(hf, ids, mask, eos_id, max_new=MAX_NEW):
  """New tokens of transformers' greedy generate, padded with PAD to max_new."""
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask, dtype=torch.long),
                      max_new_tokens=max_new, do_sample=False, eos_token_id=eos_id,
                      pad_token_id=PAD)
  new = out[:, ids.shape[1]:].numpy()
  return np.pad(new, ((0, 0), (0, max_new - new.shape[1])), constant_values=PAD)


def test_greedy_matches_transformers_generate_with_eos_stop(setup):
  hf, model, variables, prompts = setup
  ids, mask = pad(prompts, "left")
  free = hf_greedy(hf, ids, mask, eos_id=96, max_new=MAX_NEW)
  # Use a token row 0 produces at step 3 as eos, so rows stop at different steps.
  eos = int(free[0, 3])
  expected = hf_greedy(hf, ids, mask, eos_id=eos)
  out = generate(model, variables, input_ids=jnp.asarray(ids, jnp.int32),
                 attention_mask=jnp.asarray(mask), max_new_tokens=MAX_NEW, eos_id=eos, pad_id=PAD)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)
  for row in range(3):
    hits = np.flatnonzero(expected[row] == eos)
    assert int(out.lengths[row]) == (hits[0] + 1 if len(hits) else MAX_NEW)
  assert int(out.lengths[0]) <= 4


def test_hidden_is_the_state_each_token_was_predicted_from(setup):
  hf, model, variables, prompts = setup
  ids, mask = pad(prompts, "left")
  out = generate(model, variables, input_ids=jnp.asarray(ids, jnp.int32),
                 attention_mask=jnp.asarray(mask), max_new_tokens=MAX_NEW, eos_id=96, pad_id=PAD)
  tokens = np.asarray(out.tokens)
  assert np.all(np.asarray(out.lengths) == MAX_NEW) and not np.any(tokens == 96)
  full = np.concatenate([ids, tokens], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(tokens, bool)], axis=1)
  mask_t = torch.tensor(full_mask, dtype=torch.long)
  with torch.no_grad():
    ref = hf.model(input_ids=torch.tensor(full), attention_mask=mask_t,
                   position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0)).last_hidden_state.numpy()
  # Token t was predicted from sequence position L - 1 + t.
  width = ids.shape[1]
  np.testing.assert_allclose(np.asarray(out.hidden), ref[:, width - 1:width - 1 + MAX_NEW], atol=1e-4)


def test_right_padding_and_embeddings_give_the_unpadded_answers(setup):
  hf, model, variables, prompts = setup
  ids, mask = pad(prompts, "right")
  embeds = model.apply(variables, jnp.asarray(ids, jnp.int32), method=model.embed)
  out = generate(model, variables, inputs_embeds=embeds, attention_mask=jnp.asarray(mask),
                 max_new_tokens=MAX_NEW, eos_id=96, pad_id=PAD)
  for row, p in enumerate(prompts):
    alone = hf_greedy(hf, p[None], np.ones((1, len(p)), bool), eos_id=96)
    np.testing.assert_array_equal(np.asarray(out.tokens)[row], alone[0])


def test_top_p_filter_worked_example():
  # probs 0.5, 0.3, 0.15, 0.05 (ordered 2, 0, 3, 1): mass before = 0, 0.5, 0.8, 0.95.
  logits = jnp.log(jnp.array([[0.3, 0.05, 0.5, 0.15]]))
  kept = np.isfinite(np.asarray(top_p_filter(logits, 0.8)))
  np.testing.assert_array_equal(kept, [[True, False, True, False]])
  kept = np.isfinite(np.asarray(top_p_filter(logits, 0.81)))
  np.testing.assert_array_equal(kept, [[True, False, True, True]])
  np.testing.assert_array_equal(np.isfinite(np.asarray(top_p_filter(logits, 1e-6))),
                                [[False, False, True, False]])


def test_sampling(setup):
  _, model, variables, prompts = setup
  ids, mask = pad(prompts, "left")
  args = dict(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask),
              max_new_tokens=MAX_NEW, eos_id=96, pad_id=PAD)
  greedy = generate(model, variables, **args)
  # A vanishing nucleus keeps only the argmax: sampling becomes greedy.
  nucleus = generate(model, variables, rng=jax.random.key(3), temperature=1.0, top_p=1e-6, **args)
  np.testing.assert_array_equal(np.asarray(nucleus.tokens), np.asarray(greedy.tokens))
  a = generate(model, variables, rng=jax.random.key(5), temperature=1.5, **args)
  b = generate(model, variables, rng=jax.random.key(5), temperature=1.5, **args)
  c = generate(model, variables, rng=jax.random.key(6), temperature=1.5, **args)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  with pytest.raises(ValueError, match="rng"):
    generate(model, variables, temperature=1.0, **args)
