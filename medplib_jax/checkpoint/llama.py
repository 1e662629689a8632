"""Hugging Face LLaMA / LLaVA / MedPLIB-MoE weights <-> `LlamaForCausalLM` params.

Source layout (torch Linear weights are [out, in]; ours are kernels [in, out]):

| source key (after `prefix`, default `model.`)                  | our path (under `layers`, stacked on a leading layer axis) |
|-----------------------------------------------------------------|------------------------------------------------------------|
| embed_tokens.weight [V, D]                                      | embed_tokens/embedding                                     |
| layers.N.self_attn.{q,k,v,o}_proj.weight                        | self_attn/{q,k,v,o}_proj/kernel                            |
| layers.N.{input,post_attention}_layernorm.weight                | {input,post_attention}_layernorm/scale                     |
| layers.N.mlp.{gate,up,down}_proj.weight (dense)                 | mlp/{gate,up,down}_proj/kernel                             |
| layers.N.mlp.deepspeed_moe.gate.wg.weight [E, D] (MoE)          | mlp/router/kernel [D, E]                                   |
| layers.N.mlp.deepspeed_moe.experts.deepspeed_experts.E.{gate,up,down}_proj.weight | mlp/{gate,up,down}_proj [E, in, out]     |
| norm.weight                                                     | norm/scale                                                 |
| lm_head.weight [V, D] (no prefix)                               | lm_head/kernel [D, V]                                      |

Keys that are not LLaMA weights (LLaVA's `mm_projector`, `vision_tower`, MedPLIB's SAM parts,
rotary `inv_freq` buffers) are left to other importers and listed in the report's `unmapped`.
LoRA adapters are not part of these checkpoints: take them from `model.init` (merge the loaded
tree into the initialised one).
"""

import re
from collections.abc import Mapping

import numpy as np

from medplib_jax.checkpoint.torch_io import CheckpointError, KeyLedger, read_state_dict

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_FFN = ("gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


def _num_experts(moe_config) -> int:
  return 1 if moe_config is None else int(moe_config.num_experts)


def _as_numpy_state_dict(source) -> tuple[dict, str]:
  if isinstance(source, Mapping):
    out = {}
    for k, v in source.items():
      if hasattr(v, "detach"):  # a torch tensor handed over in memory
        v = v.detach().cpu().float().numpy()
      out[k] = np.asarray(v)
    return out, "state dict"
  return read_state_dict(str(source)), str(source)


def _linear(ledger, key, out_dim, in_dim):
  """torch Linear weight [out, in] -> kernel [in, out]."""
  return ledger.take(key, (out_dim, in_dim)).T


def load_llama(source, config, moe_config=None, prefix: str = "model.", resize_vocab_to=None):
  """Reads LLaMA weights into a `LlamaForCausalLM` param tree (the contents of `params`).

  source: a HF model directory (single or sharded, safetensors or .bin, with its index json), a
  weights file, or an in-memory state dict {key: array}. config: llm_config; moe_config: with
  num_experts > 1 the MedPLIB MoE layout is read. resize_vocab_to: grow the vocabulary after
  loading (new rows = mean of the old ones, as LLaVA does); the result must have
  config.vocab_size rows.

  Returns (params, report): params nested dicts of float32 numpy arrays, stacked on a leading
  layer axis (`layers/...`) when config.scan_layers else per layer (`layers_N/...`); report =
  KeyLedger.report() (mapped count, unmapped source keys, missing keys) plus `vocab_resized`.
  """
  state_dict, name = _as_numpy_state_dict(source)
  ledger = KeyLedger(state_dict, name)
  cfg = config
  d, f, h, kvh, hd = cfg.width, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  emb_key = prefix + "embed_tokens.weight"
  if emb_key not in ledger:
    raise CheckpointError(f"{name}: missing key {emb_key!r} (is prefix={prefix!r} right?)")
  src_vocab = state_dict[emb_key].shape[0]
  final_vocab = resize_vocab_to or src_vocab
  if final_vocab != cfg.vocab_size:
    raise CheckpointError(
        f"{name}: {emb_key} has {src_vocab} rows" + (f", resized to {final_vocab}," if resize_vocab_to else "")
        + f" but llm.vocab_size is {cfg.vocab_size}; pass resize_vocab_to={cfg.vocab_size} "
        "to add rows for new tokens")

  num_experts = _num_experts(moe_config)
  out_dims = {"q_proj": h * hd, "k_proj": kvh * hd, "v_proj": kvh * hd, "o_proj": d}
  in_dims = {"q_proj": d, "k_proj": d, "v_proj": d, "o_proj": h * hd}
  ffn_dims = {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
  layers = []
  for n in range(cfg.depth):
    base = f"{prefix}layers.{n}."
    layer = {"self_attn": {p: {"kernel": _linear(ledger, f"{base}self_attn.{p}.weight",
                                                 out_dims[p], in_dims[p])} for p in _ATTN}}
    for norm in _NORMS:
      layer[norm] = {"scale": ledger.take(f"{base}{norm}.weight", (d,))}
    if num_experts > 1:
      moe = f"{base}mlp.deepspeed_moe."
      mlp = {"router": {"kernel": _linear(ledger, moe + "gate.wg.weight", num_experts, d)}}
      for p in _FFN:
        mlp[p] = np.stack([
            _linear(ledger, f"{moe}experts.deepspeed_experts.{e}.{p}.weight", *ffn_dims[p])
            for e in range(num_experts)])
    else:
      mlp = {p: {"kernel": _linear(ledger, f"{base}mlp.{p}.weight", *ffn_dims[p])} for p in _FFN}
    layer["mlp"] = mlp
    layers.append(layer)

  params = {"embed_tokens": {"embedding": ledger.take(emb_key, (src_vocab, d))},
            "norm": {"scale": ledger.take(prefix + "norm.weight", (d,))},
            "lm_head": {"kernel": ledger.take("lm_head.weight", (src_vocab, d)).T}}
  if cfg.scan_layers:
    params["layers"] = _stack(layers)
  else:
    params.update({f"layers_{n}": layer for n, layer in enumerate(layers)})
  if resize_vocab_to:
    params = resize_vocab(params, resize_vocab_to)
  report = ledger.report()
  report["vocab_resized"] = (src_vocab, final_vocab) if final_vocab != src_vocab else None
  return params, report


def _stack(trees):
  if isinstance(trees[0], Mapping):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def resize_vocab(params, new_size: int):
  """Grows embed_tokens/embedding [V, D] and lm_head/kernel [D, V] to `new_size` tokens.

  New rows (columns of the head) are the mean of the old ones, as LLaVA initialises added tokens.
  """
  emb = np.asarray(params["embed_tokens"]["embedding"])
  head = np.asarray(params["lm_head"]["kernel"])
  old = emb.shape[0]
  if new_size < old:
    raise CheckpointError(f"resize_vocab: cannot shrink the vocabulary from {old} to {new_size}")
  extra = new_size - old
  emb = np.concatenate([emb, np.repeat(emb.mean(0, keepdims=True), extra, 0)], 0)
  head = np.concatenate([head, np.repeat(head.mean(1, keepdims=True), extra, 1)], 1)
  out = dict(params)
  out["embed_tokens"] = {**params["embed_tokens"], "embedding": emb}
  out["lm_head"] = {**params["lm_head"], "kernel": head}
  return out


def export_llama(params, config, moe_config=None, prefix: str = "model.") -> dict[str, np.ndarray]:
  """Our param tree -> {HF / MedPLIB key: float32 array [out, in]} (inverse of `load_llama`).

  LoRA adapters must be merged first (`lora.merge_lora`); leftover `*_lora_*` leaves are an error.
  """
  def arr(x):
    return np.asarray(x, dtype=np.float32)

  num_experts = _num_experts(moe_config)
  out = {prefix + "embed_tokens.weight": arr(params["embed_tokens"]["embedding"]),
         prefix + "norm.weight": arr(params["norm"]["scale"]),
         "lm_head.weight": arr(params["lm_head"]["kernel"]).T}
  for n in range(config.depth):
    if config.scan_layers:
      layer = _take_layer(params["layers"], n)
    else:
      layer = params[f"layers_{n}"]
    _reject_lora(layer, f"layer {n}")
    base = f"{prefix}layers.{n}."
    for p in _ATTN:
      out[f"{base}self_attn.{p}.weight"] = arr(layer["self_attn"][p]["kernel"]).T
    for norm in _NORMS:
      out[f"{base}{norm}.weight"] = arr(layer[norm]["scale"])
    mlp = layer["mlp"]
    if num_experts > 1:
      moe = f"{base}mlp.deepspeed_moe."
      out[moe + "gate.wg.weight"] = arr(mlp["router"]["kernel"]).T
      for p in _FFN:
        for e in range(num_experts):
          out[f"{moe}experts.deepspeed_experts.{e}.{p}.weight"] = arr(mlp[p][e]).T
    else:
      for p in _FFN:
        out[f"{base}mlp.{p}.weight"] = arr(mlp[p]["kernel"]).T
  return out


def _take_layer(tree, n):
  if isinstance(tree, Mapping):
    return {k: _take_layer(v, n) for k, v in tree.items()}
  return np.asarray(tree)[n]


def _reject_lora(tree, where):
  for k, v in tree.items():
    if re.search(r"_lora_[ab]$", k):
      raise CheckpointError(f"export_llama: {where} still has LoRA adapter {k!r}; merge_lora first")
    if isinstance(v, Mapping):
      _reject_lora(v, f"{where}/{k}")
