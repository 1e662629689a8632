"""Whole MedPLIB checkpoints <-> our `MedPLIB` params, in the reference (PyTorch) key layout.

A released MedPLIB directory (e.g. `Huangxs/MedPLIB-7b-2e`) holds a HF `config.json`, sharded
`pytorch_model-*.bin` or `*.safetensors` with an index json, and tokenizer files. Its keys:

| reference key                                             | our component (importer)            |
|-----------------------------------------------------------|-------------------------------------|
| model.vision_tower.vision_tower.vision_model.*            | vision (clip.load_clip_vision)      |
| model.mm_projector.{0,2}.*                                | projector (clip.load_projector)     |
| model.region_fea_adapter.*                                | region_adapter                      |
| model.embed_tokens / layers.N.* (deepspeed_moe) / norm, lm_head | llm (llama.load_llama)        |
| model.text_hidden_fcs.0.{0,2}.*                           | text_hidden_fcs/{fc1,fc2}           |
| model.visual_model.{image_encoder,prompt_encoder,mask_decoder}.* | sam (sam.load_sam)           |

The vision tower may instead come from a separate CLIP directory and SAM from `sam-med2d_b.pth`.
Model sizes come from the HF config (LLM, MoE), the weights' shapes (vision tower, SAM) and the
CLIP config; what neither fixes (attention heads of SAM's decoder, dtypes) comes from the stage
config the model is built on (configs/stage4_moe.py for MoE checkpoints, stage3 for dense ones),
or from the `medplib_jax` block that `reference_config` writes into exported config.json files.
Reading is safe (torch_io: safetensors, or torch.load(weights_only=True)).
"""

import ast
import json
import os
import re
from collections.abc import Mapping

import flax
import ml_dtypes
import numpy as np

from configs import stage3_ground, stage4_moe
from medplib_jax.checkpoint import clip as clip_io
from medplib_jax.checkpoint import llama as llama_io
from medplib_jax.checkpoint import sam as sam_io
from medplib_jax.checkpoint.torch_io import (_SAFETENSORS_DTYPES, CheckpointError, KeyLedger,
                                             read_state_dict)
from medplib_jax.models.medplib import MedPLIB, abstract_variables

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
REGION_PREFIX = "model.region_fea_adapter."
TEXT_FCS = ("model.text_hidden_fcs.0.0", "model.text_hidden_fcs.0.2")
SAM_PREFIX = sam_io.MEDPLIB_PREFIX
OUR_CONFIG_FIELD = "medplib_jax"  # our own block in exported config.json (the reference ignores it)
OPTIONAL_SAM = "sam/" + sam_io.OPTIONAL_PREFIX.replace(".", "/")
DEFAULT_SHARD_BYTES = 5 * 2**30
_SAFETENSORS_CODES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


# ---- config ------------------------------------------------------------------------------------

def read_hf_config(path: str) -> dict:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f"{path}: no config.json (not a Hugging Face / MedPLIB model directory)")
  try:
    with open(cfg_path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{cfg_path}: unreadable ({e})") from e


def _layer_count(keys, pattern: str) -> int:
  found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  return max(found) + 1 if found else 0


def _set(cfg, dotted: str, value):
  """Assigns `cfg.a.b.c = value`, keeping the field's type (tuples stay tuples, ints -> floats)."""
  parts = dotted.split(".")
  node = cfg
  try:
    for p in parts[:-1]:
      node = node[p]
    old = node[parts[-1]]
  except (KeyError, AttributeError) as e:
    raise ValueError(f"unknown config field {dotted!r}") from e
  if isinstance(old, tuple):
    value = tuple(value)
  elif isinstance(old, float) and isinstance(value, int):
    value = float(value)
  node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, object]:
  """'model.sam.decoder_num_heads=8' -> ('model.sam.decoder_num_heads', 8) (Python literals)."""
  if "=" not in text:
    raise ValueError(f"override {text!r} must look like field.path=value")
  key, raw = text.split("=", 1)
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return key.strip(), value


def _moe_settings(hf: dict, keys, depth: int) -> dict:
  """num_experts and gate settings from the HF config's `moe` block (or from the keys)."""
  moe = dict(hf.get("moe") or {})
  experts = moe.get("num_experts", hf.get("num_experts"))
  from_keys = _layer_count(keys, r"model\.layers\.0\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.")
  if isinstance(experts, (list, tuple)):
    layers = moe.get("moe_layers_idx")
    if layers is not None and list(layers) != list(range(depth)):
      raise CheckpointError(f"config.json: MoE on layers {layers} only; the model puts experts in "
                            f"every layer (moe_mode 'dense')")
    if len(set(experts)) != 1:
      raise CheckpointError(f"config.json: per-layer num_experts {experts} differ; one count expected")
    experts = experts[0]
  experts = int(experts) if experts else from_keys or 1
  if from_keys and from_keys != experts:
    raise CheckpointError(f"config.json says num_experts={experts} but the weights hold {from_keys}")
  if experts > 1 and not from_keys:
    raise CheckpointError(f"config.json says num_experts={experts} but no deepspeed_moe keys found")
  if moe.get("use_residual"):
    raise CheckpointError("config.json: residual MoE (use_residual) is not supported")
  out = {"num_experts": experts}
  for theirs, ours in (("top_k_experts", "top_k"), ("capacity_factor", "capacity_factor_train"),
                       ("eval_capacity_factor", "capacity_factor_eval"),
                       ("min_capacity", "min_capacity"), ("router_aux_loss_coef", "aux_loss_coef")):
    if experts > 1 and moe.get(theirs) is not None:
      out[ours] = moe[theirs]
  return out


def _llm_settings(hf: dict, state) -> dict:
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"config.json: hidden_act={hf['hidden_act']!r}; LLaMA uses silu")
  scaling = hf.get("rope_scaling") or {}
  if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
    raise CheckpointError(f"config.json: rope_scaling {scaling} is not supported")
  for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
    if field not in hf:
      raise CheckpointError(f"config.json: missing field {field!r}")
  heads = int(hf["num_attention_heads"])
  emb = state.get("model.embed_tokens.weight")
  vocab = int(emb.shape[0]) if emb is not None else int(hf["vocab_size"])
  rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0
  return dict(width=int(hf["hidden_size"]), depth=int(hf["num_hidden_layers"]), num_heads=heads,
              num_kv_heads=int(hf.get("num_key_value_heads") or heads),
              head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
              mlp_dim=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
              rope_theta=float(rope), vocab_size=vocab,
              max_length=int(hf.get("max_position_embeddings", 2048)))


def _vision_settings(state, prefix: str, clip_hf: dict | None, base) -> dict:
  """CLIP tower sizes from the weights; heads from the CLIP config (else base, else width / 64)."""
  patch = state[prefix + "embeddings.patch_embedding.weight"].shape  # [D, 3, p, p]
  positions = state[prefix + "embeddings.position_embedding.weight"].shape[0] - 1
  grid = int(round(np.sqrt(positions)))
  width = int(patch[0])
  out = dict(width=width, patch_size=int(patch[-1]), image_size=grid * int(patch[-1]),
             depth=_layer_count(state, re.escape(prefix) + r"encoder\.layers\.(\d+)\."),
             mlp_dim=int(state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]))
  if clip_hf:
    out["num_heads"] = int(clip_hf["num_attention_heads"])
    out["layer_norm_eps"] = float(clip_hf.get("layer_norm_eps", base.layer_norm_eps))
    if clip_hf.get("hidden_act", "quick_gelu") != "quick_gelu":
      raise CheckpointError(f"CLIP config: hidden_act={clip_hf['hidden_act']!r}; only quick_gelu")
  elif width != base.width:
    out["num_heads"] = max(1, width // 64)  # CLIP's head width
  return out


def _sam_settings(sa: Mapping, base) -> dict:
  """SAM sizes from segment_anything-layout weights (decoder heads cannot be read off them)."""
  ie = "image_encoder."
  patch = sa[ie + "patch_embed.proj.weight"].shape
  grid = int(sa[ie + "pos_embed"].shape[1])
  width, depth = int(patch[0]), _layer_count(sa, r"image_encoder\.blocks\.(\d+)\.")
  out = dict(width=width, depth=depth, patch_size=int(patch[-1]), image_size=grid * int(patch[-1]),
             mlp_dim=int(sa[ie + "blocks.0.mlp.lin1.weight"].shape[0]),
             out_chans=int(sa[ie + "neck.0.weight"].shape[0]),
             prompt_embed_dim=int(sa["mask_decoder.iou_token.weight"].shape[1]),
             decoder_depth=_layer_count(sa, r"mask_decoder\.transformer\.layers\.(\d+)\."),
             decoder_mlp_dim=int(sa["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
             num_multimask_outputs=int(sa["mask_decoder.mask_tokens.weight"].shape[0]) - 1,
             iou_head_depth=_layer_count(sa, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
             iou_head_hidden_dim=int(sa["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]))
  if "prompt_encoder.mask_downscaling.3.weight" in sa:  # optional (see sam.OPTIONAL_PREFIX)
    out["mask_in_chans"] = int(sa["prompt_encoder.mask_downscaling.3.weight"].shape[0])
  adapter_key = ie + "blocks.0.Adapter.channel.0.weight"
  out["adapter"] = adapter_key in sa
  out["adapter_dim"] = int(sa[adapter_key].shape[0]) if adapter_key in sa else 0
  out["use_rel_pos"] = ie + "blocks.0.attn.rel_pos_h" in sa
  if out["use_rel_pos"]:
    rel = [sa[f"{ie}blocks.{i}.attn.rel_pos_h"].shape for i in range(depth)]
    out["num_heads"] = width // int(rel[0][1])
    sizes = [(int(s[0]) + 1) // 2 for s in rel]  # rel_pos has 2 * size - 1 rows
    windowed = [s for s in sizes if s != grid]
    out["global_attn_indexes"] = tuple(i for i, s in enumerate(sizes) if s == grid)
    if windowed:
      out["window_size"] = windowed[0]
  elif width != base.width:
    out["num_heads"] = max(1, width // 64)
  return out


def _segment_anything_view(state: Mapping, base_sam) -> dict:
  """SAM weights of any supported layout, as segment_anything keys (for reading sizes)."""
  layout = sam_io.detect_layout(state)
  if layout == "medplib":
    state = {k[len(SAM_PREFIX):]: v for k, v in state.items() if k.startswith(SAM_PREFIX)}
    layout = sam_io.detect_layout(state)
  if layout == "hf":
    state, _ = sam_io.hf_to_segment_anything(state, base_sam)
  return state


def build_config(hf: dict, state: Mapping, vision_state: Mapping, vision_prefix: str,
                 clip_hf: dict | None, sam_state: Mapping, size: str = "7b", overrides=()):
  """The stage config of a converted model (see the module docstring for where fields come from)."""
  llm = _llm_settings(hf, state)
  moe = _moe_settings(hf, state, llm["depth"])
  cfg = (stage4_moe if moe["num_experts"] > 1 else stage3_ground).get_config(size)
  ours = (hf.get(OUR_CONFIG_FIELD) or {}).get("model") or {}
  for name, value in ours.items():  # what an export from here recorded; sizes are re-read below
    if isinstance(value, Mapping):
      for k, v in value.items():
        _set(cfg, f"model.{name}.{k}", v)
    else:
      _set(cfg, f"model.{name}", value)
  for k, v in llm.items():
    _set(cfg, f"model.llm.{k}", v)
  for k, v in moe.items():
    _set(cfg, f"model.moe.{k}", v)
  cfg.model.projector.type = hf.get("mm_projector_type", cfg.model.projector.type)
  try:
    vision = _vision_settings(vision_state, vision_prefix, clip_hf, cfg.model.vision)
    sam = _sam_settings(_segment_anything_view(sam_state, cfg.model.sam), cfg.model.sam)
  except KeyError as e:
    raise CheckpointError(f"missing key {e.args[0]!r} (needed to read the model sizes)") from e
  if "mm_vision_select_layer" in hf:
    vision["select_layer"] = int(hf["mm_vision_select_layer"])
  # Our exports hold only the tower layers the model computes; the full depth is in our block.
  vision["depth"] = max(vision["depth"], int((ours.get("vision") or {}).get("depth", 0)))
  for k, v in vision.items():
    _set(cfg, f"model.vision.{k}", v)
  for k, v in sam.items():
    _set(cfg, f"model.sam.{k}", v)
  for item in overrides.items() if isinstance(overrides, Mapping) else overrides:
    key, value = parse_override(item) if isinstance(item, str) else item
    _set(cfg, key, value)
  cfg.data.max_length = min(cfg.data.max_length, cfg.model.llm.max_length)
  if "out_dim" in hf and int(hf["out_dim"]) != cfg.model.sam.prompt_embed_dim:
    raise CheckpointError(f"config.json: out_dim={hf['out_dim']} but SAM's prompt width is "
                          f"{cfg.model.sam.prompt_embed_dim}")
  return cfg


# ---- import ------------------------------------------------------------------------------------

def _expected_params(cfg) -> dict:
  """flat {path: shape} of `MedPLIB(cfg.model)` params, from eval_shape (nothing allocated)."""
  abstract = abstract_variables(MedPLIB(cfg.model, None), cfg.data.max_length)
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(abstract["params"]), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def check_params(params, cfg) -> None:
  """Every param the model needs is present with its shape, and nothing else (names the path)."""
  expected = _expected_params(cfg)
  got = flax.traverse_util.flatten_dict(params, sep="/")
  missing = sorted(set(expected) - set(got))
  # SAM's mask-prompt layers are kept when the checkpoint has them, though MedPLIB never calls them.
  extra = sorted(k for k in set(got) - set(expected) if not k.startswith(OPTIONAL_SAM))
  if missing or extra:
    raise CheckpointError(f"converted params do not fit the model: missing {missing[:10]}, "
                          f"unexpected {extra[:10]}")
  for k, shape in expected.items():
    if tuple(np.shape(got[k])) != shape:
      raise CheckpointError(f"converted param {k!r} has shape {tuple(np.shape(got[k]))}, "
                            f"the model expects {shape}")


def _linear(ledger, key, in_dim, out_dim):
  return {"kernel": ledger.take(f"{key}.weight", (out_dim, in_dim)).T,
          "bias": ledger.take(f"{key}.bias", (out_dim,))}


def import_medplib(path: str, clip: str | None = None, sam: str | None = None, size: str = "7b",
                   overrides=()):
  """A MedPLIB checkpoint directory -> (params, config, report).

  path: the checkpoint directory. clip: a CLIP directory / weights file used for the vision
  tower (required when the checkpoint has none). sam: a SAM / SAM-Med2D weights file used when the
  checkpoint has no `model.visual_model.*` keys (or to replace them). size: the stage config the
  model is built on ('7b' or 'tiny'); overrides: 'field.path=value' strings or a {path: value}
  mapping applied last. params: nested dicts of float32 numpy arrays shaped like
  `MedPLIB(config.model)`'s params. report: per-component KeyLedger reports, `unmapped` (every
  checkpoint key no component took), `missing`, `notes`.
  """
  path = os.fspath(path)
  hf = read_hf_config(path)
  state = read_state_dict(path)
  notes = []
  ledger = KeyLedger(state, path)

  if clip is not None:
    clip_state = read_state_dict(os.fspath(clip))
    vision_prefix = clip_io.detect_clip_prefix(clip_state)
    clip_cfg_path = os.path.join(os.fspath(clip), "config.json")
    clip_hf = None
    if os.path.isfile(clip_cfg_path):
      with open(clip_cfg_path) as f:
        clip_hf = json.load(f)
      clip_hf = clip_hf.get("vision_config", clip_hf)
    if any(k.startswith(VISION_PREFIX) for k in state):
      notes.append(f"vision tower keys in the checkpoint were ignored in favour of {clip}")
  elif any(k.startswith(VISION_PREFIX) for k in state):
    clip_state, vision_prefix, clip_hf = state, VISION_PREFIX, None
  else:
    raise CheckpointError(f"{path}: no vision tower keys ({VISION_PREFIX}*); pass the CLIP "
                          "directory (--clip)")

  if sam is not None:
    sam_state = read_state_dict(os.fspath(sam))
    if any(k.startswith(SAM_PREFIX) for k in state):
      notes.append(f"SAM keys in the checkpoint were ignored in favour of {sam}")
  elif any(k.startswith(SAM_PREFIX) for k in state):
    sam_state = {k: v for k, v in state.items() if k.startswith(SAM_PREFIX)}
  else:
    raise CheckpointError(f"{path}: no SAM keys ({SAM_PREFIX}*); pass sam-med2d_b.pth (--sam)")

  cfg = build_config(hf, state, clip_state, vision_prefix, clip_hf, sam_state, size, overrides)
  m = cfg.model
  reports = {}
  vision_source = ledger if clip is None else KeyLedger(clip_state, os.fspath(clip))
  vision, reports["vision"] = clip_io.load_clip_vision(vision_source, m.vision, prefix=vision_prefix)
  projector, reports["projector"] = clip_io.load_projector(
      ledger, m.projector.type, PROJECTOR_PREFIX, in_width=m.vision.width, out_width=m.llm.width)
  region, reports["region_adapter"] = clip_io.load_region_adapter(
      ledger, REGION_PREFIX, in_width=m.vision.width, out_width=m.llm.width)
  fcs = {"fc1": _linear(ledger, TEXT_FCS[0], m.llm.width, m.llm.width),
         "fc2": _linear(ledger, TEXT_FCS[1], m.llm.width, m.sam.prompt_embed_dim)}
  reports["text_hidden_fcs"] = ledger.report("model.text_hidden_fcs.")
  llm, llm_report = llama_io.load_llama(state, m.llm, m.moe)
  reports["llm"] = {**llm_report, "unmapped": []}  # the rest of the checkpoint is not its business
  sam_params, reports["sam"] = sam_io.load_sam(sam_state, m.sam)

  used = set(ledger.used) | (set(state) - set(llm_report["unmapped"]))
  if sam is None:
    used |= set(sam_state) - set(reports["sam"]["unmapped"])
  params = {"vision": vision, "projector": projector, "region_adapter": region, "llm": llm,
            "text_hidden_fcs": fcs, "sam": sam_params}
  check_params(params, cfg)
  unmapped = sorted(set(state) - used)
  missing = sorted({k for r in reports.values() for k in r.get("missing", [])})
  notes += [n for r in reports.values() for n in r.get("notes", [])]
  report = {"source": path, "components": reports, "unmapped": unmapped, "missing": missing,
            "notes": notes, "num_experts": int(m.moe.num_experts)}
  return params, cfg, report


# ---- export ------------------------------------------------------------------------------------

def _arr(x):
  return np.asarray(x, dtype=np.float32)


def _export_linear(out, key, p):
  out[f"{key}.weight"] = np.ascontiguousarray(_arr(p["kernel"]).T)
  out[f"{key}.bias"] = _arr(p["bias"])


def export_clip(params, vision_cfg, prefix: str = VISION_PREFIX) -> dict[str, np.ndarray]:
  """Inverse of `clip.load_clip_vision` (the layers that were built: up to the selected one)."""
  out = {}
  emb = prefix + "embeddings."
  out[emb + "patch_embedding.weight"] = np.ascontiguousarray(
      _arr(params["patch_embedding"]["kernel"]).transpose(3, 2, 0, 1))
  out[emb + "class_embedding"] = _arr(params["class_embedding"])
  out[emb + "position_embedding.weight"] = _arr(params["position_embedding"])
  for name in ("pre_layrnorm",):
    out[f"{prefix}{name}.weight"] = _arr(params[name]["scale"])
    out[f"{prefix}{name}.bias"] = _arr(params[name]["bias"])
  layers = params.get("layers", {})
  n = np.shape(layers["layer_norm1"]["scale"])[0] if layers else 0
  for i in range(n):
    layer = _index_layer(layers, i)
    lp = f"{prefix}encoder.layers.{i}."
    for norm in ("layer_norm1", "layer_norm2"):
      out[lp + norm + ".weight"] = layer[norm]["scale"]
      out[lp + norm + ".bias"] = layer[norm]["bias"]
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      _export_linear(out, lp + "self_attn." + name, layer["self_attn"][name])
    for name in ("fc1", "fc2"):
      _export_linear(out, lp + "mlp." + name, layer["mlp"][name])
  return out


def _index_layer(tree, i):
  if isinstance(tree, Mapping):
    return {k: _index_layer(v, i) for k, v in tree.items()}
  return _arr(tree)[i]


def export_medplib(params, config, clip=None, sam=None) -> dict[str, np.ndarray]:
  """Our params (LoRA merged) -> {reference key: float32 array} (inverse of `import_medplib`).

  config: the full stage config (or its `model` block). The CLIP layers above the selected one and
  `post_layernorm` are not part of our model; pass `clip` (a CLIP directory, weights file or state
  dict) to copy them into the output so the reference gets a complete vision tower. Likewise
  SAM's mask-prompt layers, absent from models trained here: `sam` (a SAM-Med2D file) fills them.
  """
  m = config.model if "model" in config else config
  params = flax.core.meta.unbox(params)
  params = params.get("params", params)
  out = export_clip(params["vision"], m.vision)
  proj = params["projector"]
  if m.projector.type == "linear":
    _export_linear(out, PROJECTOR_PREFIX.rstrip("."), proj["linear_1"])
  else:
    for i in range(len(proj)):
      _export_linear(out, f"{PROJECTOR_PREFIX}{2 * i}", proj[f"linear_{i + 1}"])
  _export_linear(out, REGION_PREFIX.rstrip("."), params["region_adapter"])
  _export_linear(out, TEXT_FCS[0], params["text_hidden_fcs"]["fc1"])
  _export_linear(out, TEXT_FCS[1], params["text_hidden_fcs"]["fc2"])
  out.update(llama_io.export_llama(_to_numpy(params["llm"]), m.llm, m.moe))
  out.update({k: _arr(v) for k, v in sam_io.export_sam(_to_numpy(params["sam"]), m.sam).items()})
  if clip is not None:
    clip_state = dict(clip) if isinstance(clip, Mapping) else read_state_dict(os.fspath(clip))
    prefix = clip_io.detect_clip_prefix(clip_state)
    for k, v in clip_state.items():
      if k.startswith(prefix) and VISION_PREFIX + k[len(prefix):] not in out:
        out[VISION_PREFIX + k[len(prefix):]] = np.asarray(v)
  if sam is not None:
    sam_state = dict(sam) if isinstance(sam, Mapping) else read_state_dict(os.fspath(sam))
    for k, v in _segment_anything_view(sam_state, m.sam).items():
      if SAM_PREFIX + k not in out and k not in ("pixel_mean", "pixel_std"):
        out[SAM_PREFIX + k] = np.asarray(v)
  return out


def _to_numpy(tree):
  if isinstance(tree, Mapping):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def reference_config(config, tokenizer=None) -> dict:
  """The HF config.json of an exported checkpoint (LLaVA / MedPLIB fields + our `medplib_jax`)."""
  m = config.model
  llm, moe = m.llm, m.moe
  out = {
      "architectures": ["MedPLIBForCausalLM" if moe.num_experts > 1 else "LISAForCausalLM"],
      "model_type": "medplib_moe_llama" if moe.num_experts > 1 else "llava",
      "hidden_size": llm.width, "intermediate_size": llm.mlp_dim,
      "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
      "num_hidden_layers": llm.depth, "head_dim": llm.head_dim, "vocab_size": llm.vocab_size,
      "rms_norm_eps": llm.norm_eps, "rope_theta": llm.rope_theta, "rope_scaling": None,
      "max_position_embeddings": llm.max_length, "hidden_act": "silu",
      "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
      "torch_dtype": "float32", "use_cache": True,
      "mm_projector_type": m.projector.type, "mm_hidden_size": m.vision.width,
      "mm_vision_select_layer": m.vision.select_layer, "mm_vision_select_feature": "patch",
      "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_use_im_start_end": True,
      "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
      "out_dim": m.sam.prompt_embed_dim, "train_mask_decoder": True,
      OUR_CONFIG_FIELD: {"model": m.to_dict()},
  }
  if tokenizer is not None:
    out.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
               pad_token_id=tokenizer.pad_id)
  if moe.num_experts > 1:
    out["moe"] = {
        "moe_enable": True, "moe_mode": "dense", "moe_layers_idx": list(range(llm.depth)),
        "num_experts": [moe.num_experts] * llm.depth, "ep_size": 1, "top_k_experts": moe.top_k,
        "capacity_factor": moe.capacity_factor_train, "eval_capacity_factor": moe.capacity_factor_eval,
        "min_capacity": moe.min_capacity, "use_residual": False,
        "router_aux_loss_coef": moe.aux_loss_coef}
  return json.loads(json.dumps(out, default=list))


# ---- writing safetensors -----------------------------------------------------------------------

def _write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  header, offset = {}, 0
  for name, value in tensors.items():
    code = _SAFETENSORS_CODES.get(np.dtype(value.dtype))
    if code is None:
      raise CheckpointError(f"{name}: dtype {value.dtype} cannot be written to safetensors")
    header[name] = {"dtype": code, "shape": list(value.shape),
                    "data_offsets": [offset, offset + value.nbytes]}
    offset += value.nbytes
  header["__metadata__"] = {"format": "pt"}  # transformers requires it
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for value in tensors.values():
      f.write(np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False).tobytes())


def write_torch_checkpoint(state_dict: Mapping[str, np.ndarray], out_dir: str,
                           shard_bytes: int = DEFAULT_SHARD_BYTES, dtype=None) -> list[str]:
  """Writes `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of at most
  `shard_bytes` (a bigger tensor gets a shard of its own) plus `model.safetensors.index.json`.

  dtype: cast floating tensors (e.g. "bfloat16") as written. Returns the written file names.
  """
  os.makedirs(out_dir, exist_ok=True)
  cast = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype) if dtype else None

  def prepared(v):
    v = np.asarray(v)
    floating = np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16
    return v.astype(cast) if cast is not None and floating else v

  shards, current, size = [], [], 0
  for name, value in state_dict.items():
    nbytes = np.asarray(value).size * (cast.itemsize if cast is not None else np.asarray(value).itemsize)
    if current and size + nbytes > shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(name)
    size += nbytes
  if current:
    shards.append(current)
  if len(shards) <= 1:
    _write_safetensors(os.path.join(out_dir, "model.safetensors"),
                       {k: prepared(state_dict[k]) for k in state_dict})
    return ["model.safetensors"]
  names, weight_map, total = [], {}, 0
  for i, keys in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {k: prepared(state_dict[k]) for k in keys}
    _write_safetensors(os.path.join(out_dir, name), tensors)
    total += sum(v.nbytes for v in tensors.values())
    weight_map.update({k: name for k in keys})
    names.append(name)
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
  return names + ["model.safetensors.index.json"]
