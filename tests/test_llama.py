"""LLaMA decoder vs transformers' LlamaForCausalLM on the same (random, tiny) weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from configs import common
from medplib_jax.checkpoint.llama import export_llama, load_llama, resize_vocab
from medplib_jax.checkpoint.torch_io import CheckpointError
from medplib_jax.models import kernels
from medplib_jax.models.llama import LlamaForCausalLM, init_cache, positions_from_mask

torch.set_num_threads(1)


def tiny_configs(scan_layers=True, remat_policy="none"):
  """(HF LlamaConfig kwargs, our llm_config) for the same tiny GQA model."""
  hf = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500.0,
            max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
  ours = ml_collections.ConfigDict(dict(
      vocab_size=97, width=64, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96,
      norm_eps=1e-6, rope_theta=500.0, max_length=128, scan_layers=scan_layers,
      remat_policy=remat_policy, kernels="auto"))
  return hf, ours


def tiny_hf_llama(seed=0):
  """A random transformers LlamaForCausalLM (fp32, eval mode) with non-trivial norm scales."""
  import transformers
  hf_kwargs, _ = tiny_configs()
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_kwargs)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def hf_model():
  return tiny_hf_llama()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_llama")
  hf_model.save_pretrained(path, max_shard_size="40KB")  # sharded safetensors + index json
  return str(path)


def padded_batch(rng, side):
  lengths = [9, 5, 7]
  ids = np.zeros((3, 9), np.int64)
  mask = np.zeros((3, 9), bool)
  for row, n in enumerate(lengths):
    tokens = rng.integers(3, 97, size=n)
    sl = slice(9 - n, 9) if side == "left" else slice(0, n)
    ids[row, sl] = tokens
    mask[row, sl] = True
  return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers_on_padded_batch(hf_model, hf_dir, side):
  _, cfg = tiny_configs()
  params, report = load_llama(hf_dir, cfg)
  assert report["unmapped"] == [] and report["missing"] == []
  ids, mask = padded_batch(np.random.default_rng(1), side)
  model = LlamaForCausalLM(cfg, common.moe_config(1), None)
  out = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask))

  mask_t = torch.tensor(mask, dtype=torch.long)
  # The reference's positions: training's HF forward counts every slot (right padding), HF
  # generate gives left padding 1.
  positions = None if side == "right" else (mask_t.cumsum(-1) - 1).masked_fill(mask_t == 0, 1)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(ids), attention_mask=mask_t, position_ids=positions)
  # Right padding: the padding rows too (they attend to the real tokens; the MoE router sees
  # them). Left padding rows attend to nothing and are compared by position below.
  rows = np.ones_like(mask) if side == "right" else mask
  np.testing.assert_allclose(np.asarray(out["logits"])[rows], ref.logits.numpy()[rows], atol=1e-4, rtol=1e-4)
  if side == "left":
    got = np.asarray(positions_from_mask(jnp.asarray(mask)))
    np.testing.assert_array_equal(got, positions.numpy())
  # Padded rows must also agree with each sequence run alone (no padding, plain positions).
  for row in range(3):
    alone = torch.tensor(ids[row][mask[row]])[None]
    with torch.no_grad():
      ref_row = hf_model(input_ids=alone).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(out["logits"])[row][mask[row]], ref_row, atol=1e-4, rtol=1e-4)


def test_hidden_is_post_norm_and_embeds_path_matches(hf_model, hf_dir):
  _, cfg = tiny_configs(scan_layers=False, remat_policy="nothing_saveable")
  params, _ = load_llama(hf_dir, cfg)
  ids, mask = padded_batch(np.random.default_rng(2), "left")
  model = LlamaForCausalLM(cfg, common.moe_config(1), None)
  variables = {"params": params}
  embeds = model.apply(variables, jnp.asarray(ids, jnp.int32), method=model.embed)
  out = model.apply(variables, inputs_embeds=embeds, attention_mask=jnp.asarray(mask))
  mask_t = torch.tensor(mask, dtype=torch.long)
  with torch.no_grad():
    ref = hf_model.model(input_ids=torch.tensor(ids), attention_mask=mask_t,
                         position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
  np.testing.assert_allclose(np.asarray(out["hidden"])[mask], ref.numpy()[mask], atol=1e-4, rtol=1e-4)


def test_cached_prefill_and_decode_match_full_forward(hf_dir):
  _, cfg = tiny_configs()
  params, _ = load_llama(hf_dir, cfg)
  ids, mask = padded_batch(np.random.default_rng(3), "left")
  model = LlamaForCausalLM(cfg, common.moe_config(1), None)
  v = {"params": params}
  ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask)
  full = model.apply(v, ids, attention_mask=mask)
  cache = init_cache(cfg, 3, 12)
  pre = model.apply(v, ids[:, :6], attention_mask=mask[:, :6], cache=cache)
  step = model.apply(v, ids[:, 6:7], attention_mask=mask[:, 6:7], cache=pre["cache"])
  rest = model.apply(v, ids[:, 7:], attention_mask=mask[:, 7:], cache=step["cache"])
  chunked = jnp.concatenate([pre["logits"], step["logits"], rest["logits"]], axis=1)
  np.testing.assert_allclose(np.asarray(chunked)[np.asarray(mask)],
                             np.asarray(full["logits"])[np.asarray(mask)], atol=1e-5)
  assert int(rest["cache"]["index"]) == 9
  np.testing.assert_array_equal(np.asarray(rest["cache"]["lengths"]), [9, 5, 7])


def test_bin_checkpoint_state_dict_and_vocab_resize(hf_model, tmp_path):
  _, cfg = tiny_configs()
  sd = hf_model.state_dict()
  torch.save(sd, tmp_path / "pytorch_model.bin")
  extra = {"model.mm_projector.0.weight": torch.zeros(2, 2)}
  torch.save({**sd, **extra}, tmp_path / "llava.bin")
  params, report = load_llama(str(tmp_path / "llava.bin"), cfg)
  assert report["unmapped"] == ["model.mm_projector.0.weight"]
  np.testing.assert_array_equal(params["layers"]["self_attn"]["k_proj"]["kernel"][1],
                                sd["model.layers.1.self_attn.k_proj.weight"].numpy().T)

  big = cfg.copy_and_resolve_references()
  big.vocab_size = 100
  with pytest.raises(CheckpointError, match="resize_vocab_to=100"):
    load_llama(str(tmp_path / "pytorch_model.bin"), big)
  params, report = load_llama({k: v for k, v in sd.items()}, big, resize_vocab_to=100)
  emb = params["embed_tokens"]["embedding"]
  old = sd["model.embed_tokens.weight"].numpy()
  assert emb.shape == (100, 64) and params["lm_head"]["kernel"].shape == (64, 100)
  np.testing.assert_allclose(emb[97:], np.repeat(old.mean(0, keepdims=True), 3, 0), atol=1e-7)
  np.testing.assert_allclose(params["lm_head"]["kernel"][:, 99],
                             sd["lm_head.weight"].numpy().mean(0), atol=1e-7)
  assert report["vocab_resized"] == (97, 100)
  with pytest.raises(CheckpointError, match="shrink"):
    resize_vocab(params, 50)


def test_medplib_moe_layout_round_trip(hf_model):
  _, cfg = tiny_configs()
  moe = common.moe_config(2)
  sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  rng = np.random.default_rng(0)
  for n in range(2):
    base = f"model.layers.{n}.mlp."
    moe_base = base + "deepspeed_moe."
    sd[moe_base + "gate.wg.weight"] = rng.normal(size=(2, 64)).astype(np.float32)
    for p in ("gate_proj", "up_proj", "down_proj"):
      w = sd.pop(f"{base}{p}.weight")
      sd[f"{moe_base}experts.deepspeed_experts.0.{p}.weight"] = w
      sd[f"{moe_base}experts.deepspeed_experts.1.{p}.weight"] = w * 2
  params, report = load_llama(sd, cfg, moe)
  assert report["unmapped"] == []
  mlp = params["layers"]["mlp"]
  assert mlp["router"]["kernel"].shape == (2, 64, 2)
  assert mlp["gate_proj"].shape == (2, 2, 64, 96) and mlp["down_proj"].shape == (2, 2, 96, 64)
  np.testing.assert_array_equal(mlp["down_proj"][1, 1],
                                sd["model.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts.1.down_proj.weight"].T)
  # The MoE model builds on these params, and export gives back every key unchanged.
  model = LlamaForCausalLM(cfg, moe, None)
  out = model.apply({"params": params}, jnp.ones((1, 4), jnp.int32))
  assert out["moe_stats"]["tokens_per_expert"].shape == (2,)
  exported = export_llama(params, cfg, moe)
  assert set(exported) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_missing_key_and_shape_mismatch_are_named(hf_model):
  _, cfg = tiny_configs()
  sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  del sd["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
    load_llama(sd, cfg)
  sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  sd["model.norm.weight"] = np.ones(63, np.float32)
  with pytest.raises(CheckpointError, match=r"model.norm.weight.*\(63,\).*\(64,\)"):
    load_llama(sd, cfg)


def test_param_tree_and_logical_axes():
  _, cfg = tiny_configs()
  model = LlamaForCausalLM(cfg, common.moe_config(1),
                           common.lora_config(rank=4, targets=("q", "v", "gate")))
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  specs = jax.tree.map(tuple, nn.get_partition_spec(variables))
  layers = specs["params"]["layers"]
  assert layers["self_attn"]["q_proj"]["kernel"] == ("layers", "embed", "heads")
  assert layers["self_attn"]["q_proj"]["kernel_lora_b"] == ("layers", None, "heads")
  assert "kernel_lora_a" not in layers["self_attn"]["k_proj"]
  assert layers["mlp"]["down_proj"]["kernel"] == ("layers", "mlp", "embed")
  assert specs["params"]["embed_tokens"]["embedding"] == ("vocab", "embed")
  assert specs["params"]["lm_head"]["kernel"] == ("embed", "vocab")


def test_sharded_forward_matches_single_device(hf_dir):
  """Under a (data 2, fsdp 2, tensor 2) mesh with the project's rules the numbers do not change."""
  from medplib_jax.sharding import logical_to_shardings, make_mesh
  _, cfg = tiny_configs(remat_policy="nothing_saveable")
  params, _ = load_llama(hf_dir, cfg)
  ids, mask = padded_batch(np.random.default_rng(4), "left")
  ids, mask = jnp.asarray(ids[:2], jnp.int32), jnp.asarray(mask[:2])
  model = LlamaForCausalLM(cfg, common.moe_config(1), None)
  expected = model.apply({"params": params}, ids, attention_mask=mask)["logits"]
  mesh = make_mesh(dict(data=2, fsdp=2, expert=1, tensor=2))
  abstract = jax.eval_shape(model.init, jax.random.key(0), ids)
  with jax.set_mesh(mesh), nn.logical_axis_rules(common.LOGICAL_AXIS_RULES):
    shardings = logical_to_shardings(abstract, mesh, common.LOGICAL_AXIS_RULES)["params"]
    placed = jax.tree.map(jax.device_put, params, shardings)
    assert tuple(placed["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec) == (None, "fsdp", "tensor")
    logits = jax.jit(lambda p: model.apply({"params": p}, ids, attention_mask=mask)["logits"])(placed)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("kernel_set", ["cpu", "gpu", "tpu"])
def test_attention_kernels_match_autodiff_of_plain_softmax(kernel_set):
  """Each kernel set's attention (the cpu one with its written-out gradient) and its gradient
  equal autodiff of a plain softmax attention: right and left padding (query rows that see no
  key average uniformly), grouped k / v heads."""
  b, length, heads, kv_heads, hd = 2, 12, 4, 2, 8
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, length, heads, hd))
  k, v = (jax.random.normal(kk, (b, length, kv_heads, hd)) for kk in keys[1:3])
  cotangent = jax.random.normal(keys[3], (b, length, heads, hd))
  real = np.ones((b, length), bool)
  real[0, 9:] = False   # right padding
  real[1, :3] = False   # left padding: query rows 0-2 see no key
  mask = jnp.tril(jnp.ones((length, length), bool))[None] & jnp.asarray(real)[:, None, :]

  def plain(q, k, v):
    k, v = jnp.repeat(k, heads // kv_heads, axis=2), jnp.repeat(v, heads // kv_heads, axis=2)
    scores = jnp.einsum("blhd,bshd->bhls", q, k) * hd ** -0.5
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min), -1)
    return jnp.einsum("bhls,bshd->blhd", probs, v)

  ours, ours_vjp = jax.vjp(lambda q, k, v: kernels.attention(q, k, v, mask, kernel_set), q, k, v)
  theirs, theirs_vjp = jax.vjp(plain, q, k, v)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-6)
  np.testing.assert_allclose(np.asarray(ours[1, 0]), np.asarray(v[1].mean(0).repeat(2, 0)), atol=1e-6)
  for name, a, b_ in zip("qkv", ours_vjp(cotangent), theirs_vjp(cotangent)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5, err_msg=f"d{name}")


def test_every_remat_policy_gives_the_same_gradients():
  """llm.remat_policy picks what a layer keeps (jax's policies and the named-activation ones,
  maxtext style); the gradients stay those without remat. An unknown name is refused."""
  from medplib_jax.models.llama import REMAT_POLICIES, LlamaConfigError
  ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 97)
  grads = {}
  for policy in REMAT_POLICIES:
    _, cfg = tiny_configs(remat_policy=policy)
    model = LlamaForCausalLM(cfg, common.moe_config(1), None)
    if not grads:
      params = jax.jit(model.init)(jax.random.key(1), ids)["params"]
    loss = lambda p, model=model: model.apply({"params": p}, ids)["logits"].std()  # noqa: E731
    grads[policy] = jax.jit(jax.grad(loss))(params)
  for policy, g in grads.items():
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7,
                                                         err_msg=policy), g, grads["none"])
  _, cfg = tiny_configs(remat_policy="save_everything")
  with pytest.raises(LlamaConfigError, match="remat_policy='save_everything'"):
    LlamaForCausalLM(cfg, common.moe_config(1), None).init(jax.random.key(1), ids)
