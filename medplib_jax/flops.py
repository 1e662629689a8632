"""Model FLOPs of MedPLIB, per component, from a config (shared by benchmarks and the MFU log).

Conventions (the usual "model FLOPs" of MFU, as in PaLM / MaxText):
* A matmul of [T, a] by [a, b] costs 2·T·a·b. Elementwise work (norms, activations, softmax,
  rotary) is not counted; embedding lookups are free.
* Attention scores and the weighted sum cost 2·2·T·S·H·Hd per layer (queries T, keys S) over the
  full T x S square, as a dense kernel computes it; causality is not discounted. Summed over a
  training sequence this is the familiar 12·L·d·T² term of 6·N·T + 12·L·d·T² (forward 4·L·d·T²).
* MoE counts the active experts only (top_k of num_experts) plus the router.
* Training = forward + backward. The backward pass computes activation gradients (2x forward) for
  every matmul that gradients flow through, and weight gradients (another 1x) only for trained
  weights (LoRA adapters count as their own small matmuls). With everything trained this is the
  classic 6·N·T. Frozen towers under `stop_gradient` (CLIP, the SAM image encoder) have no
  backward. Rematerialisation is not counted (it is recompute, not model work).

Everything returns Python floats (FLOPs for the whole global batch).
"""

import math
import re
from collections.abc import Sequence


def matmul(tokens: float, d_in: int, d_out: int) -> float:
  return 2.0 * tokens * d_in * d_out


def attention_scores(queries: float, keys: float, num_heads: int, head_dim: int) -> float:
  """QK^T plus the probability-weighted sum of V, for `queries` x `keys` pairs per sequence."""
  return 2.0 * 2.0 * queries * keys * num_heads * head_dim


# --- per-component forward FLOPs -----------------------------------------------------------------

def vision_forward(vision_cfg, num_images: int) -> float:
  """CLIP tower up to the selected layer (CLS + patches)."""
  c = vision_cfg
  grid = c.image_size // c.patch_size
  tokens = grid * grid + 1
  index = c.select_layer if c.select_layer >= 0 else c.depth + 1 + c.select_layer
  per_layer = (matmul(tokens, c.width, 3 * c.width) + matmul(tokens, c.width, c.width)
               + matmul(tokens, c.width, c.mlp_dim) + matmul(tokens, c.mlp_dim, c.width)
               + attention_scores(tokens, tokens, c.num_heads, c.width // c.num_heads))
  patch_embed = matmul(grid * grid, c.patch_size * c.patch_size * 3, c.width)
  return num_images * (patch_embed + index * per_layer)


def projector_forward(model_cfg, num_images: int) -> float:
  """mlp2x_gelu on the image patches (Dv -> D -> D); `linear` is one Dv -> D layer."""
  v, d = model_cfg.vision, model_cfg.llm.width
  n = num_images * (v.image_size // v.patch_size) ** 2
  out = matmul(n, v.width, d)
  layers = 1 if model_cfg.projector.type == "linear" else int(re.findall(r"\d+", model_cfg.projector.type)[0])
  return out + (layers - 1) * matmul(n, d, d)


def region_adapter_forward(model_cfg, num_images: int) -> float:
  """Linear(Dv -> D) on every patch feature (before the region sampling)."""
  v = model_cfg.vision
  return matmul(num_images * (v.image_size // v.patch_size) ** 2, v.width, model_cfg.llm.width)


def llm_forward(llm_cfg, moe_cfg=None, lora_cfg=None, *, batch: int, seq_len: int,
                context: int | None = None) -> dict[str, float]:
  """LLaMA forward for `batch` x `seq_len` query tokens attending over `context` keys (default
  seq_len; a decode step has seq_len 1 and context = cache length).

  Returns {attn_proj, attn_scores, ffn (active experts), router, lm_head, lora}.
  """
  c = llm_cfg
  t = batch * seq_len
  context = seq_len if context is None else context
  d, h, kvh, hd, f, depth = c.width, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim, c.depth
  experts = 1 if moe_cfg is None else int(moe_cfg.num_experts)
  active = 1 if experts == 1 else int(moe_cfg.top_k)
  attn_proj = depth * (2 * matmul(t, d, h * hd) + 2 * matmul(t, d, kvh * hd))
  attn_scores = depth * batch * attention_scores(seq_len, context, h, hd)
  ffn = depth * active * 3 * matmul(t, d, f)
  router = depth * matmul(t, d, experts) if experts > 1 else 0.0
  lm_head = matmul(t, d, c.vocab_size)
  lora = 0.0
  if lora_cfg is not None and lora_cfg.rank:
    shapes = {"q": (d, h * hd), "k": (d, kvh * hd), "v": (d, kvh * hd), "o": (h * hd, d),
              "gate": (d, f), "up": (d, f), "down": (f, d)}
    for target in lora_cfg.targets:
      d_in, d_out = shapes[target]
      copies = active if target in ("gate", "up", "down") else 1
      lora += depth * copies * (matmul(t, d_in, lora_cfg.rank) + matmul(t, lora_cfg.rank, d_out))
  return dict(attn_proj=attn_proj, attn_scores=attn_scores, ffn=ffn, router=router,
              lm_head=lm_head, lora=lora)


def grounding_forward(model_cfg, num_masks: int) -> float:
  """text_hidden_fcs: D -> D -> prompt_embed_dim for each `<SEG>` state."""
  d = model_cfg.llm.width
  return matmul(num_masks, d, d) + matmul(num_masks, d, model_cfg.sam.prompt_embed_dim)


def sam_encoder_forward(sam_cfg, num_images: int) -> float:
  """SAM-Med2D ViT: windowed blocks attend (and project q/k/v/out) over the zero-padded grid."""
  c = sam_cfg
  grid = c.image_size // c.patch_size
  hd = c.width // c.num_heads
  total = matmul(grid * grid, c.patch_size * c.patch_size * 3, c.width)
  for i in range(c.depth):
    if i in tuple(c.global_attn_indexes) or not c.window_size:
      windows, side = 1, grid
    else:
      side = c.window_size
      windows = math.ceil(grid / side) ** 2
    attn_tokens = windows * side * side
    total += matmul(attn_tokens, c.width, 3 * c.width) + matmul(attn_tokens, c.width, c.width)
    total += windows * attention_scores(side * side, side * side, c.num_heads, hd)
    if c.use_rel_pos:  # decomposed relative positions: q . R_h and q . R_w
      total += windows * 2.0 * 2.0 * side * side * side * c.num_heads * hd
    total += matmul(grid * grid, c.width, c.mlp_dim) + matmul(grid * grid, c.mlp_dim, c.width)
    if c.adapter:
      half = (grid + 1) // 2
      total += matmul(1, c.width, c.adapter_dim) + matmul(1, c.adapter_dim, c.width)
      total += matmul(half * half, 9 * c.width, c.width)  # conv 3x3 stride 2
      total += matmul(half * half, c.width, 16 * c.width)  # conv-transpose 4x4 stride 2
  total += matmul(grid * grid, c.width, c.out_chans) + matmul(grid * grid, 9 * c.out_chans, c.out_chans)
  return num_images * total


def sam_decoder_forward(sam_cfg, num_prompts: int, sparse_tokens: int = 1) -> float:
  """Two-way transformer + upscaling + hypernetworks, per prompt (the image embedding is
  repeated per prompt, as in SAM). `sparse_tokens`: prompt tokens besides IoU + mask tokens."""
  c = sam_cfg
  dim, heads = c.prompt_embed_dim, c.decoder_num_heads
  grid = c.image_size // c.patch_size
  img = grid * grid
  mask_tokens = c.num_multimask_outputs + 1
  tok = 1 + mask_tokens + sparse_tokens
  inner = dim // 2  # cross attentions project to width / 2 (SAM's downsample rate)

  def attn(nq, nk, width):
    return (matmul(nq, dim, width) + 2 * matmul(nk, dim, width) + matmul(nq, width, dim)
            + attention_scores(nq, nk, heads, width // heads))

  layer = (attn(tok, tok, dim) + attn(tok, img, inner) + matmul(tok, dim, c.decoder_mlp_dim)
           + matmul(tok, c.decoder_mlp_dim, dim) + attn(img, tok, inner))
  total = c.decoder_depth * layer + attn(tok, img, inner)
  up1 = matmul(img, dim, 4 * (dim // 4))                    # conv-T 2x2 s2: dim -> dim/4
  up2 = matmul(4 * img, dim // 4, 4 * (dim // 8))           # conv-T 2x2 s2: dim/4 -> dim/8
  hyper = mask_tokens * (2 * matmul(1, dim, dim) + matmul(1, dim, dim // 8))
  masks = matmul(mask_tokens, dim // 8, 16 * img)
  iou = (c.iou_head_depth - 1) * matmul(1, dim, c.iou_head_hidden_dim) + matmul(
      1, c.iou_head_hidden_dim, mask_tokens)
  return num_prompts * (total + up1 + up2 + hyper + masks + iou)


# --- steps --------------------------------------------------------------------------------------

def _trained(regexes: Sequence[str], path: str) -> bool:
  return any(re.search(r, path) for r in regexes)


def forward_flops(model_cfg, lora_cfg=None, *, batch: int, seq_len: int, num_images: int | None = None,
                  num_masks: int | None = None) -> dict[str, float]:
  """Forward FLOPs of one MedPLIB training forward, by component (+ 'total').

  Defaults: one image per sample and `grounding.max_masks` masks per sample.
  """
  num_images = batch if num_images is None else num_images
  num_masks = batch * model_cfg.grounding.max_masks if num_masks is None else num_masks
  llm = llm_forward(model_cfg.llm, model_cfg.moe, lora_cfg, batch=batch, seq_len=seq_len)
  out = dict(vision=vision_forward(model_cfg.vision, num_images),
             projector=projector_forward(model_cfg, num_images),
             region_adapter=region_adapter_forward(model_cfg, num_images),
             **{f"llm_{k}": v for k, v in llm.items()},
             grounding=grounding_forward(model_cfg, num_masks),
             sam_encoder=sam_encoder_forward(model_cfg.sam, num_images),
             sam_decoder=sam_decoder_forward(model_cfg.sam, num_masks))
  out["total"] = sum(out.values())
  return out


def train_step_flops(cfg, batch: int, seq_len: int, *, trainable_regexes: Sequence[str] | None = None,
                     num_images: int | None = None, num_masks: int | None = None) -> dict[str, float]:
  """Forward + backward FLOPs of one training step of a stage config, by component (+ 'total').

  `trainable_regexes` default to the stage's `cfg.trainable`; LoRA adapters always train.
  Gradients flow through the LLM in every stage (something below or inside it trains), through
  the projector only when it trains, and through the mask decoder when it or the LLM trains.
  """
  regexes = tuple(cfg.trainable if trainable_regexes is None else trainable_regexes)
  lora = cfg.lora if cfg.lora.rank else None
  fwd = forward_flops(cfg.model, lora, batch=batch, seq_len=seq_len, num_images=num_images,
                      num_masks=num_masks)
  moe = cfg.model.moe.num_experts > 1
  ffn_path = "llm/layers/mlp/gate_proj" + ("" if moe else "/kernel")
  weight_trained = {
      "llm_attn_proj": _trained(regexes, "llm/layers/self_attn/q_proj/kernel"),
      "llm_ffn": _trained(regexes, ffn_path),
      "llm_router": _trained(regexes, "llm/layers/mlp/router/kernel"),
      "llm_lm_head": _trained(regexes, "llm/lm_head/kernel"),
      "llm_lora": True,
      "projector": _trained(regexes, "projector/linear_1/kernel"),
      "region_adapter": _trained(regexes, "region_adapter/kernel"),
      "grounding": _trained(regexes, "text_hidden_fcs/fc1/kernel"),
      "sam_decoder": _trained(regexes, "sam/mask_decoder/iou_token"),
  }
  out = {}
  for name, f in fwd.items():
    if name == "total":
      continue
    if name in ("vision", "sam_encoder"):  # frozen, under stop_gradient
      factor = 1.0
    elif name == "projector":
      factor = 3.0 if weight_trained[name] else 1.0
    elif name == "llm_attn_scores":
      factor = 3.0  # no weights: the backward is twice the forward
    else:
      factor = 3.0 if weight_trained.get(name, False) else 2.0
    out[name] = factor * f
  out["total"] = sum(out.values())
  return out


def decode_step_flops(model_cfg, *, batch: int, context: int) -> float:
  """One greedy decode step: `batch` new tokens against `context` cached keys (LoRA merged)."""
  return sum(llm_forward(model_cfg.llm, model_cfg.moe, None, batch=batch, seq_len=1,
                         context=context).values())


def decode_bytes(model_cfg, *, batch: int, context: int, param_bytes: int = 2,
                 cache_bytes: int = 2) -> float:
  """HBM bytes a decode step must read: every LLM weight once except the inactive experts, plus
  the whole KV cache (its `context` slots). Used for the achieved-bandwidth fraction."""
  c, moe = model_cfg.llm, model_cfg.moe
  inactive = 0
  if moe.num_experts > 1:
    inactive = (moe.num_experts - moe.top_k) * c.depth * 3 * c.width * c.mlp_dim
  kv = 2 * c.depth * batch * context * c.num_kv_heads * c.head_dim
  return float((llm_param_count(model_cfg) - inactive) * param_bytes + kv * cache_bytes)


def llm_param_count(model_cfg) -> int:
  """Parameters of the LLM (embeddings, layers incl. every expert and router, norms, head)."""
  c, e = model_cfg.llm, int(model_cfg.moe.num_experts)
  attn = 2 * c.width * c.num_heads * c.head_dim + 2 * c.width * c.num_kv_heads * c.head_dim
  ffn = e * 3 * c.width * c.mlp_dim + (c.width * e if e > 1 else 0)
  return int(2 * c.vocab_size * c.width + c.depth * (attn + ffn + 2 * c.width) + c.width)


def mfu(flops_per_step: float, step_time_s: float, peak_flops_per_device: float,
        num_devices: int = 1) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak FLOP/s."""
  if step_time_s <= 0 or peak_flops_per_device <= 0 or num_devices <= 0:
    raise ValueError(f"mfu needs positive step time, peak and device count, got {step_time_s}, "
                     f"{peak_flops_per_device}, {num_devices}")
  return flops_per_step / step_time_s / (peak_flops_per_device * num_devices)


# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_BF16_FLOPS = {"h100": 989e12, "h200": 989e12, "tpu_v5e": 197e12, "tpu_v5p": 459e12}
# HBM bandwidth, bytes/s per device.
PEAK_HBM_BYTES_PER_S = {"h100": 3.35e12, "h200": 4.8e12, "tpu_v5e": 0.819e12, "tpu_v5p": 2.765e12}
