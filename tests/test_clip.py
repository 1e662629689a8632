"""CLIP vision tower, projector and their weight import against transformers / torch references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from configs.common import LOGICAL_AXIS_RULES
from medplib_jax.checkpoint.clip import (interpolate_position_embedding, load_clip_vision,
                                         load_projector, load_region_adapter)
from medplib_jax.checkpoint.torch_io import CheckpointError
from medplib_jax.data.canvas import CLIP_MEAN, clip_canvas
from medplib_jax.models.clip import ClipVisionTower
from medplib_jax.models.projector import Projector
from medplib_jax.sharding import make_mesh

torch.set_num_threads(1)
WIDTH, LAYERS, HEADS, MLP, PATCH, IMAGE = 64, 2, 4, 128, 14, 56


def _config(image_size=IMAGE, select_layer=-2):
  return ml_collections.ConfigDict(dict(
      image_size=image_size, patch_size=PATCH, width=WIDTH, depth=LAYERS, num_heads=HEADS,
      mlp_dim=MLP, layer_norm_eps=1e-5, select_layer=select_layer))


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  """A random tiny transformers CLIPVisionModel (every weight perturbed), saved to disk."""
  torch.manual_seed(0)
  cfg = transformers.CLIPVisionConfig(
      hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH, hidden_act="quick_gelu")
  model = transformers.CLIPVisionModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():  # non-trivial LayerNorms and biases too
      p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("hf_clip")
  model.save_pretrained(path)
  return model, str(path)


def _torch_hidden(model, images_nhwc, index, interpolate=False):
  pixel = torch.from_numpy(np.asarray(images_nhwc).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    out = model(pixel_values=pixel, output_hidden_states=True, interpolate_pos_encoding=interpolate)
  return out.hidden_states[index][:, 1:].numpy()


def _images(n, size, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("select_layer", [-2, -1])
def test_tower_matches_hf_clip(hf_clip, select_layer):
  model, path = hf_clip
  cfg = _config(select_layer=select_layer)
  params, report = load_clip_vision(path, cfg)
  tower = ClipVisionTower(cfg)
  # The imported tree has exactly the module's structure and shapes.
  abstract = nn.unbox(jax.eval_shape(tower.init, jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3))))
  assert (jax.tree.map(lambda a: a.shape, abstract["params"])
          == jax.tree.map(lambda a: a.shape, params))
  images = _images(3, IMAGE)
  ours = np.asarray(jax.jit(tower.apply)({"params": params}, images))
  ref = _torch_hidden(model, images, select_layer)
  assert ours.shape == (3, (IMAGE // PATCH) ** 2, WIDTH)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  # Everything used is mapped; the rest (last layer at -2, post_layernorm) is reported.
  unmapped = report["unmapped"]
  assert all("post_layernorm" in k or "encoder.layers.1." in k or "position_ids" in k
             for k in unmapped), unmapped
  assert any("post_layernorm" in k for k in unmapped)
  assert any("encoder.layers.1." in k for k in unmapped) == (select_layer == -2)


def test_medplib_prefix_and_position_interpolation(hf_clip):
  """MedPLIB key layout, and a config image size other than the checkpoint's (HF bicubic)."""
  model, _ = hf_clip
  sd = {f"model.vision_tower.vision_tower.vision_model.{k.removeprefix('vision_model.')}": v.numpy()
        for k, v in model.state_dict().items()}
  sd["model.mm_projector.0.weight"] = np.zeros((8, WIDTH), np.float32)  # other parts: ignored
  cfg = _config(image_size=84)
  params, report = load_clip_vision(sd, cfg)
  assert params["position_embedding"].shape == (37, WIDTH)
  assert any("interpolated" in n for n in report["notes"])
  assert not any(k.startswith("model.mm_projector") for k in report["unmapped"])
  images = _images(2, 84, seed=1)
  ours = np.asarray(ClipVisionTower(cfg).apply({"params": params}, images))
  ref = _torch_hidden(model, images, -2, interpolate=True)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_position_interpolation_matches_torch_bicubic():
  rng = np.random.default_rng(0)
  for g, new in ((4, 6), (24, 8), (5, 5)):
    pos = rng.normal(size=(g * g + 1, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(pos[1:].reshape(1, g, g, 3).transpose(0, 3, 1, 2).copy()),
        size=(new, new), mode="bicubic", align_corners=False)
    ref = ref.numpy()[0].transpose(1, 2, 0).reshape(new * new, 3)
    out = interpolate_position_embedding(pos, new)
    np.testing.assert_array_equal(out[0], pos[0])
    np.testing.assert_allclose(out[1:], ref, atol=1e-5)


def test_import_errors_name_the_key(hf_clip):
  model, _ = hf_clip
  sd = {f"vision_model.{k.removeprefix('vision_model.')}": v.numpy()
        for k, v in model.state_dict().items()}
  sd["vision_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((MLP + 1, WIDTH), np.float32)
  with pytest.raises(CheckpointError, match=r"mlp\.fc1\.weight.*\(129, 64\).*\(128, 64\)"):
    load_clip_vision(sd, _config())
  with pytest.raises(CheckpointError, match="no CLIP vision keys"):
    load_clip_vision({"foo.weight": np.zeros(3)}, _config())


def test_hf_config_mismatch_is_named(hf_clip):
  _, path = hf_clip
  cfg = _config()
  cfg.num_heads = 8
  with pytest.raises(CheckpointError, match="num_attention_heads=4.*num_heads=8"):
    load_clip_vision(path, cfg)


@pytest.mark.parametrize("kind", ["mlp2x_gelu", "linear"])
def test_projector_matches_torch(kind):
  torch.manual_seed(1)
  dv, dl = 24, 40
  if kind == "linear":
    ref = torch.nn.Linear(dv, dl)
    sd = {f"model.mm_projector.{k}": v.numpy() for k, v in ref.state_dict().items()}
  else:  # LLaVA's build_vision_projector layout
    ref = torch.nn.Sequential(torch.nn.Linear(dv, dl), torch.nn.GELU(), torch.nn.Linear(dl, dl))
    sd = {f"model.mm_projector.{k}": v.numpy() for k, v in ref.state_dict().items()}
  params, report = load_projector(sd, kind, in_width=dv, out_width=dl)
  assert report["unmapped"] == [] and report["mapped"] == len(sd)
  x = np.random.default_rng(0).normal(size=(2, 5, dv)).astype(np.float32)
  ours = Projector(kind, dl).apply({"params": params}, x)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)
  with pytest.raises(CheckpointError, match="mm_projector"):
    load_projector(sd, kind, in_width=dv + 1)


def test_region_adapter_import():
  lin = torch.nn.Linear(6, 10)
  sd = {f"model.region_fea_adapter.{k}": v.detach().numpy() for k, v in lin.state_dict().items()}
  params, report = load_region_adapter(sd)
  x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
  ours = nn.Dense(10).apply({"params": params}, x)
  np.testing.assert_allclose(np.asarray(ours), lin(torch.from_numpy(x)).detach().numpy(), atol=1e-6)
  assert report["unmapped"] == []


def test_clip_canvas_matches_reference_pipeline():
  """Reference: SAM ResizeLongestSide (PIL bilinear) -> centred pad with int(mean*255) ->
  HF CLIPImageProcessor (rescale + normalise)."""
  from PIL import Image
  processor_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
  processor = processor_cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
  rng = np.random.default_rng(0)
  for h, w in ((200, 300), (512, 377), (336, 336)):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    scale = 336 / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    pad = torch.empty(3, 336, 336, dtype=torch.uint8)
    for c in range(3):
      pad[c] = int((torch.tensor(float(CLIP_MEAN[c])) * 255).clamp(0, 255))
    top, left = (336 - nh) // 2, (336 - nw) // 2
    pad[:, top:top + nh, left:left + nw] = torch.from_numpy(resized.copy()).permute(2, 0, 1)
    ref = processor.preprocess(pad.numpy().transpose(1, 2, 0), return_tensors="np")["pixel_values"][0]
    ours, geo = clip_canvas(image, 336)
    assert geo.resized_hw == (nh, nw) and (geo.pad_top, geo.pad_left) == (top, left)
    grey_level = 1.0 / 255 / CLIP_STD_MIN
    np.testing.assert_allclose(ours.transpose(2, 0, 1), ref, atol=grey_level)


CLIP_STD_MIN = 0.26130258


def test_tower_sharded_equals_unsharded(hf_clip):
  _, path = hf_clip
  cfg = _config()
  params, _ = load_clip_vision(path, cfg)
  tower = ClipVisionTower(cfg)
  images = _images(8, IMAGE, seed=2)
  expected = np.asarray(jax.jit(tower.apply)({"params": params}, images))
  mesh = make_mesh({"data": -1})
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    sharded = jax.device_put(images, jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"))))
    out = jax.jit(tower.apply)({"params": params}, sharded)
    assert len(out.sharding.device_set) == 8
  # Per-device batch of 1 may pick other CPU kernels: equal up to float32 rounding.
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-6)
