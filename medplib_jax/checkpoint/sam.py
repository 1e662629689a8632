"""SAM / SAM-Med2D weights <-> the `SamMed2D` param tree.

Sources, detected by their keys:
* SAM-Med2D `sam-med2d_b.pth` ({"model": state_dict}; adapter keys `image_encoder.blocks.N.Adapter.*`)
* a MedPLIB checkpoint: the `model.visual_model.*` keys (SAM-Med2D layout under a prefix)
* stock SAM checkpoints (segment_anything layout, no adapters)
* Hugging Face `transformers.SamModel` (`vision_encoder.*`), translated to the segment_anything
  layout first.
Everything is read with `torch_io` (safetensors, or torch.load(weights_only=True)); every source
key is either mapped or listed in the report.
"""

import re
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from medplib_jax.checkpoint.torch_io import CheckpointError, KeyLedger, read_state_dict
from medplib_jax.models.sam import SamMed2D
from medplib_jax.models.sam_image_encoder import block_pattern

MEDPLIB_PREFIX = "model.visual_model."
# Non-persistent buffers in segment_anything, but some exporters save them; never parameters.
_IGNORED_KEYS = ("pixel_mean", "pixel_std")
_POINT_EMBEDDING_KEYS = tuple(f"prompt_encoder.point_embeddings.{i}.weight" for i in range(4))
# Mask-prompt downscaling: MedPLIB's forward never uses it, so models trained here lack it; it is
# imported when present and exported when held, never required.
OPTIONAL_PREFIX = "prompt_encoder.mask_downscaling."


# ---- layout translation: Hugging Face SamModel -> segment_anything -----------------------------

def _hf_rules(config):
  hyper_last, iou_last = 2, config.iou_head_depth - 1
  return [
      (r"^vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
      (r"^vision_encoder\.pos_embed$", "image_encoder.pos_embed"),
      (r"^vision_encoder\.layers\.(\d+)\.layer_norm([12])\.", r"image_encoder.blocks.\1.norm\2."),
      (r"^vision_encoder\.layers\.(\d+)\.", r"image_encoder.blocks.\1."),
      (r"^vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
      (r"^vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
      (r"^vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
      (r"^vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
      (r"^shared_image_embedding\.positional_embedding$",
       "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
      (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
      (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
      (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
      (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
      (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
      (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
      (r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.",
       r"mask_decoder.transformer.layers.\1.norm\2."),
      (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
      (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
      (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
      (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
      (r"^mask_decoder\.output_hypernetworks_mlps\.(\d+)\.proj_in\.",
       r"mask_decoder.output_hypernetworks_mlps.\1.layers.0."),
      (r"^mask_decoder\.output_hypernetworks_mlps\.(\d+)\.proj_out\.",
       rf"mask_decoder.output_hypernetworks_mlps.\1.layers.{hyper_last}."),
      (r"^mask_decoder\.iou_prediction_head\.proj_in\.", "mask_decoder.iou_prediction_head.layers.0."),
      (r"^mask_decoder\.iou_prediction_head\.proj_out\.",
       f"mask_decoder.iou_prediction_head.layers.{iou_last}."),
  ]


def _shift_hidden_layer(key: str) -> str:
  """HF FeedForward `layers.j` are the hidden layers after proj_in: segment_anything `layers.{j+1}`."""
  m = re.match(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(.*)$", key)
  return f"{m.group(1)}.layers.{int(m.group(2)) + 1}.{m.group(3)}" if m else key


def hf_to_segment_anything(state_dict: Mapping[str, np.ndarray], config) -> tuple[dict, dict]:
  """Renames HF SamModel keys to segment_anything keys -> (state_dict, {new_key: hf_key})."""
  rules = [(re.compile(p), r) for p, r in _hf_rules(config)]
  out, origin = {}, {}
  tied = "prompt_encoder.shared_embedding.positional_embedding"
  for key, value in state_dict.items():
    if key == tied:
      continue  # tied to shared_image_embedding.positional_embedding (same tensor)
    new = _shift_hidden_layer(key)
    for pattern, repl in rules:
      if pattern.search(new):
        new = pattern.sub(repl, new)
        break
    out[new], origin[new] = value, key
  if tied in state_dict and "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" not in out:
    out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = state_dict[tied]
    origin["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = tied
  return out, origin


# ---- the mapping table: segment_anything key <-> flax path ------------------------------------
# kinds: "linear" torch [out, in] <-> kernel [in, out]; "conv" [O, I, kh, kw] <-> [kh, kw, I, O];
# "convT" [I, O, kh, kw] <-> flipped [kh, kw, I, O]; "copy" as is; "row" [1, C] <-> [C].

def _linear(torch_prefix, flax_path, bias=True):
  out = [(f"{torch_prefix}.weight", flax_path + ("kernel",), "linear")]
  if bias:
    out.append((f"{torch_prefix}.bias", flax_path + ("bias",), "copy"))
  return out


def _norm(torch_prefix, flax_path):
  return [(f"{torch_prefix}.weight", flax_path + ("scale",), "copy"),
          (f"{torch_prefix}.bias", flax_path + ("bias",), "copy")]


def _conv(torch_prefix, flax_path, kind="conv", bias=True):
  out = [(f"{torch_prefix}.weight", flax_path + ("kernel",), kind)]
  if bias:
    out.append((f"{torch_prefix}.bias", flax_path + ("bias",), "copy"))
  return out


def _block_entries(config, i):
  """Entries for encoder block i; flax paths are relative to the block inside its group."""
  t = f"image_encoder.blocks.{i}"
  e = _norm(f"{t}.norm1", ("norm1",)) + _norm(f"{t}.norm2", ("norm2",))
  e += _linear(f"{t}.attn.qkv", ("attn", "qkv")) + _linear(f"{t}.attn.proj", ("attn", "proj"))
  if config.use_rel_pos:
    e += [(f"{t}.attn.rel_pos_h", ("attn", "rel_pos_h"), "copy"),
          (f"{t}.attn.rel_pos_w", ("attn", "rel_pos_w"), "copy")]
  e += _linear(f"{t}.mlp.lin1", ("mlp", "lin1")) + _linear(f"{t}.mlp.lin2", ("mlp", "lin2"))
  if config.adapter:
    a = f"{t}.Adapter"
    e += _linear(f"{a}.channel.0", ("adapter", "channel_down"), bias=False)
    e += _linear(f"{a}.channel.2", ("adapter", "channel_up"), bias=False)
    e += _conv(f"{a}.spatial.0", ("adapter", "spatial_down"), bias=False)
    e += _conv(f"{a}.spatial.2", ("adapter", "spatial_up"), "convT", bias=False)
    e += _norm(f"{a}.norm", ("adapter", "norm"))
  return e


def _attention(torch_prefix, flax_path):
  return sum((_linear(f"{torch_prefix}.{p}", flax_path + (p,))
              for p in ("q_proj", "k_proj", "v_proj", "out_proj")), [])


def _flat_entries(config):
  """Every (torch key, flax path, kind) outside the scanned encoder blocks."""
  ie, pe, md = ("image_encoder",), ("prompt_encoder",), ("mask_decoder",)
  e = _conv("image_encoder.patch_embed.proj", ie + ("patch_embed",))
  e += [("image_encoder.pos_embed", ie + ("pos_embed",), "copy")]
  e += _conv("image_encoder.neck.0", ie + ("neck", "conv1"), bias=False)
  e += _norm("image_encoder.neck.1", ie + ("neck", "norm1"))
  e += _conv("image_encoder.neck.2", ie + ("neck", "conv2"), bias=False)
  e += _norm("image_encoder.neck.3", ie + ("neck", "norm2"))
  e += [("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", pe + ("pe_gaussian",), "copy"),
        ("prompt_encoder.not_a_point_embed.weight", pe + ("not_a_point_embed",), "row"),
        ("prompt_encoder.no_mask_embed.weight", pe + ("no_mask_embed",), "row")]
  e += _conv("prompt_encoder.mask_downscaling.0", pe + ("mask_downscaling", "conv1"))
  e += _norm("prompt_encoder.mask_downscaling.1", pe + ("mask_downscaling", "norm1"))
  e += _conv("prompt_encoder.mask_downscaling.3", pe + ("mask_downscaling", "conv2"))
  e += _norm("prompt_encoder.mask_downscaling.4", pe + ("mask_downscaling", "norm2"))
  e += _conv("prompt_encoder.mask_downscaling.6", pe + ("mask_downscaling", "conv3"))
  e += [("mask_decoder.iou_token.weight", md + ("iou_token",), "copy"),
        ("mask_decoder.mask_tokens.weight", md + ("mask_tokens",), "copy")]
  tr = md + ("transformer",)
  for i in range(config.decoder_depth):
    t, f = f"mask_decoder.transformer.layers.{i}", tr + (f"layers_{i}",)
    for name in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
      e += _attention(f"{t}.{name}", f + (name,))
    for n in range(1, 5):
      e += _norm(f"{t}.norm{n}", f + (f"norm{n}",))
    e += _linear(f"{t}.mlp.lin1", f + ("mlp", "lin1")) + _linear(f"{t}.mlp.lin2", f + ("mlp", "lin2"))
  e += _attention("mask_decoder.transformer.final_attn_token_to_image",
                  tr + ("final_attn_token_to_image",))
  e += _norm("mask_decoder.transformer.norm_final_attn", tr + ("norm_final_attn",))
  e += _conv("mask_decoder.output_upscaling.0", md + ("upscale_conv1",), "convT")
  e += _norm("mask_decoder.output_upscaling.1", md + ("upscale_norm",))
  e += _conv("mask_decoder.output_upscaling.3", md + ("upscale_conv2",), "convT")
  for m in range(config.num_multimask_outputs + 1):
    for j in range(3):
      e += _linear(f"mask_decoder.output_hypernetworks_mlps.{m}.layers.{j}",
                   md + (f"hypernet_{m}", f"layers_{j}"))
  for j in range(config.iou_head_depth):
    e += _linear(f"mask_decoder.iou_prediction_head.layers.{j}", md + ("iou_head", f"layers_{j}"))
  return e


def _to_flax(value, kind):
  if kind == "linear":
    return value.T
  if kind == "conv":
    return value.transpose(2, 3, 1, 0)
  if kind == "convT":
    return value.transpose(2, 3, 0, 1)[::-1, ::-1]
  if kind == "row":
    return value.reshape(-1)
  return value


def _to_torch(value, kind, torch_shape=None):
  if kind == "linear":
    return value.T
  if kind == "conv":
    return value.transpose(3, 2, 0, 1)
  if kind == "convT":
    return value[::-1, ::-1].transpose(2, 3, 0, 1)
  if kind == "row":
    return value.reshape(1, -1)
  return value


# ---- detection and loading ---------------------------------------------------------------------

def detect_layout(keys) -> str:
  """'hf' | 'medplib' | 'sam-med2d' | 'sam' from a set of state-dict keys."""
  keys = list(keys)
  if any(k.startswith(MEDPLIB_PREFIX) for k in keys):
    return "medplib"
  if any(k.startswith("vision_encoder.") for k in keys):
    return "hf"
  if any(".Adapter." in k for k in keys):
    return "sam-med2d"
  if any(k.startswith("image_encoder.") for k in keys):
    return "sam"
  raise CheckpointError("no SAM weights found: expected image_encoder.* (segment_anything / "
                        "SAM-Med2D), model.visual_model.* (MedPLIB) or vision_encoder.* (HF SamModel)")


def _set(tree: dict, path, value):
  node = tree
  for name in path[:-1]:
    node = node.setdefault(name, {})
  node[path[-1]] = value


def load_sam(source, config, prefix: str | None = None):
  """Reads SAM weights -> (params {"image_encoder", "prompt_encoder", "mask_decoder"}, report).

  source: a path (.pth / .pt / .bin / .safetensors / HF directory) or an already-read state dict.
  prefix: strip this key prefix and take only those keys (default: "model.visual_model." when the
  checkpoint is a MedPLIB one). The params are plain numpy arrays in the `SamMed2D` layout (wrap as
  {"params": params} for `apply`). The report lists the layout, mapped count, unmapped source keys
  and, with a prefix, how many keys lay outside it.
  """
  name = source if isinstance(source, str) else "state dict"
  state = read_state_dict(source) if isinstance(source, str) else dict(source)
  layout = detect_layout(state)
  if prefix is None and layout == "medplib":
    prefix = MEDPLIB_PREFIX
  outside = 0
  if prefix:
    outside = sum(not k.startswith(prefix) for k in state)
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    layout = detect_layout(state)
  origin = {k: (prefix or "") + k for k in state}
  if layout == "hf":
    state, hf_origin = hf_to_segment_anything(state, config)
    origin = {k: (prefix or "") + hf_origin[k] for k in state}
  has_adapter = any(".Adapter." in k for k in state)
  if has_adapter != bool(config.adapter):
    raise CheckpointError(f"{name}: checkpoint {'has' if has_adapter else 'lacks'} SAM-Med2D "
                          f"adapters but config.adapter={config.adapter}")
  ledger = KeyLedger(state, source=name)
  for key in _IGNORED_KEYS:
    if key in ledger:
      ledger.take(key, dtype=None)

  params: dict = {}

  def take(key, kind, expected_flax_shape):
    torch_shape = np.shape(_to_torch(np.zeros(expected_flax_shape, np.int8), kind))
    return _to_flax(ledger.take(key, torch_shape), kind)

  shapes = _expected_shapes(config)
  for key, path, kind in _flat_entries(config):
    if key.startswith(OPTIONAL_PREFIX) and key not in ledger:
      continue
    _set(params, path, take(key, kind, shapes[path]))
  # Four nn.Embedding(1, C) in torch (negative, positive, box corners) -> one [4, C] param.
  _set(params, ("prompt_encoder", "point_embeddings"), np.concatenate(
      [ledger.take(key, (1, config.prompt_embed_dim)) for key in _POINT_EMBEDDING_KEYS]))
  period, num_groups = block_pattern(config)
  for j in range(period):
    per_group = [_block_entries(config, g * period + j) for g in range(num_groups)]
    for idx, (_, rel, kind) in enumerate(per_group[0]):
      path = ("image_encoder", "blocks", f"block_{j}") + rel
      _set(params, path, np.stack([take(entries[idx][0], kind, shapes[path][1:])
                                   for entries in per_group]))
  report = ledger.report()
  report["layout"] = layout
  report["unmapped"] = [origin.get(k, k) for k in report["unmapped"]]
  report["outside_prefix"] = outside
  return params, report


def _expected_shapes(config) -> dict:
  """flax path -> shape, from `jax.eval_shape` of the model's init (no compute)."""
  model = SamMed2D(config)
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  index = jax.ShapeDtypeStruct((1,), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, index)
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(abstract)["params"])
  return {path: tuple(v.shape) for path, v in flat.items()}


def export_sam(params, config, prefix: str = MEDPLIB_PREFIX) -> dict[str, np.ndarray]:
  """`SamMed2D` params (with or without the "params" wrapper) -> segment_anything-layout state dict."""
  params = flax.core.meta.unbox(params)
  if "params" in params:
    params = params["params"]
  flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
  out = {}
  for key, path, kind in _flat_entries(config):
    if key.startswith(OPTIONAL_PREFIX) and path not in flat:
      continue
    out[prefix + key] = np.ascontiguousarray(_to_torch(flat[path], kind))
  for i, key in enumerate(_POINT_EMBEDDING_KEYS):
    out[prefix + key] = flat[("prompt_encoder", "point_embeddings")][i:i + 1].copy()
  period, num_groups = block_pattern(config)
  for g in range(num_groups):
    for j in range(period):
      for (key, rel, kind) in _block_entries(config, g * period + j):
        value = flat[("image_encoder", "blocks", f"block_{j}") + rel][g]
        out[prefix + key] = np.ascontiguousarray(_to_torch(value, kind))
  return out
