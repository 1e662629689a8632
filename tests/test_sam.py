"""SAM / SAM-Med2D against independent torch references on the same random tiny weights.

* stock SAM: a random tiny `transformers.SamModel`, saved and imported through `load_sam`.
* SAM-Med2D adapters: a torch adapter written here from the SPEC description, spliced into the HF
  encoder's blocks, saved as a `{"model": state_dict}` .pth in the segment_anything layout.
"""

import functools

import numpy as np
import pytest
import torch
from torch import nn as tnn

import jax
import jax.numpy as jnp
import ml_collections

from configs.common import sam_config
from medplib_jax.checkpoint.sam import (detect_layout, export_sam, hf_to_segment_anything,
                                        load_sam, _expected_shapes)
from medplib_jax.checkpoint.torch_io import CheckpointError
from medplib_jax.models.sam import SamMed2D
from medplib_jax.models.sam_image_encoder import Adapter

torch.set_num_threads(1)
TOL = 1e-4
IMAGE, PATCH, GRID = 96, 16, 6  # grid 6 with window 4: windowed blocks pad to 8


def _config(adapter=False):
  return ml_collections.ConfigDict(dict(
      image_size=IMAGE, patch_size=PATCH, width=32, depth=4, num_heads=2, mlp_dim=64,
      window_size=4, global_attn_indexes=(1, 3), use_rel_pos=True, adapter=adapter,
      adapter_dim=8, out_chans=32, prompt_embed_dim=32, decoder_depth=2, decoder_mlp_dim=64,
      decoder_num_heads=2, num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=32,
      mask_in_chans=16))


def _hf_model():
  from transformers import SamConfig, SamModel
  from transformers.models.sam.configuration_sam import (SamMaskDecoderConfig,
                                                         SamPromptEncoderConfig, SamVisionConfig)
  vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=4,
                           num_attention_heads=2, image_size=IMAGE, patch_size=PATCH, mlp_dim=64,
                           window_size=4, global_attn_indexes=[1, 3], num_pos_feats=16)
  prompt = SamPromptEncoderConfig(hidden_size=32, image_size=IMAGE, patch_size=PATCH,
                                  mask_input_channels=16)
  # segment_anything's two-way transformer LayerNorms use torch's default eps 1e-5.
  decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=2,
                                 num_attention_heads=2, iou_head_hidden_dim=32,
                                 layer_norm_eps=1e-5)
  torch.manual_seed(0)
  model = SamModel(SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                             mask_decoder_config=decoder.to_dict()),).eval()
  with torch.no_grad():  # every parameter random, including the zero-initialised rel_pos / pos_embed
    for name, p in model.named_parameters():
      p.add_(0.2 * torch.randn_like(p))
  model.config._attn_implementation = "eager"
  return model


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
  hf = _hf_model()
  path = tmp_path_factory.mktemp("hf_sam")
  hf.save_pretrained(path)
  cfg = _config()
  params, report = load_sam(str(path), cfg)
  return hf, cfg, {"params": params}, report


def _images(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)


def _points(n, p, seed=1):
  rng = np.random.default_rng(seed)
  coords = rng.uniform(0, IMAGE, size=(n, p, 2)).astype(np.float32)
  labels = rng.integers(-1, 2, size=(n, p)).astype(np.int32)
  return coords, labels


def _boxes(n, seed=2):
  rng = np.random.default_rng(seed)
  xy0 = rng.uniform(0, IMAGE / 2, size=(n, 2))
  return np.concatenate([xy0, xy0 + rng.uniform(8, IMAGE / 2, size=(n, 2))], 1).astype(np.float32)


def _prompt_encoder(module, *args, **kwargs):
  return module.prompt_encoder(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _jitted(adapter):
  """Jitted encode / decode for the test config (eager `apply` is slow on 2 shared cores)."""
  model = SamMed2D(_config(adapter))
  encode = jax.jit(lambda p, x: model.apply(p, x, method=SamMed2D.encode_image))
  decode = jax.jit(lambda p, e, i, pts, b, s, mm: model.apply(
      p, e, i, points=pts, boxes=b, extra_sparse=s, multimask_output=mm, method=SamMed2D.decode),
      static_argnums=6)
  return encode, decode


def test_import_report_is_complete(stock):
  _, _, _, report = stock
  assert report["layout"] == "hf"
  assert report["unmapped"] == [] and report["missing"] == []


def test_image_embeddings_match_hf(stock):
  hf, cfg, params, _ = stock
  images = _images(2)
  with torch.no_grad():
    ref = hf.get_image_embeddings(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  ours = _jitted(False)[0](params, images)
  assert ours.shape == (2, GRID, GRID, 32)
  np.testing.assert_allclose(np.asarray(ours), ref.transpose(0, 2, 3, 1), atol=TOL, rtol=TOL)


def test_prompt_embeddings_match_hf(stock):
  hf, cfg, params, _ = stock
  model = SamMed2D(cfg)
  coords, labels = _points(3, 2)
  boxes = _boxes(3)
  masks = np.random.default_rng(3).normal(size=(3, 4 * GRID, 4 * GRID)).astype(np.float32)
  pe = hf.prompt_encoder
  with torch.no_grad():
    ref_pts, ref_dense = pe(torch.from_numpy(coords)[None], torch.from_numpy(labels)[None], None, None)
    ref_box, _ = pe(None, None, torch.from_numpy(boxes)[None], None)
    ref_both, _ = pe(torch.from_numpy(coords)[None], torch.from_numpy(labels)[None],
                     torch.from_numpy(boxes)[None], None)
    ref_mask = pe.mask_embed(torch.from_numpy(masks)[:, None]).numpy().transpose(0, 2, 3, 1)
    ref_image_pe = hf.get_image_wide_positional_embeddings()[0].numpy().transpose(1, 2, 0)

  sparse, dense = model.apply(params, 3, (coords, labels), method=_prompt_encoder)
  np.testing.assert_allclose(np.asarray(sparse), ref_pts[0].numpy(), atol=TOL, rtol=TOL)
  np.testing.assert_allclose(np.asarray(dense),
                             np.broadcast_to(ref_dense.detach().numpy().transpose(0, 2, 3, 1), dense.shape),
                             atol=TOL, rtol=TOL)
  sparse, _ = model.apply(params, 3, None, boxes, method=_prompt_encoder)
  np.testing.assert_allclose(np.asarray(sparse), ref_box[0].numpy(), atol=TOL, rtol=TOL)
  sparse, _ = model.apply(params, 3, (coords, labels), boxes, method=_prompt_encoder)
  assert sparse.shape == (3, 4, 32)  # no padding point when a box is given
  np.testing.assert_allclose(np.asarray(sparse), ref_both[0].numpy(), atol=TOL, rtol=TOL)
  _, dense = model.apply(params, 3, None, None, masks, method=_prompt_encoder)
  np.testing.assert_allclose(np.asarray(dense), ref_mask, atol=TOL, rtol=TOL)
  image_pe = model.apply(params, method=lambda m: m.prompt_encoder.dense_pe())
  np.testing.assert_allclose(np.asarray(image_pe), ref_image_pe, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("prompt", ["points", "boxes"])
@pytest.mark.parametrize("multimask", [False, True])
def test_masks_and_iou_match_hf(stock, prompt, multimask):
  hf, _, params, _ = stock
  images = _images(1, seed=4)
  n = 3
  coords, labels = _points(n, 3, seed=5)
  boxes = _boxes(n, seed=6)
  kwargs = ({"input_points": torch.from_numpy(coords)[None],
             "input_labels": torch.from_numpy(labels)[None]} if prompt == "points"
            else {"input_boxes": torch.from_numpy(boxes)[None]})
  with torch.no_grad():
    emb = hf.get_image_embeddings(torch.from_numpy(images).permute(0, 3, 1, 2))
    out = hf(image_embeddings=emb, multimask_output=multimask, **kwargs)
  ref_masks, ref_iou = out.pred_masks[0].numpy(), out.iou_scores[0].numpy()

  encode, decode = _jitted(False)
  ours_emb = encode(params, images)
  index = jnp.zeros((n,), jnp.int32)
  if prompt == "points":
    masks, iou = decode(params, ours_emb, index, (coords, labels), None, None, multimask)
  else:
    masks, iou = decode(params, ours_emb, index, None, boxes, None, multimask)
  k = 3 if multimask else 1
  assert masks.shape == (n, k, 4 * GRID, 4 * GRID) and iou.shape == (n, k)
  np.testing.assert_allclose(np.asarray(masks), ref_masks, atol=TOL, rtol=TOL)
  np.testing.assert_allclose(np.asarray(iou), ref_iou, atol=TOL, rtol=TOL)


def test_extra_sparse_token_matches_hf_decoder(stock):
  """MedPLIB's path: no points/boxes, the <SEG> projection as the only sparse token."""
  hf, _, params, _ = stock
  images = _images(2, seed=7)
  seg = np.random.default_rng(8).normal(size=(2, 1, 32)).astype(np.float32)
  with torch.no_grad():
    emb = hf.get_image_embeddings(torch.from_numpy(images).permute(0, 3, 1, 2))
    _, dense = hf.prompt_encoder(None, None, None, None)
    image_pe = hf.get_image_wide_positional_embeddings()
    ref = [hf.mask_decoder(emb[i:i + 1], image_pe, torch.from_numpy(seg[i:i + 1])[None], dense,
                           multimask_output=False) for i in range(2)]
  encode, decode = _jitted(False)
  masks, iou = decode(params, encode(params, images), jnp.arange(2, dtype=jnp.int32), None, None,
                      seg, False)
  for i in range(2):
    np.testing.assert_allclose(np.asarray(masks[i]), ref[i][0][0, 0].numpy(), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(np.asarray(iou[i]), ref[i][1][0, 0].numpy(), atol=TOL, rtol=TOL)


def test_batched_prompts_equal_single_calls(stock):
  _, cfg, params, _ = stock
  model = SamMed2D(cfg)
  emb = _jitted(False)[0](params, _images(2, seed=9))
  n = 6
  coords, labels = _points(n, 2, seed=10)
  boxes = _boxes(n, seed=11)
  seg = np.random.default_rng(12).normal(size=(n, 1, 32)).astype(np.float32)
  index = np.array([0, 1, 1, 0, 1, 0], np.int32)
  decode = jax.jit(lambda e, i, c, l, b, s: model.apply(
      params, e, i, points=(c, l), boxes=b, extra_sparse=s, multimask_output=True,
      method=SamMed2D.decode))
  masks, iou = decode(emb, index, coords, labels, boxes, seg)
  for j in range(n):
    m1, i1 = decode(emb, index[j:j + 1], coords[j:j + 1], labels[j:j + 1], boxes[j:j + 1],
                    seg[j:j + 1])
    np.testing.assert_allclose(np.asarray(masks[j:j + 1]), np.asarray(m1), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(iou[j:j + 1]), np.asarray(i1), atol=1e-5, rtol=1e-5)


# ---- SAM-Med2D adapter ------------------------------------------------------------------------

class TorchAdapter(tnn.Module):
  """SPEC.md: channel gate (avg-pool -> Linear -> ReLU -> Linear -> sigmoid, times x), spatial
  (Conv3x3 s2 -> ReLU -> ConvT 4x4 s2 -> ReLU), skip add, LayerNorm. Biases off (SAM-Med2D)."""

  def __init__(self, dim, hidden):
    super().__init__()
    self.channel = tnn.Sequential(tnn.Linear(dim, hidden, bias=False), tnn.ReLU(),
                                  tnn.Linear(hidden, dim, bias=False), tnn.Sigmoid())
    self.spatial = tnn.Sequential(
        tnn.Conv2d(dim, dim, 3, stride=2, padding=1, bias=False), tnn.ReLU(),
        tnn.ConvTranspose2d(dim, dim, 4, stride=2, padding=1, bias=False), tnn.ReLU())
    self.norm = tnn.LayerNorm(dim)

  def forward(self, x):  # [B, H, W, C]
    xc = x.permute(0, 3, 1, 2)
    gate = self.channel(xc.mean(dim=(2, 3)))[:, :, None, None]
    return self.norm((xc + self.spatial(gate * xc)).permute(0, 2, 3, 1))


class MlpPlusAdapter(tnn.Module):
  """The block's MLP sees norm2(x); SAM-Med2D adds adapter(norm2(x)) next to it."""

  def __init__(self, mlp, adapter):
    super().__init__()
    self.mlp, self.adapter = mlp, adapter

  def forward(self, y):
    return self.mlp(y) + self.adapter(y)


@pytest.fixture(scope="module")
def med2d(tmp_path_factory):
  hf = _hf_model()
  torch.manual_seed(1)
  adapters = [TorchAdapter(32, 8) for _ in range(4)]
  with torch.no_grad():
    for a in adapters:
      for p in a.parameters():
        p.add_(0.2 * torch.randn_like(p))
  for layer, a in zip(hf.vision_encoder.layers, adapters):
    layer.mlp = MlpPlusAdapter(layer.mlp, a)
  cfg = _config(adapter=True)
  state = {k: v.detach().numpy() for k, v in hf.state_dict().items() if ".adapter." not in k}
  state = {k.replace(".mlp.mlp.", ".mlp."): v for k, v in state.items()}
  sd, _ = hf_to_segment_anything(state, cfg)
  for i, a in enumerate(adapters):
    for k, v in a.state_dict().items():
      sd[f"image_encoder.blocks.{i}.Adapter.{k}"] = v.numpy()
  path = tmp_path_factory.mktemp("med2d") / "sam-med2d_b.pth"
  torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}},
             path)
  params, report = load_sam(str(path), cfg)
  return hf, adapters, cfg, {"params": params}, report, sd


def test_sam_med2d_pth_import(med2d):
  *_, report, _ = med2d
  assert report["layout"] == "sam-med2d"
  assert report["unmapped"] == [] and report["missing"] == []


def test_adapter_matches_torch(med2d):
  _, adapters, cfg, params, _, _ = med2d
  x = np.random.default_rng(13).normal(size=(2, GRID, GRID, 32)).astype(np.float32)
  for block in range(4):  # blocks 0, 2 are position 0 of groups 0, 1; blocks 1, 3 position 1
    group, pos = divmod(block, 2)
    p = jax.tree.map(lambda v: v[group],
                     params["params"]["image_encoder"]["blocks"][f"block_{pos}"]["adapter"])
    ours = Adapter(8).apply({"params": p}, x)
    with torch.no_grad():
      ref = adapters[block](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=TOL)


def test_sam_med2d_encoder_matches_torch(med2d):
  hf, _, _, params, _, _ = med2d
  images = _images(2, seed=14)
  with torch.no_grad():
    ref = hf.get_image_embeddings(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  ours = _jitted(True)[0](params, images)
  np.testing.assert_allclose(np.asarray(ours), ref.transpose(0, 2, 3, 1), atol=TOL, rtol=TOL)


def test_medplib_prefix_and_export_roundtrip(med2d):
  _, _, cfg, params, _, sd = med2d
  exported = export_sam(params, cfg)
  assert set(exported) == {"model.visual_model." + k for k in sd}
  for k, v in sd.items():
    np.testing.assert_array_equal(exported["model.visual_model." + k], v)
  full = dict(exported, **{"model.layers.0.mlp.up_proj.weight": np.zeros((2, 2), np.float32)})
  assert detect_layout(full) == "medplib"
  again, report = load_sam(full, cfg)
  assert report["layout"] == "sam-med2d" and report["outside_prefix"] == 1
  assert report["unmapped"] == []
  jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, params["params"]))


class _NotATensor:
  pass


def test_code_pickle_is_refused(tmp_path):
  path = tmp_path / "evil.pth"
  torch.save({"model": {"image_encoder.pos_embed": _NotATensor()}}, path)
  with pytest.raises(CheckpointError, match="refused"):
    load_sam(str(path), _config(adapter=True))


def test_adapter_mismatch_and_shape_errors_name_the_key(med2d):
  *_, sd = med2d
  with pytest.raises(CheckpointError, match="adapter"):
    load_sam(sd, _config(adapter=False))
  bad = dict(sd)
  bad["image_encoder.pos_embed"] = np.zeros((1, 5, 5, 32), np.float32)
  with pytest.raises(CheckpointError, match="image_encoder.pos_embed"):
    load_sam(bad, _config(adapter=True))


def test_stock_and_medplib_sizes():
  """Stock SAM ViT-B at 1024 px and MedPLIB's SAM-Med2D ViT-B at 256 px, shapes only."""
  b = _expected_shapes(sam_config("sam_vit_b"))
  assert b[("image_encoder", "pos_embed")] == (1, 64, 64, 768)
  assert b[("image_encoder", "blocks", "block_0", "attn", "rel_pos_h")] == (4, 27, 64)
  assert b[("image_encoder", "blocks", "block_2", "attn", "rel_pos_h")] == (4, 127, 64)
  m = _expected_shapes(sam_config("7b"))
  assert m[("image_encoder", "pos_embed")] == (1, 16, 16, 768)
  assert m[("image_encoder", "blocks", "block_2", "attn", "rel_pos_h")] == (4, 31, 64)
  assert m[("image_encoder", "blocks", "block_0", "adapter", "spatial_up", "kernel")] == (4, 4, 4, 768, 768)
  assert m[("mask_decoder", "mask_tokens")] == (4, 256)
