"""Writes tests/fixtures/reference_model/: a tiny random stage-4 MedPLIB run by the original code.

Not run by `make test`; README.md beside this file says how to regenerate. Runs in the side
virtualenv (python 3.11, transformers 4.31.0, deepspeed 0.13.1, torch, torchvision, cv2) with the
original MedPLIB checkout passed as --medplib, imported from there at run time (nothing of it is
copied here). It

1. builds the model as the reference does (`MedPLIBForCausalLM(config, test_only=True)`: CLIP
   tower from a directory, DeepSpeed MoE (2 experts, top-1) in every LLaMA FFN, SAM-Med2D from
   `_build_sam`), with tiny widths and seeded random weights, and saves it with `save_pretrained`
   beside the MedPLIB tokenizer of tests/fixtures/tokenizer/medplib (`checkpoint/`, `clip/`);
2. reloads it as vqa_infer.py does (`from_pretrained(..., test_only=True)`);
3. reads three records (VQA, region, grounding with a `<SEG>` answer and its mask; non-square
   PNGs under `inputs/`) through the reference's LazySupervisedDataset and collator;
4. records one training forward (llava_v1, train mode: every loss term, logits, hidden states,
   per-layer routing and capacity, region tokens, SEG embeddings, SAM image embeddings, low-res
   and post-processed mask logits) and, per record, `evaluate()` greedy generation (template v1,
   prompt cut after the last ':' as vqa_infer.py cuts it: generated ids, masks) -> `reference.npz`,
   `reference.json`.

Run-time patches (no file of the reference is edited):
* `torchvision::nms` / `torchvision::qnms` op schemas are defined before torchvision is imported
  (its C++ ops do not load with a CPU torch build);
* `torch.distributed.elastic.agent.server.api` gets the `log` / `_get_socket_with_port` names
  deepspeed 0.13 imports from it;
* a single-process gloo group (DeepSpeed MoE's all-to-all and expert groups need one);
* `Tensor.cuda` is a no-op (the reference moves index tensors to the GPU);
* `model.MedPLIB.build_sam_vit_b` builds a tiny SAM through `_build_sam`, whose hard-coded widths
  (prompt width 256, decoder MLP 2048, 8 decoder heads, IoU head 256) are lowered by replacing the
  classes it instantiates with ones that override those arguments;
* the dataset's CLIP canvas (hard-coded 336) is set to the tiny tower's 112 on the instance;
* `build_seg_token_mask` drops its last column inside `evaluate()` only: at this commit the mask
  built from the generated ids is one column longer than the hidden states it indexes
  (IndexError).
"""

import argparse
import functools
import importlib
import json
import logging
import os
import shutil
import socket
import sys
import types

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "fixtures", "reference_model")
TOKENIZER = os.path.join(os.path.dirname(FIXTURE), "tokenizer", "medplib")
SEED = 0
MAX_NEW_TOKENS = 12

# Tiny widths. LLaMA: width 64, 4 heads, FFN 128, 2 layers, each a 2-expert top-1 DeepSpeed MoE.
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5)
MOE = dict(moe_enable=True, moe_mode="dense", moe_layers_idx=[0, 1], ep_size=1, top_k_experts=1,
           capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0, use_residual=False,
           router_aux_loss_coef=0.01, num_experts=[2, 2])
# CLIP: 112 px, patch 14 (an 8x8 grid, 64 image tokens), width 64, 2 layers (select -2).
CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=112, patch_size=14, projection_dim=64)
# SAM-Med2D: 256 px, patch 16 (a 16x16 grid, windows of 14 as _build_sam sets them), width 32.
SAM = dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1],
           image_size=256, checkpoint=None, encoder_adapter=True)
SAM_PROMPT_DIM = 32
SAM_DECODER = dict(mlp_dim=64, num_heads=2)
SAM_IOU_HIDDEN = 32
LOSS_WEIGHTS = dict(ce_loss_weight=1.0, dice_loss_weight=0.5, bce_loss_weight=2.0,
                    iou_loss_weight=2.0, focal_loss_weight=2.0)

RECORDS = [
    {"id": "vqa", "image": "vqa.png", "answer_type": "OPEN", "conversations": [
        {"from": "human", "value": "<image>\nWhat modality is used to take this image?"},
        {"from": "gpt", "value": "The image is a CT scan of the abdomen."}]},
    {"id": "region", "image": "region.png", "answer_type": "OPEN", "conversations": [
        {"from": "human", "value": "<image>\nWhat organ is shown in the region "
                                   "<region>region_mask.png</region>?"},
        {"from": "gpt", "value": "It is the left kidney."}]},
    {"id": "grounding", "image": "grounding.png", "conversations": [
        {"from": "human", "value": "<image>\nPlease segment the liver in this CT scan."},
        {"from": "gpt", "value": "Sure, it is <SEG>.<mask>grounding_mask.png</mask>"}]},
]
IMAGE_HW = {"vqa": (60, 90), "region": (100, 70), "grounding": (72, 120)}


# ---- run-time patches ----------------------------------------------------------------------------

def patch_runtime():
  """The patches listed in the module docstring that must precede the reference's imports."""
  import torch
  import torch.distributed as dist
  from torch.distributed.elastic.utils import get_socket_with_port

  # Kept alive at module level: the schemas live as long as the Library object.
  global _TORCHVISION_LIB
  _TORCHVISION_LIB = torch.library.Library("torchvision", "DEF")
  _TORCHVISION_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _TORCHVISION_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  import torch.distributed.elastic.agent.server.api as elastic_api
  elastic_api.log = logging.getLogger("torchelastic")
  elastic_api._get_socket_with_port = get_socket_with_port
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                    WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
  dist.init_process_group("gloo", rank=0, world_size=1)
  import deepspeed
  deepspeed.init_distributed(dist_backend="gloo")


def _overriding(cls, **fixed):
  """cls with some constructor arguments replaced (the widths _build_sam hard-codes)."""
  @functools.wraps(cls, updated=())
  def build(*args, **kwargs):
    return cls(*args, **{**kwargs, **fixed})
  return build


def tiny_sam():
  """A tiny SAM-Med2D through the reference's `_build_sam`."""
  build_sam = importlib.import_module("model.segment_anything_med2d.build_sam")  # the package
  # re-exports a function of the same name
  saved = {k: getattr(build_sam, k) for k in ("ImageEncoderViT", "PromptEncoder", "MaskDecoder",
                                                "TwoWayTransformer")}
  try:
    build_sam.ImageEncoderViT = _overriding(saved["ImageEncoderViT"], out_chans=SAM_PROMPT_DIM)
    build_sam.PromptEncoder = _overriding(saved["PromptEncoder"], embed_dim=SAM_PROMPT_DIM)
    build_sam.MaskDecoder = _overriding(saved["MaskDecoder"], transformer_dim=SAM_PROMPT_DIM,
                                        iou_head_hidden_dim=SAM_IOU_HIDDEN)
    build_sam.TwoWayTransformer = _overriding(saved["TwoWayTransformer"],
                                              embedding_dim=SAM_PROMPT_DIM, **SAM_DECODER)
    return build_sam._build_sam(**SAM)
  finally:
    for k, v in saved.items():
      setattr(build_sam, k, v)


# ---- model -----------------------------------------------------------------------------------------

def _randomise(model, seed):
  """Seeded random weights with O(1) activations (so logits have clear top choices)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      if p.ndim == 1 and ("norm" in name or name.endswith("weight")):
        value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
      elif p.ndim == 1:
        value = 0.05 * torch.randn(p.shape, generator=gen)
      elif "embed_tokens" in name or "position_embedding" in name or "pos_embed" in name:
        value = torch.randn(p.shape, generator=gen) * (0.5 if "pos" in name else 1.0)
      elif "rel_pos" in name:
        value = 0.1 * torch.randn(p.shape, generator=gen)
      else:
        fan_in = p[0].numel() if p.ndim > 1 else p.numel()
        scale = 3.0 if "gate.wg" in name else 1.0  # routers with decided choices
        value = scale * torch.randn(p.shape, generator=gen) / fan_in ** 0.5
      p.copy_(value.reshape(p.shape))


def build(out, medplib_model, seg_token_idx):
  """The tiny model as the reference builds it (the CLIP directory saved under `out`)."""
  import torch
  import transformers
  from model.medplib.model.language_model.medplib_moe_llama import MedPLIBMoELlamaConfig
  torch.manual_seed(SEED)
  clip_dir = os.path.join(out, "clip")
  clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP))
  _randomise(clip, SEED + 1)
  clip.save_pretrained(clip_dir)
  size = CLIP["image_size"]
  transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                  crop_size={"height": size, "width": size}).save_pretrained(clip_dir)
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "checkpoint"), use_fast=False,
                                                   legacy=True)
  config = MedPLIBMoELlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 tie_word_embeddings=False, torch_dtype="float32", **LLM)
  config.moe = dict(MOE)
  config.architectures = ["MedPLIBForCausalLM"]
  # Relative: the generator loads from `out` (the committed config names no path of this machine).
  config.update(dict(mm_vision_tower="clip", vision_tower="clip", mm_hidden_size=CLIP["hidden_size"],
                     mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                     mm_vision_select_feature="patch", mm_use_im_start_end=True,
                     mm_use_im_patch_token=False, image_aspect_ratio="pad", max_sample_point=512,
                     train_mask_decoder=True, out_dim=SAM_PROMPT_DIM, use_cache=False))
  medplib_model.build_sam_vit_b = lambda checkpoint=None, **_: tiny_sam()
  model = medplib_model.MedPLIBForCausalLM(config, test_only=True, seg_token_idx=seg_token_idx,
                                           vision_pretrained=None, **LOSS_WEIGHTS)
  _randomise(model, SEED + 2)
  return model


def choose_routers(model, ds):
  """Re-draws the routers (seeded) until the training forward drops no token.

  DeepSpeed keeps an over-capacity expert's tokens by random token selection, which no other
  implementation can reproduce; with nothing dropped the routing is deterministic."""
  import torch
  from datasets.DataCollatorForSupervisedDataset import DataCollatorForSupervisedDataset
  batch = DataCollatorForSupervisedDataset([ds[i] for i in range(len(ds))])
  gates = [layer.mlp.deepspeed_moe.gate for layer in model.get_model().layers]
  model.train()
  for seed in range(100):
    gen = torch.Generator().manual_seed(SEED + 100 + seed)
    with torch.no_grad():
      for gate in gates:
        w = gate.wg.weight
        w.copy_(3.0 * torch.randn(w.shape, generator=gen) / w.shape[1] ** 0.5)
      dropped = []
      hooks = [g.register_forward_hook(lambda m, a, o: dropped.append(int(o[3].sum() - o[2].sum())))
               for g in gates]
      model(**batch)
      for h in hooks:
        h.remove()
    if not any(dropped):
      return SEED + 100 + seed
  raise RuntimeError("no router draw keeps every token")


def load(out, medplib_model, seg_token_idx):
  """The checkpoint reloaded as vqa_infer.py loads it (float32, test_only)."""
  import torch
  return medplib_model.MedPLIBForCausalLM.from_pretrained(
      os.path.join(out, "checkpoint"), torch_dtype=torch.float32, low_cpu_mem_usage=True,
      ignore_mismatched_sizes=True, test_only=True, seg_token_idx=seg_token_idx,
      vision_pretrained=None, **LOSS_WEIGHTS)


# ---- inputs ------------------------------------------------------------------------------------------

def write_inputs(inputs):
  """Non-square RGB images (a bright ellipse on noise), the grounding mask, the region mask."""
  import numpy as np
  from PIL import Image
  os.makedirs(inputs, exist_ok=True)
  rng = np.random.default_rng(SEED)
  for rid, (h, w) in IMAGE_HW.items():
    yy, xx = np.mgrid[:h, :w]
    blob = ((yy - h * 0.45) / (h / 4)) ** 2 + ((xx - w * 0.4) / (w / 5)) ** 2 < 1
    img = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
    img[blob] = (210, 180, 160)
    Image.fromarray(img).save(os.path.join(inputs, f"{rid}.png"))
    if rid == "grounding":
      Image.fromarray(blob.astype(np.uint8) * 255).save(os.path.join(inputs, "grounding_mask.png"))
    if rid == "region":  # a box well inside the image: 9 cells of the 8x8 CLIP grid at most
      region = np.zeros((h, w), np.uint8)
      region[30:62, 18:46] = 255
      Image.fromarray(region).save(os.path.join(inputs, "region_mask.png"))
  with open(os.path.join(inputs, "records.json"), "w") as f:
    json.dump(RECORDS, f, indent=1)


def dataset(inputs, tok, vision_tower, template):
  """The reference's LazySupervisedDataset over records.json, conversation template `template`."""
  from datasets.LazySupervisedDataset import LazySupervisedDataset
  from model.medplib import conversation as conversation_lib
  from model.segment_anything.utils.transforms import ResizeLongestSide
  conversation_lib.default_conversation = conversation_lib.conv_templates[template]
  data_args = types.SimpleNamespace(image_folder=inputs, image_aspect_ratio="pad", is_multimodal=True,
                                    mm_use_im_start_end=True, image_processor=vision_tower.image_processor,
                                    icl_mask_mode="overlay", icl_mask_encoder=False,
                                    mask_encoder_token_count=64, mm_token_compress=False,
                                    mm_compressed_token_count=256)
  ds = LazySupervisedDataset(os.path.join(inputs, "records.json"), tok, data_args, SAM["image_size"])
  ds.clip_img_size = CLIP["image_size"]  # hard-coded 336 in the reference; the tiny tower's canvas
  ds.transform_clip = ResizeLongestSide(ds.clip_img_size)
  return ds


# ---- recording -------------------------------------------------------------------------------------

class Recorder:
  """Forward hooks on the reference's modules; each call appends its outputs under a name."""

  def __init__(self):
    self.calls = {}
    self.handles = []

  def add(self, name, value):
    self.calls.setdefault(name, []).append(value)

  def hook(self, module, name, fn):
    self.handles.append(module.register_forward_hook(
        lambda m, args, kwargs, out: self.add(name, fn(args, kwargs, out)), with_kwargs=True))

  def clear(self):
    self.calls = {}

  def remove(self):
    for h in self.handles:
      h.remove()


def _np(t):
  return t.detach().float().cpu().numpy()


def install_hooks(model, rec):
  m = model.get_model()
  rec.hook(m.get_vision_tower(), "clip_features", lambda a, k, o: _np(o))
  rec.hook(m.mm_projector, "projected", lambda a, k, o: _np(o))
  rec.hook(m, "llm", lambda a, k, o: {"inputs_embeds": _np(k["inputs_embeds"]) if k.get(
      "inputs_embeds") is not None else None, "hidden_states": [_np(h) for h in o.hidden_states]
      if o.hidden_states is not None else None})
  rec.hook(model.lm_head, "logits", lambda a, k, o: _np(o))
  for i, layer in enumerate(m.layers):
    gate = layer.mlp.deepspeed_moe.gate
    rec.hook(gate.wg, f"router_logits_{i}", lambda a, k, o: _np(o))
    rec.hook(gate, f"gate_{i}", lambda a, k, o: {"l_aux": float(o[0]), "combine": _np(o[1]),
                                                "dispatch": o[2].detach().cpu().numpy(),
                                                "exp_counts": o[3].detach().cpu().numpy()})
  sam = m.visual_model
  rec.hook(sam.image_encoder, "sam_embeddings", lambda a, k, o: _np(o))
  rec.hook(sam.prompt_encoder, "seg_embedding", lambda a, k, o: _np(k["text_embeds"]))
  rec.hook(sam.mask_decoder, "low_res", lambda a, k, o: (_np(o[0]), _np(o[1])))
  extract = model.extract_region_feature

  def extract_region_feature(*args, **kwargs):
    out = extract(*args, **kwargs)
    rec.add("region_tokens", [None if x is None else _np(x) for x in out])
    return out
  model.extract_region_feature = extract_region_feature
  post = model.postprocess_masks

  def postprocess_masks(*args, **kwargs):
    out = post(*args, **kwargs)
    rec.add("masks", _np(out))
    return out
  model.postprocess_masks = postprocess_masks


def routing(gate_call, router_logits):
  """Per token (flattened B*L, padding included): expert, gate weight, kept; plus the capacity."""
  import numpy as np
  dispatch = gate_call["dispatch"]  # [S, E, C] bool
  combine = gate_call["combine"]
  kept = dispatch.any(axis=(1, 2))
  expert = np.where(kept, dispatch.any(axis=2).argmax(axis=1), -1)
  return {"router_logits": router_logits, "expert": expert.astype(np.int32),
          "gate_weight": combine.sum(axis=(1, 2)).astype(np.float32), "kept": kept,
          "capacity": int(dispatch.shape[2]), "exp_counts": gate_call["exp_counts"].astype(np.int64),
          "l_aux": np.float32(gate_call["l_aux"])}


def run_training_forward(model, ds, rec, tok):
  """One batch of the three records, train mode, as train_ds_medplib.py calls the model."""
  import numpy as np
  import torch
  from datasets.DataCollatorForSupervisedDataset import DataCollatorForSupervisedDataset
  items = [ds[i] for i in range(len(ds))]
  batch = DataCollatorForSupervisedDataset(items)
  model.train()
  rec.clear()
  with torch.no_grad():
    losses = model(**batch)
  arrays, info = {}, {"losses": {k: float(v) for k, v in losses.items()}}
  arrays["train/input_ids"] = batch["input_ids"].numpy().astype(np.int32)
  arrays["train/labels"] = batch["labels"].numpy().astype(np.int32)
  arrays["train/attention_mask"] = batch["attention_mask"].numpy()
  arrays["train/images_clip"] = _np(batch["images_clip"])
  arrays["train/images_sam"] = _np(batch["images"])
  arrays["train/gt_masks"] = np.stack([_np(m) for m in batch["masks_list"]])
  arrays["train/region_masks"] = np.stack([_np(m) for m in batch["region_masks"]])
  info["train"] = {"resize_list": [list(map(int, r)) for r in batch["resize_list"]],
                   "valid_mask_bool": batch["valid_mask_bool"],
                   "prompts": batch["conversation_list"]}
  llm = rec.calls["llm"][0]
  arrays["train/inputs_embeds"] = llm["inputs_embeds"]
  arrays["train/hidden_states"] = np.stack(llm["hidden_states"])
  arrays["train/logits"] = rec.calls["logits"][0]
  arrays["train/clip_features"] = rec.calls["clip_features"][0]
  arrays["train/region_tokens"] = np.stack([x for x in rec.calls["region_tokens"][0] if x is not None])
  arrays["train/sam_embeddings"] = np.concatenate(rec.calls["sam_embeddings"])
  arrays["train/seg_embedding"] = np.concatenate(rec.calls["seg_embedding"])
  arrays["train/low_res_logits"] = np.concatenate([c[0] for c in rec.calls["low_res"]])
  arrays["train/iou_pred"] = np.concatenate([c[1] for c in rec.calls["low_res"]])
  arrays["train/masks"] = np.concatenate(rec.calls["masks"])
  info["train"]["routing"] = []
  for i in range(len(model.get_model().layers)):
    r = routing(rec.calls[f"gate_{i}"][0], rec.calls[f"router_logits_{i}"][0])
    for k in ("router_logits", "expert", "gate_weight", "kept"):
      arrays[f"train/routing/{i}/{k}"] = r[k]
    info["train"]["routing"].append({"capacity": r["capacity"], "exp_counts": r["exp_counts"].tolist(),
                                     "l_aux": float(r["l_aux"]), "dropped": int((~r["kept"]).sum())})
  return arrays, info


def run_generation(model, ds, rec, tok, train_arrays):
  """Per record: evaluate() greedy decoding from the prompt cut after the last ':'."""
  import numpy as np
  import torch
  from datasets.DataCollatorForSupervisedDataset import DataCollatorForSupervisedDataset
  from model.segment_anything.utils.transforms import ResizeLongestSide
  colon = tok.convert_tokens_to_ids(":")
  build = model.build_seg_token_mask
  model.eval()
  arrays, info = {}, []
  for i in range(len(ds)):
    item = ds[i]
    batch = DataCollatorForSupervisedDataset([item], inference=True)
    ids = batch["input_ids"]
    cut = int((ids[0] == colon).nonzero()[-1]) + 1
    h, w = IMAGE_HW[RECORDS[i]["id"]]
    # The dataset gives resize / label only with a mask; evaluate() needs them for every record.
    resize = batch["resize_list"] or [ResizeLongestSide(SAM["image_size"]).get_preprocess_shape(
        h, w, SAM["image_size"])]
    labels = batch["label_list"] or [torch.zeros(h, w)]
    rec.clear()
    model.build_seg_token_mask = lambda *a, **k: build(*a, **k)[:, :-1]  # see the docstring
    try:
      with torch.no_grad():
        output_ids, pred_masks = model.evaluate(
            batch["images_clip"].float(), batch["images"].float(), ids[:, :cut], resize, labels,
            region_masks=batch["region_masks"], valid_region_masks_bool=batch["valid_region_masks_bool"],
            max_new_tokens=MAX_NEW_TOKENS, tokenizer=tok, attention_mask=batch["attention_mask"][:, :cut])
    finally:
      model.build_seg_token_mask = build
    rid = RECORDS[i]["id"]
    steps = rec.calls["logits"]  # one per decoding step
    last = np.stack([s[0, -1] for s in steps])
    top2 = np.sort(last, axis=-1)[:, -2:]
    arrays[f"generate/{rid}/prompt_ids"] = ids[0, :cut].numpy().astype(np.int32)
    arrays[f"generate/{rid}/output_ids"] = output_ids[0].numpy().astype(np.int32)
    arrays[f"generate/{rid}/step_logits"] = last
    # The same canvases as the training batch's row i (only the template differs).
    assert np.array_equal(_np(batch["images_clip"][0]), train_arrays["train/images_clip"][i])
    assert np.array_equal(_np(batch["images"][0]), train_arrays["train/images_sam"][i])
    arrays[f"generate/{rid}/seg_embedding"] = np.concatenate(rec.calls["seg_embedding"])
    arrays[f"generate/{rid}/low_res_logits"] = np.concatenate([c[0] for c in rec.calls["low_res"]])
    arrays[f"generate/{rid}/masks"] = np.concatenate([_np(m) for m in pred_masks])
    info.append({"id": rid, "prompt": batch["conversation_list"][0], "cut": cut,
                 "resize": list(map(int, resize[0])), "orig_hw": [h, w],
                 "new_ids": output_ids[0, cut:].tolist(),
                 "text": tok.decode(output_ids[0, cut:]),
                 "min_top2_margin": float((top2[:, 1] - top2[:, 0]).min())})
  return arrays, info


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--medplib", required=True, help="a checkout of github.com/ShawnHuang497/MedPLIB")
  parser.add_argument("--out", default=FIXTURE)
  args = parser.parse_args()
  out = os.path.abspath(args.out)
  patch_runtime()
  import numpy as np
  import torch
  import transformers
  assert transformers.__version__ == "4.31.0", transformers.__version__
  sys.path.insert(0, os.path.abspath(args.medplib))
  from model import MedPLIB as medplib_model
  torch.set_num_threads(2)
  torch.manual_seed(SEED)
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(os.path.join(out, "checkpoint"))
  for name in os.listdir(TOKENIZER):
    shutil.copy(os.path.join(TOKENIZER, name), os.path.join(out, "checkpoint", name))
  os.chdir(out)  # config.json names the CLIP directory relative to here
  tok = transformers.AutoTokenizer.from_pretrained(  # as vqa_infer.py loads it
      "checkpoint", model_max_length=512, padding_side="right", use_fast=False, legacy=True)
  seg_token_idx = tok("<SEG>", add_special_tokens=False).input_ids[0]
  inputs = os.path.join(out, "inputs")
  write_inputs(inputs)
  built = build(out, medplib_model, seg_token_idx)
  train_ds = dataset(inputs, tok, built.get_model().get_vision_tower(), "llava_v1")
  router_seed = choose_routers(built, train_ds)
  built.save_pretrained("checkpoint")
  model = load(out, medplib_model, seg_token_idx)
  reference_state = model.state_dict()
  for k, v in built.state_dict().items():
    assert torch.equal(v, reference_state[k]), f"{k} changed in the save/load round trip"
  del built
  rec = Recorder()
  install_hooks(model, rec)
  arrays, info = run_training_forward(model, dataset(inputs, tok, model.get_model().get_vision_tower(),
                                                     "llava_v1"), rec, tok)
  gen_arrays, info["generate"] = run_generation(
      model, dataset(inputs, tok, model.get_model().get_vision_tower(), "v1"), rec, tok, arrays)
  arrays.update(gen_arrays)
  info.update(seed=SEED, router_seed=router_seed, seg_token_idx=seg_token_idx, loss_weights=LOSS_WEIGHTS, moe=MOE,
              max_new_tokens=MAX_NEW_TOKENS,
              versions={"transformers": transformers.__version__, "torch": torch.__version__,
                        "deepspeed": __import__("deepspeed").__version__})
  np.savez_compressed(os.path.join(out, "reference.npz"), **arrays)
  with open(os.path.join(out, "reference.json"), "w") as f:
    json.dump(info, f, indent=1)
  print(json.dumps({k: v for k, v in info.items() if k != "train"}, indent=1)[:3000])
  print(json.dumps(info["train"]["routing"]), info["losses"])


if __name__ == "__main__":
  main()
