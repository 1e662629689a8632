"""Stand-ins for the pretrained encoders, for the embedded demo only.

The published recipe starts from pretrained CLIP ViT-L/14-336 and SAM-Med2D weights and keeps
both frozen. No model hub is reachable here, so `medplib demo` first trains tiny stand-ins on the
synthetic training split with the encoders' own kinds of objective, then freezes them exactly as
the recipe does:

* SAM: promptable segmentation (SAM's task): box prompt -> mask, BCE + Dice, all SAM params.
* CLIP: supervised image pre-training of the tower: modality (softmax) and structure presence
  (sigmoid) heads on the mean patch feature, and a dense head that names the structures each
  patch shows (sigmoid per class, target: the class's mask covers > 30 % of the patch), so the
  patch features the LLM reads are local and semantic, as CLIP's are; the heads are thrown away.

Each writes a model directory fragment `<out>/params` holding only its component (`sam` or
`vision`), which stage 1 reads through `config.init.sam` / `config.init.clip`.
"""

import collections
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from medplib_jax.data import canvas
from medplib_jax.models.clip import ClipVisionTower
from medplib_jax.models.sam import SamMed2D
from medplib_jax.checkpoint import model_dir
from medplib_jax.train import losses


def _load_image(root, rel):
  return np.asarray(Image.open(os.path.join(root, rel)).convert("RGB"))


def _mask_path(record) -> str:
  return record["conversations"][1]["value"].split("<mask>")[1].split("</mask>")[0]


def _fit(params, loss_fn, arrays, *, steps, lr, batch_size, seed, log, label, metric):
  """AdamW (warm-up + cosine) on random batches of `arrays`; loss_fn(p, *batch) -> (loss, metric)."""
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps),
                   weight_decay=0.0)

  @jax.jit
  def step(p, o, *batch):
    (loss, value), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, *batch)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss, value

  opt, rng = tx.init(params), np.random.default_rng(seed)
  for i in range(steps):
    idx = rng.integers(0, len(arrays[0]), batch_size)
    params, opt, loss, value = step(params, opt, *(a[idx] for a in arrays))
    if (i + 1) % max(1, steps // 5) == 0:
      log(f"[stand-in {label}] step {i + 1}/{steps}: loss {float(loss):.3f}, {metric} {float(value):.3f}")
  return params


def pretrain_sam(model_cfg, grounding_json: str, image_root: str, out: str, steps: int,
                 seed: int = 0, batch_size: int = 8, lr: float = 1e-3, log=print) -> str:
  """Box-prompted segmentation on the grounding records; returns the output directory."""
  size = model_cfg.sam.image_size
  records = json.load(open(grounding_json))
  images, masks, boxes = [], [], []
  for r in records:
    images.append(canvas.sam_canvas(_load_image(image_root, r["image"]), size)[0])
    m = canvas.mask_canvas(np.asarray(Image.open(os.path.join(image_root, _mask_path(r)))) > 0, size)
    ys, xs = np.nonzero(m)
    masks.append(m)
    boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
  images, masks, boxes = np.stack(images), np.stack(masks), np.asarray(boxes, np.float32)
  model = SamMed2D(model_cfg.sam)
  params = nn.unbox(model.init(jax.random.key(seed), images[:1], jnp.zeros((1,), jnp.int32))["params"])

  def loss_fn(p, image, box, mask):
    emb = model.apply({"params": p}, image, method=SamMed2D.encode_image)
    index = jnp.arange(image.shape[0], dtype=jnp.int32)
    low, _ = model.apply({"params": p}, emb, index, boxes=box, method=SamMed2D.decode)
    per = losses.per_mask_losses(losses.upsample_logits(low[:, 0], size), mask, jnp.ones_like(mask))
    return (per["bce"] + per["dice"]).mean(), per["iou"].mean()

  params = _fit(params, loss_fn, (images, boxes, masks), steps=steps, lr=lr, batch_size=batch_size,
                seed=seed, log=log, label="SAM", metric="box-prompt IoU")
  model_dir.save_params(out, {"sam": params})
  return out


PATCH_COVERAGE = 0.3  # a patch "shows" a structure whose mask covers more than this of it


def patch_coverage(mask, size: int, patch: int) -> np.ndarray:
  """bool [H, W] mask -> float32 [(size // patch) ** 2]: the fraction of each CLIP patch it covers
  on the CLIP canvas (resize longest side, centred pad)."""
  on_canvas = canvas.mask_canvas(mask, size).astype(np.float32)
  grid = size // patch
  return on_canvas.reshape(grid, patch, grid, patch).mean(axis=(1, 3)).reshape(-1)


def pretrain_clip(model_cfg, records_json: str, image_root: str, out: str, steps: int,
                  seed: int = 0, batch_size: int = 16, lr: float = 1e-3, log=print) -> str:
  """Modality, structure presence and per-patch structure classification on the training images
  (one sample per image; structure masks from its grounding records)."""
  size, patch = model_cfg.vision.image_size, model_cfg.vision.patch_size
  records = json.load(open(records_json))
  per_image = collections.OrderedDict()
  for r in records:
    entry = per_image.setdefault(r["image"], {"modality": r.get("modality"), "masks": {}})
    if r.get("task") == "G" and r.get("structure"):
      entry["masks"][r["structure"]] = _mask_path(r)
  modalities = sorted({v["modality"] for v in per_image.values()})
  names = sorted({s for v in per_image.values() for s in v["masks"]})
  images = np.stack([canvas.clip_canvas(_load_image(image_root, k), size)[0] for k in per_image])
  modality = np.array([modalities.index(v["modality"]) for v in per_image.values()])
  coverage = np.zeros((len(per_image), (size // patch) ** 2, len(names)), np.float32)
  for i, v in enumerate(per_image.values()):
    for name, rel in v["masks"].items():
      mask = np.asarray(Image.open(os.path.join(image_root, rel))) > 0
      coverage[i, :, names.index(name)] = patch_coverage(mask, size, patch)
  present = (coverage.max(axis=1) > 0).astype(np.float32)
  shows = (coverage > PATCH_COVERAGE).astype(np.float32)

  tower = ClipVisionTower(model_cfg.vision)
  width, classes = model_cfg.vision.width, len(modalities) + len(names)
  key_tower, key_head, key_dense = jax.random.split(jax.random.key(seed), 3)
  params = {"vision": nn.unbox(tower.init(key_tower, images[:1])["params"]),
            "head": {"w": jax.random.normal(key_head, (width, classes)) * 0.02,
                     "b": jnp.zeros((classes,))},
            "dense": {"w": jax.random.normal(key_dense, (width, len(names))) * 0.02,
                      "b": jnp.zeros((len(names),))}}

  def loss_fn(p, image, mod, pres, patch_shows):
    feats = tower.apply({"params": p["vision"]}, image)  # [B, N, W]
    logits = feats.mean(axis=1) @ p["head"]["w"] + p["head"]["b"]
    mod_logits, pres_logits = logits[:, :len(modalities)], logits[:, len(modalities):]
    patch_logits = feats @ p["dense"]["w"] + p["dense"]["b"]  # [B, N, classes]
    ce = optax.softmax_cross_entropy_with_integer_labels(mod_logits, mod).mean()
    bce = optax.sigmoid_binary_cross_entropy(pres_logits, pres).mean()
    # Summed over classes (most patches show none): comparable in size to the image-level terms.
    dense = optax.sigmoid_binary_cross_entropy(patch_logits, patch_shows).mean() * len(names)
    acc = (mod_logits.argmax(-1) == mod).mean()
    return ce + bce + dense, acc

  params = _fit(params, loss_fn, (images, modality, present, shows), steps=steps, lr=lr,
                batch_size=batch_size, seed=seed, log=log, label="CLIP", metric="modality acc")
  model_dir.save_params(out, {"vision": params["vision"]})
  return out
