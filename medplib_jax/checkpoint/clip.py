"""Import of the image side: CLIP vision tower, `mm_projector` and `region_fea_adapter` weights.

Sources: a Hugging Face CLIP directory / weights file (keys `vision_model.*`), a MedPLIB
checkpoint (keys `model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.*`,
`model.region_fea_adapter.*`), or an already-read state dict. Reading is safe (torch_io). Each
loader returns `(params, report)`: `params` a plain numpy pytree shaped like the flax module's
`params` collection, `report` the KeyLedger report for its key prefix (every source key under
the prefix is mapped or listed as unmapped), plus `notes` on what was adapted.

Torch -> flax: Linear weight [out, in] -> kernel [in, out]; Conv2d weight [O, I, kh, kw] ->
kernel [kh, kw, I, O]; LayerNorm weight -> scale. Encoder layers are stacked on a leading axis
(`nn.scan`); layers above the selected one are not built (see models/clip.py) and stay unmapped.
"""

import json
import logging
import os
from collections.abc import Mapping

import numpy as np

from medplib_jax.checkpoint.torch_io import CheckpointError, KeyLedger, read_state_dict
from medplib_jax.models.clip import num_computed_layers
from medplib_jax.models.projector import projector_depth

log = logging.getLogger(__name__)

CLIP_PREFIXES = ("model.vision_tower.vision_tower.vision_model.", "vision_model.")
PROJECTOR_PREFIX = "model.mm_projector."
REGION_ADAPTER_PREFIX = "model.region_fea_adapter."

# HF CLIPVisionConfig field -> our vision config field.
_HF_FIELDS = {"hidden_size": "width", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
              "intermediate_size": "mlp_dim", "patch_size": "patch_size"}


def _ledger(source, name: str | None = None) -> KeyLedger:
  if isinstance(source, KeyLedger):
    return source
  if isinstance(source, Mapping):
    return KeyLedger(source, name or "state dict")
  return KeyLedger(read_state_dict(os.fspath(source)), name or os.fspath(source))


def _check_hf_config(path: str, config) -> None:
  """Compares a HF config.json beside the weights with our vision config; names any mismatch."""
  cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else None
  if not cfg_path or not os.path.exists(cfg_path):
    return
  with open(cfg_path) as f:
    hf = json.load(f)
  hf = hf.get("vision_config", hf)
  for hf_field, ours in _HF_FIELDS.items():
    if hf_field in hf and int(hf[hf_field]) != int(config[ours]):
      raise CheckpointError(f"{cfg_path}: {hf_field}={hf[hf_field]} but the vision config has "
                            f"{ours}={config[ours]}")
  act = hf.get("hidden_act", "quick_gelu")
  if act != "quick_gelu":
    raise CheckpointError(f"{cfg_path}: hidden_act={act!r}; the tower implements quick_gelu only")


def _cubic_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] matrix of torch `interpolate(mode='bicubic', align_corners=False)` along one axis."""
  a = -0.75  # torch's cubic convolution coefficient

  def kernel(t):
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))

  weights = np.zeros((out_size, in_size), np.float64)
  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(src).astype(np.int64)
  frac = src - base
  for offset in (-1, 0, 1, 2):
    idx = np.clip(base + offset, 0, in_size - 1)  # border replication, as torch
    np.add.at(weights, (np.arange(out_size), idx), kernel(frac - offset))
  return weights


def interpolate_position_embedding(pos: np.ndarray, grid: int) -> np.ndarray:
  """[1 + g*g, D] -> [1 + grid*grid, D]: CLS kept, patch grid resized bicubically (as HF
  `interpolate_pos_encoding`)."""
  n = pos.shape[0] - 1
  g = int(round(np.sqrt(n)))
  if g * g != n:
    raise CheckpointError(f"position embedding has {n} patch positions, not a square grid")
  if g == grid:
    return pos
  w = _cubic_weights(g, grid)
  patches = pos[1:].reshape(g, g, -1).astype(np.float64)
  resized = np.einsum("ij,jkd,lk->ild", w, patches, w).reshape(grid * grid, -1)
  return np.concatenate([pos[:1], resized.astype(pos.dtype)], axis=0)


def detect_clip_prefix(keys) -> str:
  """The key prefix in front of `embeddings.patch_embedding.weight`: the MedPLIB one, HF
  `vision_model.` (CLIPModel / older CLIPVisionModel), or none (transformers 5 CLIPVisionModel)."""
  suffix = "embeddings.patch_embedding.weight"
  found = sorted({k[:-len(suffix)] for k in keys if k.endswith(suffix)})
  for prefix in CLIP_PREFIXES + ("",):
    if prefix in found:
      return prefix
  keys = list(keys)
  raise CheckpointError(f"no CLIP vision keys found (looked for {suffix!r} after one of "
                        f"{CLIP_PREFIXES} or no prefix; found prefixes {found}, first keys: {keys[:5]})")


def _linear(ledger, key, in_dim, out_dim):
  return {"kernel": ledger.take(f"{key}.weight", (out_dim, in_dim)).T,
          "bias": ledger.take(f"{key}.bias", (out_dim,))}


def _norm(ledger, key, dim):
  return {"scale": ledger.take(f"{key}.weight", (dim,)), "bias": ledger.take(f"{key}.bias", (dim,))}


def load_clip_vision(source, config, prefix: str | None = None):
  """CLIP vision weights -> (params for `ClipVisionTower(config)`, report).

  source: HF CLIP directory, weights file, MedPLIB checkpoint path, or a state dict.
  prefix: key prefix of the vision model; auto-detected when None.
  """
  if isinstance(source, (str, os.PathLike)):
    _check_hf_config(os.fspath(source), config)
  ledger = _ledger(source)
  prefix = prefix if prefix is not None else detect_clip_prefix(ledger.state_dict)
  d, p, f = int(config.width), int(config.patch_size), int(config.mlp_dim)
  grid = int(config.image_size) // p
  notes = []
  emb = prefix + "embeddings."
  pos_key = emb + "position_embedding.weight"
  if pos_key not in ledger:
    raise CheckpointError(f"{ledger.source}: missing key {pos_key!r}")
  pos_shape = ledger.state_dict[pos_key].shape
  if len(pos_shape) != 2 or pos_shape[1] != d:
    raise CheckpointError(f"{ledger.source}: key {pos_key!r} has shape {tuple(pos_shape)}, "
                          f"expected (N, {d})")
  pos = ledger.take(pos_key, pos_shape)
  if pos.shape[0] != grid * grid + 1:
    note = (f"position embedding interpolated bicubically from {pos.shape[0] - 1} to "
            f"{grid * grid} patch positions (image_size {config.image_size})")
    log.info(note)
    notes.append(note)
    pos = interpolate_position_embedding(pos, grid)
  params = {
      "patch_embedding": {"kernel": ledger.take(emb + "patch_embedding.weight", (d, 3, p, p))
                          .transpose(2, 3, 1, 0)},
      "class_embedding": ledger.take(emb + "class_embedding", (d,)),
      "position_embedding": pos,
      "pre_layrnorm": _norm(ledger, prefix + "pre_layrnorm", d),
  }
  n_layers = num_computed_layers(int(config.depth), int(config.select_layer))
  layers = []
  for i in range(n_layers):
    lp = f"{prefix}encoder.layers.{i}."
    layers.append({
        "layer_norm1": _norm(ledger, lp + "layer_norm1", d),
        "self_attn": {name: _linear(ledger, lp + f"self_attn.{name}", d, d)
                      for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "layer_norm2": _norm(ledger, lp + "layer_norm2", d),
        "mlp": {"fc1": _linear(ledger, lp + "mlp.fc1", d, f), "fc2": _linear(ledger, lp + "mlp.fc2", f, d)},
    })
  if layers:
    params["layers"] = _stack(layers)
  if n_layers < int(config.depth):
    notes.append(f"layers {n_layers}..{int(config.depth) - 1} and post_layernorm are not used "
                 f"(select_layer={config.select_layer}) and stay unmapped")
  report = ledger.report(prefix)
  report["notes"] = notes
  return params, report


def _stack(trees):
  if isinstance(trees[0], dict):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def load_projector(source, kind: str, prefix: str = PROJECTOR_PREFIX, in_width: int | None = None,
                   out_width: int | None = None):
  """`mm_projector` weights -> (params for `Projector(kind, ...)`, report).

  mlp<N>x_gelu: `{prefix}{0,2,4..}.weight/bias` -> linear_1..linear_N; linear: `{prefix}weight`.
  Widths are taken from the checkpoint and checked against in_width / out_width when given.
  """
  ledger = _ledger(source)
  depth = projector_depth(kind)
  keys = [prefix.rstrip(".")] if kind == "linear" else [f"{prefix}{2 * i}" for i in range(depth)]
  params = {}
  width = in_width
  for i, key in enumerate(keys):
    wkey = f"{key}.weight"
    if wkey not in ledger:
      raise CheckpointError(f"{ledger.source}: missing key {wkey!r} for projector {kind!r}")
    out_dim, in_dim = ledger.state_dict[wkey].shape
    if width is not None and in_dim != width:
      raise CheckpointError(f"{ledger.source}: key {wkey!r} has shape {(out_dim, in_dim)}, "
                            f"expected ({out_dim}, {width})")
    if out_width is not None and out_dim != out_width:
      raise CheckpointError(f"{ledger.source}: key {wkey!r} has shape {(out_dim, in_dim)}, "
                            f"expected ({out_width}, {in_dim})")
    params[f"linear_{i + 1}"] = _linear(ledger, key, in_dim, out_dim)
    width = out_dim
  report = ledger.report(prefix.rstrip("."))
  report["notes"] = []
  return params, report


def load_region_adapter(source, prefix: str = REGION_ADAPTER_PREFIX, in_width: int | None = None,
                        out_width: int | None = None):
  """`region_fea_adapter` (Linear vision width -> LLM width) -> ({'kernel', 'bias'}, report)."""
  ledger = _ledger(source)
  key = prefix.rstrip(".")
  if f"{key}.weight" not in ledger:
    raise CheckpointError(f"{ledger.source}: missing key {key + '.weight'!r}")
  out_dim, in_dim = ledger.state_dict[f"{key}.weight"].shape
  params = _linear(ledger, key, in_width or in_dim, out_width or out_dim)
  report = ledger.report(prefix)
  report["notes"] = []
  return params, report
