"""Full-checkpoint import / export (checkpoint/medplib.py, `medplib convert`).

A tiny MedPLIB is assembled here from tiny torch parts (transformers CLIPVisionModel, LlamaForCausalLM
dense and with 2-expert top-1 MoE FFNs written below, SamModel) plus torch Linear layers, saved in
the reference key layout (safetensors, 2 shards + index) and imported. The reference forward is a
torch composition written here from the same parts.
"""

import copy
import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from torch import nn as tnn
from torch.nn import functional as F

import flax
import jax

from configs.common import sam_config
from medplib_jax.data.tokenizer import ADDED_TOKENS
from medplib_jax import cli as medplib_cli
from medplib_jax.checkpoint import cli as convert_cli, model_dir
from medplib_jax.checkpoint.medplib import (export_medplib, import_medplib, reference_config,
                                            write_torch_checkpoint)
from medplib_jax.checkpoint.sam import hf_to_segment_anything
from medplib_jax.checkpoint.torch_io import CheckpointError
from medplib_jax.data.tokenizer import train_tokenizer
from medplib_jax.models.medplib import MedPLIB

torch.set_num_threads(1)
TOL = 1e-4
BASE_VOCAB = 300
VOCAB = BASE_VOCAB + len(ADDED_TOKENS)
CLIP_IMAGE, CLIP_PATCH, GRID = 56, 14, 4
SAM_IMAGE = 64
LLM_WIDTH, SAM_DIM = 64, 32
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
UNUSED_CLIP = (VISION_PREFIX + "encoder.layers.1.", VISION_PREFIX + "post_layernorm.")


def _tok(name):
  return BASE_VOCAB + ADDED_TOKENS.index(name)


class TopOneMoE(tnn.Module):
  """DeepSpeed MoE at eval, top-1: softmax(wg x), argmax, chosen expert's output * its prob."""

  def __init__(self, config, num_experts=2):
    super().__init__()
    from transformers.models.llama.modeling_llama import LlamaMLP
    self.deepspeed_moe = tnn.Module()
    self.deepspeed_moe.gate = tnn.Module()
    self.deepspeed_moe.gate.wg = tnn.Linear(config.hidden_size, num_experts, bias=False)
    self.deepspeed_moe.experts = tnn.Module()
    self.deepspeed_moe.experts.deepspeed_experts = tnn.ModuleList(
        [LlamaMLP(config) for _ in range(num_experts)])
    self.chosen = None

  def forward(self, x):
    probs = torch.softmax(self.deepspeed_moe.gate.wg(x.float()), dim=-1)
    chosen = probs.argmax(-1)
    self.chosen = chosen
    out = torch.zeros_like(x)
    for e, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
      hit = (chosen == e).unsqueeze(-1).to(x.dtype)
      out = out + hit * probs[..., e:e + 1] * expert(x)
    return out


def _randomise(module, scale):
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn_like(p))


def _parts():
  import transformers
  from transformers.models.sam.configuration_sam import (SamMaskDecoderConfig,
                                                         SamPromptEncoderConfig, SamVisionConfig)
  torch.manual_seed(0)
  clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
      image_size=CLIP_IMAGE, patch_size=CLIP_PATCH)).eval()
  llama_cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=LLM_WIDTH, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
      max_position_embeddings=128, tie_word_embeddings=False)
  llama_cfg._attn_implementation = "eager"
  dense = transformers.LlamaForCausalLM(llama_cfg).eval()
  _randomise(dense, 0.02)
  moe = copy.deepcopy(dense)
  for layer in moe.model.layers:
    layer.mlp = TopOneMoE(llama_cfg)
  _randomise(moe, 0.0)
  with torch.no_grad():
    for layer in moe.model.layers:  # decisive routing, so both experts get tokens
      layer.mlp.deepspeed_moe.gate.wg.weight.normal_(0.0, 1.0)
  sam = transformers.SamModel(transformers.SamConfig(
      vision_config=SamVisionConfig(hidden_size=32, output_channels=SAM_DIM, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=SAM_IMAGE, patch_size=16,
                                    mlp_dim=64, window_size=2, global_attn_indexes=[1],
                                    num_pos_feats=16).to_dict(),
      prompt_encoder_config=SamPromptEncoderConfig(hidden_size=SAM_DIM, image_size=SAM_IMAGE,
                                                   patch_size=16, mask_input_channels=16).to_dict(),
      mask_decoder_config=SamMaskDecoderConfig(hidden_size=SAM_DIM, mlp_dim=64, num_hidden_layers=2,
                                               num_attention_heads=2, iou_head_hidden_dim=32,
                                               layer_norm_eps=1e-5).to_dict())).eval()
  _randomise(sam, 0.2)  # rel_pos / pos_embed start at zero
  sam.config._attn_implementation = "eager"
  projector = tnn.Sequential(tnn.Linear(128, LLM_WIDTH), tnn.GELU(), tnn.Linear(LLM_WIDTH, LLM_WIDTH))
  region = tnn.Linear(128, LLM_WIDTH)
  fcs = tnn.ModuleList([tnn.Sequential(tnn.Linear(LLM_WIDTH, LLM_WIDTH), tnn.ReLU(),
                                       tnn.Linear(LLM_WIDTH, SAM_DIM), tnn.Dropout(0.0))])
  return dict(clip=clip, dense=dense, moe=moe, sam=sam, projector=projector, region=region,
              fcs=fcs, llama_cfg=llama_cfg)


def _np(module, prefix=""):
  return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _clip_keys(clip):
  out = {}
  for k, v in _np(clip).items():
    if "position_ids" in k:
      continue
    out[VISION_PREFIX + (k[len("vision_model."):] if k.startswith("vision_model.") else k)] = v
  return out


def _sam_segment_anything(sam):
  state, _ = hf_to_segment_anything(_np(sam), sam_config("tiny"))
  return state


def _write_checkpoint(path, parts, llm, with_clip=True, with_sam=True):
  """The reference layout: config.json, 2 safetensors shards + index, tokenizer files."""
  os.makedirs(path, exist_ok=True)
  train_tokenizer(["Please segment the liver. Sure, <SEG>.", "What is in the box? A kidney."] * 4,
                  path, vocab_size=BASE_VOCAB)
  state = _np(parts[llm])
  state.update(_np(parts["projector"], "model.mm_projector."))
  state.update(_np(parts["region"], "model.region_fea_adapter."))
  state.update(_np(parts["fcs"], "model.text_hidden_fcs."))
  if with_clip:
    state.update(_clip_keys(parts["clip"]))
  if with_sam:
    state.update({"model.visual_model." + k: v for k, v in _sam_segment_anything(parts["sam"]).items()})
  keys = sorted(state)
  weight_map = {}
  for i, chunk in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
    name = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({k: np.ascontiguousarray(state[k]) for k in chunk}, os.path.join(path, name),
              metadata={"format": "pt"})
    weight_map.update({k: name for k in chunk})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  hf = parts["llama_cfg"].to_dict()
  hf.update(mm_projector_type="mlp2x_gelu", mm_hidden_size=128, mm_vision_select_layer=-2,
            out_dim=SAM_DIM, architectures=["MedPLIBForCausalLM"])
  if llm == "moe":
    hf["moe"] = dict(moe_enable=True, moe_mode="dense", moe_layers_idx=[0, 1], num_experts=[2, 2],
                     top_k_experts=1, capacity_factor=1.5, eval_capacity_factor=2.0,
                     min_capacity=4, use_residual=False, router_aux_loss_coef=0.0)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  return state


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  parts = _parts()
  root = tmp_path_factory.mktemp("convert")
  moe_dir = str(root / "medplib_moe")
  _write_checkpoint(moe_dir, parts, "moe")
  # Dense: vision tower from a separate CLIP directory, SAM from a sam-med2d-style .pth.
  dense_dir = str(root / "medplib_dense")
  _write_checkpoint(dense_dir, parts, "dense", with_clip=False, with_sam=False)
  clip_dir = str(root / "clip")
  parts["clip"].save_pretrained(clip_dir)
  sam_file = str(root / "sam.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in
                        _sam_segment_anything(parts["sam"]).items()}}, sam_file)
  return dict(parts=parts, root=root, moe_dir=moe_dir, dense_dir=dense_dir, clip_dir=clip_dir,
              sam_file=sam_file)


def _sample():
  rng = np.random.default_rng(0)
  n_img = GRID * GRID
  text = lambda n: list(rng.integers(3, BASE_VOCAB, n))  # noqa: E731
  ids = ([1] + text(5) + [_tok("<im_start>")] + [0] * n_img + [_tok("<im_end>")] + text(3)
         + [_tok("<region>"), 0, _tok("</region>")] + text(3) + [_tok("<SEG>")] + text(2))
  ids = np.array(ids, np.int32)
  image_start = 7
  region_pos = image_start + n_img + 1 + 3 + 1
  seg_pos = int(np.nonzero(ids == _tok("<SEG>"))[0][0])
  region = np.zeros((GRID, GRID), bool)
  region[1, 1] = region[1, 2] = region[2, 1] = True
  length = len(ids)
  return dict(
      input_ids=ids[None], attention_mask=np.ones((1, length), bool),
      labels=np.full((1, length), -100, np.int32), image_start=np.array([image_start], np.int32),
      clip_image=rng.normal(size=(1, CLIP_IMAGE, CLIP_IMAGE, 3)).astype(np.float32),
      region_positions=np.array([[region_pos]], np.int32), region_masks=region[None, None],
      sam_image=rng.normal(size=(1, SAM_IMAGE, SAM_IMAGE, 3)).astype(np.float32),
      sam_resized_hw=np.array([[SAM_IMAGE, SAM_IMAGE]], np.int32),
      seg_positions=np.array([[seg_pos]], np.int32),
      masks=np.zeros((1, 1, SAM_IMAGE, SAM_IMAGE), bool), orig_hw=np.array([[SAM_IMAGE] * 2], np.int32))


def _torch_reference(parts, llm, batch):
  """The MedPLIB forward composed in torch: image + region splice, Llama, <SEG> -> SAM decoder."""
  with torch.no_grad():
    ids = torch.from_numpy(batch["input_ids"]).long()
    embeds = llm.model.embed_tokens(ids).clone()
    pixels = torch.from_numpy(batch["clip_image"]).permute(0, 3, 1, 2)
    feats = parts["clip"](pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    start = int(batch["image_start"][0])
    embeds[:, start:start + feats.shape[1]] = parts["projector"](feats)
    adapted = parts["region"](feats).reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)
    rows, cols = np.nonzero(batch["region_masks"][0, 0])
    grid = torch.tensor(np.stack([cols / GRID, rows / GRID], -1) * 2 - 1, dtype=torch.float32)
    sampled = F.grid_sample(adapted, grid[None, None], mode="bilinear", align_corners=True)
    embeds[:, int(batch["region_positions"][0, 0])] = sampled[0, :, 0].mean(-1)
    hidden = llm.model(inputs_embeds=embeds).last_hidden_state
    logits = llm.lm_head(hidden)
    seg = int(batch["seg_positions"][0, 0])
    prompt = parts["fcs"][0](hidden[:, seg - 1])  # [1, C]
    sam = parts["sam"]
    image_emb = sam.get_image_embeddings(torch.from_numpy(batch["sam_image"]).permute(0, 3, 1, 2))
    _, dense = sam.prompt_encoder(None, None, None, None)
    masks, iou = sam.mask_decoder(image_emb, sam.get_image_wide_positional_embeddings(),
                                  prompt[None, None], dense, multimask_output=False)[:2]
  return logits.numpy(), masks[0, 0, 0].numpy(), iou[0, 0, 0].numpy()


@pytest.mark.parametrize("variant", ["moe", "dense"])
def test_imported_model_matches_torch_composition(setup, variant):
  parts = setup["parts"]
  if variant == "moe":
    params, cfg, report = import_medplib(setup["moe_dir"], size="tiny")
    # The tower's last layer and post_layernorm are not used (select_layer -2).
    assert report["unmapped"] and all(k.startswith(UNUSED_CLIP) for k in report["unmapped"])
  else:
    params, cfg, report = import_medplib(setup["dense_dir"], clip=setup["clip_dir"],
                                         sam=setup["sam_file"], size="tiny")
    assert report["unmapped"] == []
  assert report["missing"] == []
  m = cfg.model
  assert m.moe.num_experts == (2 if variant == "moe" else 1)
  assert (m.llm.width, m.llm.num_kv_heads, m.llm.vocab_size) == (LLM_WIDTH, 2, VOCAB)
  assert (m.vision.width, m.vision.num_heads, m.vision.image_size) == (128, 2, CLIP_IMAGE)
  assert (m.sam.width, m.sam.window_size, tuple(m.sam.global_attn_indexes), m.sam.adapter) == (
      32, 2, (1,), False)

  batch = _sample()
  model = MedPLIB(m, None)
  out = jax.jit(lambda p, b: model.apply({"params": p}, b, deterministic=True))(params, batch)
  llm = parts[variant]
  ref_logits, ref_mask, ref_iou = _torch_reference(parts, llm, batch)
  if variant == "moe":
    chosen = torch.cat([layer.mlp.chosen.flatten() for layer in llm.model.layers])
    assert 0 < int(chosen.sum()) < chosen.numel()  # both experts were used
  np.testing.assert_allclose(np.asarray(out["logits"]), ref_logits, atol=TOL, rtol=TOL)
  assert out["mask_logits"].shape == (1, 1) + ref_mask.shape
  np.testing.assert_allclose(np.asarray(out["mask_logits"][0, 0]), ref_mask, atol=TOL, rtol=TOL)
  np.testing.assert_allclose(np.asarray(out["iou_pred"][0, 0]), ref_iou, atol=TOL, rtol=TOL)


def _weight_map(path):
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    return json.load(f)["weight_map"]


def _assert_bitwise(a, b):
  fa = flax.traverse_util.flatten_dict(a, sep="/")
  fb = flax.traverse_util.flatten_dict(b, sep="/")
  assert sorted(fa) == sorted(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes(), k


def test_cli_import_export_import_is_bitwise(setup, capsys):
  root = setup["root"]
  ours = str(root / "ours")
  assert medplib_cli.main(["convert", "--medplib", setup["moe_dir"], "--out", ours, "--size", "tiny",
                           "--summary"]) == 0
  printed = capsys.readouterr().out
  assert "llm" in printed and "sam" in printed and "total" in printed
  assert sorted(os.listdir(ours)) == ["config.json", "convert_report.json", "params", "tokenizer"]
  # --dtype auto takes the checkpoint's torch_dtype: a float32 checkpoint is not run in bfloat16.
  assert model_dir.load_config(ours).model.dtype == "float32"
  assert convert_cli.import_dtype("auto", {"torch_dtype": "bfloat16"}) == "bfloat16"
  assert convert_cli.import_dtype("auto", {"torch_dtype": "float16"}) == "bfloat16"
  assert convert_cli.import_dtype("auto", {}) == "float32"
  assert convert_cli.import_dtype("float32", {"torch_dtype": "bfloat16"}) == "float32"
  first, cfg, _ = import_medplib(setup["moe_dir"], size="tiny")

  from medplib_jax.infer.api import MedPLIB as Api
  from medplib_jax.models.llama import inference_layout
  api = Api.from_pretrained(ours)  # params, config and tokenizer fit together
  # The API holds the LLM in the inference layout: the same bytes, unrolled and split.
  _, _, first_llm = inference_layout(cfg.model.llm, cfg.model.moe, first["llm"])
  _assert_bitwise(dict(first, llm=first_llm), jax.tree.map(np.asarray, api.params))

  torch_dir = str(root / "exported")
  assert medplib_cli.main(["convert", "--export-torch", "--checkpoint", ours, "--out", torch_dir,
                           "--shard-gb", str(200e3 / 2**30)]) == 0
  files = os.listdir(torch_dir)
  assert "model.safetensors.index.json" in files and "tokenizer.json" in files
  weight_map = _weight_map(torch_dir)
  shards = sorted(set(weight_map.values()))
  assert len(shards) > 1
  exported = {}
  for shard in shards:  # an independent reader: the safetensors package
    exported.update(load_file(os.path.join(torch_dir, shard)))
  assert set(exported) == set(weight_map)
  reference = export_medplib(first, cfg)
  assert set(exported) == set(reference)
  # Same layout as the source checkpoint, except the unused last CLIP layer / post_layernorm.
  source = set(_weight_map(setup["moe_dir"]))
  assert set(exported) == {k for k in source if not k.startswith(UNUSED_CLIP)}

  second, cfg2, report = import_medplib(torch_dir, size="tiny")
  assert report["unmapped"] == [] and report["missing"] == []
  assert cfg2.model.to_dict() == cfg.model.to_dict()
  _assert_bitwise(first, second)

  # With the CLIP given, the export is complete (all source keys).
  full = export_medplib(first, cfg, clip=setup["clip_dir"])
  assert set(full) == source


def test_sam_med2d_adapter_roundtrip(tmp_path):
  """Random params of the tiny stage-4 model (SAM-Med2D adapters, MoE) survive export -> import."""
  from configs import stage4_moe
  from medplib_jax.checkpoint.medplib import _expected_params
  cfg = stage4_moe.get_config("tiny")
  rng = np.random.default_rng(0)
  flat = {k: rng.normal(size=s).astype(np.float32) for k, s in _expected_params(cfg).items()}
  params = flax.traverse_util.unflatten_dict(flat, sep="/")
  write_torch_checkpoint(export_medplib(params, cfg), str(tmp_path), shard_bytes=2**20)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(reference_config(cfg), f)
  back, cfg2, report = import_medplib(str(tmp_path), size="7b")  # sizes come from the checkpoint
  assert report["unmapped"] == [] and report["missing"] == []
  assert cfg2.model.sam.adapter and cfg2.model.to_dict() == cfg.model.to_dict()
  _assert_bitwise(params, back)


# ---- errors ----------------------------------------------------------------------------------

def _single_file_copy(setup, tmp_path, edit):
  state = {}
  src = setup["moe_dir"]
  for name in sorted(set(_weight_map(src).values())):
    state.update(load_file(os.path.join(src, name)))
  edit(state)
  save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(src, "config.json")) as f, open(tmp_path / "config.json", "w") as g:
    g.write(f.read())
  return str(tmp_path)


def test_missing_key_is_named(setup, tmp_path):
  key = "model.layers.1.self_attn.k_proj.weight"
  path = _single_file_copy(setup, tmp_path, lambda s: s.pop(key))
  with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
    import_medplib(path, size="tiny")


def test_shape_mismatch_names_both_shapes(setup, tmp_path):
  key = "model.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts.0.gate_proj.weight"

  def edit(state):
    state[key] = np.ascontiguousarray(state[key].T)  # [64, 96] instead of [96, 64]

  path = _single_file_copy(setup, tmp_path, edit)
  with pytest.raises(CheckpointError) as err:
    import_medplib(path, size="tiny")
  assert key in str(err.value) and "(64, 96)" in str(err.value) and "(96, 64)" in str(err.value)


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_pickle_with_code_is_refused(setup, tmp_path):
  marker = tmp_path / "marker"
  torch.save({"model.embed_tokens.weight": _Payload(str(marker))}, tmp_path / "pytorch_model.bin")
  with open(os.path.join(setup["moe_dir"], "config.json")) as f, open(tmp_path / "config.json", "w") as g:
    g.write(f.read())
  with pytest.raises(CheckpointError, match="refused"):
    import_medplib(str(tmp_path), size="tiny")
  assert not marker.exists()
  code = medplib_cli.main(["convert", "--medplib", str(tmp_path), "--out", str(tmp_path / "o")])
  assert code == 1 and not marker.exists()
