"""Our model against the original MedPLIB code (issue #17), on tests/fixtures/reference_model/.

The fixture (tests/reference/make_model_fixture.py, README beside it) is a tiny random stage-4
checkpoint saved by the reference's `save_pretrained`, its inputs, and what the original PyTorch
code computed from them. Here the checkpoint goes through `medplib convert` and our model runs
the same inputs in float32: every array within 1e-4 (max-abs), every id exact.

Two feeds: our own pipeline (our tokenisation of the records, our canvases; the ids and canvases
are first compared with the reference's), and the reference's arrays (its canvases, its spliced
`inputs_embeds`) to pin each component on its own.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from medplib_jax import cli
from medplib_jax.data import canvas
from medplib_jax.data.preprocess import PreprocessOptions, build_sample
from medplib_jax.infer.api import MedPLIB
from medplib_jax.infer.masks import REFERENCE_THRESHOLD, mask_probabilities, postprocess_logits
from medplib_jax.models.medplib import MedPLIB as MedPLIBModule
from medplib_jax.models.moe import expert_capacity, route
from medplib_jax.train.losses import total_loss

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "reference_model")
ATOL = 1e-4
IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX = -200, -300  # the reference's utils/utils.py
RECORD_IDS = ("vqa", "region", "grounding")


@pytest.fixture(scope="module")
def ref():
  with open(os.path.join(FIXTURE, "reference.json")) as f:
    info = json.load(f)
  return dict(np.load(os.path.join(FIXTURE, "reference.npz"))), info


@pytest.fixture(scope="module")
def records():
  with open(os.path.join(FIXTURE, "inputs", "records.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("reference_model") / "converted")
  # SAM's decoder heads cannot be read off the weights (the tiny fixture has 2).
  rc = cli.main(["convert", "--medplib", os.path.join(FIXTURE, "checkpoint"), "--out", out,
                 "--size", "tiny", "--dtype", "float32", "--set", "model.sam.decoder_num_heads=2"])
  assert rc == 0
  return out


@pytest.fixture(scope="module")
def api(converted):
  return MedPLIB.from_pretrained(converted, mode="reference")


@pytest.fixture(scope="module")
def train_batch(api, records, ref):
  """The three records as our training pipeline lays them out (llava_v1, right padding)."""
  arrays, _ = ref
  length = arrays["train/inputs_embeds"].shape[1]
  cfg = api.config
  cfg.loss.mask_resolution, cfg.loss.mask_postprocess = "original", "reference"
  options = PreprocessOptions(template="llava_v1", mask_hw=128)
  samples = [build_sample(r, api.tokenizer, cfg.model, length, os.path.join(FIXTURE, "inputs"),
                          train=False, options=options)[0] for r in records]
  return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def _close(name, ours, theirs, atol=ATOL):
  ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
  assert ours.shape == theirs.shape, f"{name}: shape {ours.shape} vs reference {theirs.shape}"
  diff = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
  print(f"{name}: max-abs {diff:.2e}")  # shown with pytest -s
  assert diff <= atol, f"{name}: max-abs {diff:.3g} > {atol}"


def _expand(ids, pad_id, image_tokens):
  """Reference ids (-200 image, -300 region) -> our slot layout (pad_id in the slots)."""
  out = []
  for t in ids:
    out += [pad_id] * image_tokens if t == IMAGE_TOKEN_INDEX else [pad_id if t == REGION_TOKEN_INDEX else int(t)]
  return out


def _reference_rows(arrays, pad_id, image_tokens):
  """Expanded ids / labels / attention mask of the reference's training batch, per row."""
  rows = []
  for ids, labels, mask in zip(arrays["train/input_ids"], arrays["train/labels"],
                               arrays["train/attention_mask"]):
    n = int(mask.sum())
    e_ids = _expand(ids[:n], pad_id, image_tokens)
    e_labels = []
    for t, lab in zip(ids[:n], labels[:n]):
      e_labels += [-100] * image_tokens if t == IMAGE_TOKEN_INDEX else [int(lab)]
    rows.append((e_ids, e_labels))
  return rows


def _intermediate(tree, path):
  node = tree
  for p in path.split("/"):
    node = node[p]
  return node["__call__"][0]


# ---- the conversion ---------------------------------------------------------------------------

def test_converted_config(api, ref):
  _, info = ref
  m = api.config.model
  assert (m.llm.width, m.llm.depth, m.llm.num_heads, m.llm.mlp_dim) == (64, 2, 4, 128)
  assert (m.moe.num_experts, m.moe.top_k, m.moe.min_capacity) == (2, 1, 0)
  assert (m.moe.capacity_factor_train, m.moe.capacity_factor_eval) == (1.5, 2.0)
  assert (m.vision.image_size, m.vision.patch_size, m.vision.width) == (112, 14, 64)
  assert (m.sam.image_size, m.sam.width, m.sam.prompt_embed_dim, m.sam.window_size) == (256, 32, 32, 14)
  assert len(api.tokenizer) == m.llm.vocab_size
  assert api.tokenizer.seg_id == info["seg_token_idx"]


# ---- our pipeline: ids and canvases ----------------------------------------------------------

def test_training_layout_equals_reference(api, ref, train_batch):
  """Our tokenisation of the records gives the reference's ids, labels and slots exactly."""
  arrays, _ = ref
  pad = api.tokenizer.pad_id
  for row, (e_ids, e_labels) in enumerate(_reference_rows(arrays, pad, api.num_image_tokens)):
    n = len(e_ids)
    assert int(train_batch["attention_mask"][row].sum()) == n, RECORD_IDS[row]
    assert train_batch["input_ids"][row, :n].tolist() == e_ids, RECORD_IDS[row]
    assert train_batch["labels"][row, :n].tolist() == e_labels, RECORD_IDS[row]
    ids = arrays["train/input_ids"][row].tolist()
    assert train_batch["image_start"][row] == ids.index(IMAGE_TOKEN_INDEX)
    regions = [i + api.num_image_tokens - 1 for i, t in enumerate(ids) if t == REGION_TOKEN_INDEX]
    assert [p for p in train_batch["region_positions"][row] if p >= 0] == regions
  region = arrays["train/region_masks"][0, 0] > 0
  np.testing.assert_array_equal(train_batch["region_masks"][1, 0], region)
  gt = arrays["train/gt_masks"][0] > 0
  h, w = gt.shape
  np.testing.assert_array_equal(train_batch["masks_orig"][2, 0, :h, :w], gt)


def test_canvases_equal_reference(ref, train_batch):
  arrays, _ = ref
  _close("clip canvas", train_batch["clip_image"], arrays["train/images_clip"].transpose(0, 2, 3, 1))
  _close("sam canvas", train_batch["sam_image"], arrays["train/images_sam"].transpose(0, 2, 3, 1))


def _reference_canvases(batch, arrays):
  return dict(batch, clip_image=arrays["train/images_clip"].transpose(0, 2, 3, 1),
              sam_image=arrays["train/images_sam"].transpose(0, 2, 3, 1))


# ---- the training forward --------------------------------------------------------------------

@pytest.fixture(scope="module")
def forward(api, ref, train_batch):
  arrays, _ = ref
  batch = _reference_canvases(train_batch, arrays)
  module = MedPLIBModule(api.config.model, None)
  params = {"params": api.params}
  # The training module scans its layers; api.params hold them unrolled (inference layout), the
  # same numbers, so the forward runs on a module built with that layout.

  def run(p, b):  # one compiled call: the model and the pieces it is compared by
    feats = module.apply(p, b["clip_image"], method=MedPLIBModule.image_features)
    embeds = module.apply(p, b, feats, True, method=MedPLIBModule.multimodal_embeddings)
    sam = module.apply(p, b["sam_image"], method=lambda m, x: m.sam.encode_image(x))
    return module.apply(p, b, deterministic=True), feats, embeds, sam
  out, feats, embeds, sam_emb = jax.tree.map(np.asarray, jax.jit(run)(params, batch))
  return batch, out, feats, embeds, sam_emb

def test_forward_components(api, ref, forward):
  arrays, _ = ref
  batch, out, feats, embeds, sam_emb = forward
  real = batch["attention_mask"]
  _close("clip features", feats, arrays["train/clip_features"])
  _close("inputs_embeds (real tokens)", embeds[real], arrays["train/inputs_embeds"][real])
  region_pos = batch["region_positions"][1, 0]
  _close("region token", embeds[1, region_pos], arrays["train/region_tokens"][0, 0])
  _close("hidden, last layer (real tokens)", out["hidden"][real], arrays["train/hidden_states"][-1][real])
  _close("logits (real tokens)", out["logits"][real], arrays["train/logits"][real])
  _close("sam image embeddings", sam_emb.transpose(0, 3, 1, 2), arrays["train/sam_embeddings"])
  _close("low-res mask logits", out["mask_logits"][2, :1], arrays["train/low_res_logits"][0])
  _close("iou prediction", out["iou_pred"][2, :1], arrays["train/iou_pred"][0])
  assert out["seg_valid"][:, 0].tolist() == [False, False, True]
  geo = canvas.geometry(tuple(batch["orig_hw"][2]), api.config.model.sam.image_size)
  _close("post-processed mask logits", postprocess_logits(out["mask_logits"][2, :1], geo, "reference"),
         arrays["train/masks"][0])


def test_seg_embedding(api, ref, forward):
  arrays, _ = ref
  batch, out, *_ = forward
  module = MedPLIBModule(api.config.model, None)
  seg_pos = batch["seg_positions"][2, 0]
  state = out["hidden"][2, seg_pos - 1][None, None]
  emb = module.apply({"params": api.params}, state,
                     method=lambda m, x: m.text_hidden_fcs(x))
  _close("SEG embedding", np.asarray(emb)[0], arrays["train/seg_embedding"][0])


def test_loss_terms(api, ref, forward):
  """Every loss term, MedPLIB's mask losses at the original size (loss.mask_resolution='original').

  The reference's `ce_loss` already holds the router loss: its LLM forward adds
  router_aux_loss_coef * (sum of the layers' l_aux) to the cross-entropy."""
  arrays, info = ref
  batch, out, *_ = forward
  losses, w = info["losses"], info["loss_weights"]
  weights = api.config.loss.copy_and_resolve_references()
  weights.ce, weights.bce, weights.dice = w["ce_loss_weight"], w["bce_loss_weight"], w["dice_loss_weight"]
  weights.iou, weights.focal = w["iou_loss_weight"], w["focal_loss_weight"]
  coef = api.config.model.moe.aux_loss_coef
  assert coef == info["moe"]["router_aux_loss_coef"]
  loss, metrics = jax.jit(lambda o, b: total_loss(o, b, weights, coef))(out, batch)
  metrics = jax.tree.map(float, metrics)
  aux = sum(layer["l_aux"] for layer in info["train"]["routing"])
  assert abs(metrics["moe_aux_loss"] - aux) <= ATOL, (metrics["moe_aux_loss"], aux)
  ce = metrics["ce"] + coef * metrics["moe_aux_loss"]
  assert abs(ce - losses["ce_loss"]) <= ATOL, (ce, losses["ce_loss"])
  for ours, theirs in (("mask_bce", "unscale_mask_bce_loss"), ("mask_dice", "unscale_mask_dice_loss"),
                       ("mask_focal", "unscale_mask_focal_loss"), ("mask_iou_mse", "unscale_mask_iou_loss")):
    assert abs(metrics[ours] - losses[theirs]) <= ATOL, (ours, metrics[ours], losses[theirs])
  assert abs(float(loss) - losses["loss"]) <= ATOL, (float(loss), losses["loss"])


# ---- the LLM on the reference's own embeddings: every position, every layer, routing -----------

def test_llm_layers_and_routing(api, ref):
  arrays, info = ref
  embeds = arrays["train/inputs_embeds"]
  real = np.zeros(embeds.shape[:2], bool)
  for row, mask in enumerate(arrays["train/attention_mask"]):
    real[row, :int(mask.sum()) - 1 + api.num_image_tokens] = True
  out, state = jax.jit(lambda p, x, m: api.llm.apply(
      p, inputs_embeds=x, attention_mask=m, deterministic=True, capture_intermediates=True,
      mutable=["intermediates"]))({"params": api.params["llm"]}, embeds, real)
  inter = state["intermediates"]
  hidden = arrays["train/hidden_states"]
  depth = api.config.model.llm.depth
  for i in range(depth - 1):
    _close(f"hidden after layer {i}", _intermediate(inter, f"layers_{i}")[0], hidden[i + 1])
  _close("hidden, last layer (all positions)", out["hidden"], hidden[-1])
  _close("logits (all positions)", out["logits"], arrays["train/logits"])
  moe = api.config.model.moe
  tokens = embeds.shape[0] * embeds.shape[1]
  capacity = expert_capacity(tokens, moe.num_experts, moe.top_k, moe.capacity_factor_train,
                             moe.min_capacity)
  for i in range(depth):
    layer = info["train"]["routing"][i]
    assert capacity == layer["capacity"]
    logits = np.asarray(_intermediate(inter, f"layers_{i}/mlp/router")).reshape(tokens, -1)
    _close(f"router logits {i}", logits, arrays[f"train/routing/{i}/router_logits"])
    r = route(jnp.asarray(logits), top_k=1, capacity=capacity)
    np.testing.assert_array_equal(np.asarray(r.expert_index[:, 0]), arrays[f"train/routing/{i}/expert"])
    np.testing.assert_array_equal(np.asarray(r.kept[:, 0]), arrays[f"train/routing/{i}/kept"])
    _close(f"gate weight {i}", r.combine_weight[:, 0], arrays[f"train/routing/{i}/gate_weight"])
    assert np.asarray(r.tokens_per_expert).tolist() == layer["exp_counts"]
    _close(f"aux loss {i}", r.aux_loss, layer["l_aux"])


# ---- generation ------------------------------------------------------------------------------

def _question(record):
  q = record["conversations"][0]["value"].replace("<image>\n", "")
  return q.replace("region_mask.png", "")


@pytest.mark.parametrize("index", range(3), ids=RECORD_IDS)
def test_greedy_generation(api, ref, records, index):
  """evaluate()'s greedy ids and its (forced or <SEG>) mask, from our prompt of the record."""
  arrays, info = ref
  rec, gen = records[index], info["generate"][index]
  rid = gen["id"]
  image = np.asarray(Image.open(os.path.join(FIXTURE, "inputs", rec["image"])).convert("RGB"))
  regions = []
  if "<region>" in rec["conversations"][0]["value"]:
    regions = [np.asarray(Image.open(os.path.join(FIXTURE, "inputs", "region_mask.png"))) > 0]
  sample = api.prepare(image, _question(rec), regions, template="vicuna_v1",
                       max_new_tokens=info["max_new_tokens"])
  assert sample.ids == _expand(arrays[f"generate/{rid}/prompt_ids"], api.tokenizer.pad_id,
                               api.num_image_tokens)
  pred = api.run([sample], max_new_tokens=info["max_new_tokens"], mode="reference")[0]
  assert pred.tokens == gen["new_ids"]
  probs = mask_probabilities(arrays[f"generate/{rid}/masks"])
  _close(f"{rid} mask probabilities", pred.mask_probs[0], probs[0])
  np.testing.assert_array_equal(pred.masks[0], probs[0] > np.float32(REFERENCE_THRESHOLD))
