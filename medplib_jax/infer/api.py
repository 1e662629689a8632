"""The user-facing Python API: load a model directory once, answer questions, decode `<SEG>` masks.

    from medplib_jax import MedPLIB
    model = MedPLIB.from_pretrained("runs/demo/stage4/export")
    out = model.predict("ct_0001.png", "Please segment the liver.")
    out.text, out.masks        # str, [bool [H, W]] at the original image size

One call runs, for a batch of prompts padded to a shared bucket length (left padding):
  host:   region prompt (point / box / polygon / mask) -> region mask; image, earlier rounds,
          question and region masks -> the sample as training lays it out (canvases, template
          prompt, token ids with the image and region slots, patch grids:
          data/preprocess.py `conversation_sample`) -> batch contract (data/batch.py `collate`)
  device: CLIP features + spliced embeddings (jit) -> KV-cache generation (infer/generate.py)
          -> SAM-Med2D decode of the state that predicted each `<SEG>` (jit)
  host:   low-res logits -> original size (infer/masks.py) -> threshold.

Two settings (SPEC.md, Evaluation): ``correct`` (default: training template, correct crop,
sigmoid > 0.5) and ``reference`` (vicuna_v1 prompt, the reference crop, sigmoid > 0.1, and the
"forced" mask decoded from the state at position -2 when no `<SEG>` was generated).
"""

import dataclasses
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from medplib_jax.checkpoint import model_dir as model_dir_lib
from medplib_jax.data import canvas, prompts
from medplib_jax.data.batch import collate
from medplib_jax.data.mecovqa import DEFAULT_MAX_PIXELS, BadRecord, decode_image
from medplib_jax.data.preprocess import ConversationSample, conversation_sample
from medplib_jax.data.template import GPT, HUMAN
from medplib_jax.data.tokenizer import IMAGE_TOKEN, load_tokenizer
from medplib_jax.infer.generate import generate
from medplib_jax.infer.masks import REFERENCE_THRESHOLD, mask_probabilities, postprocess_logits
from medplib_jax.models.clip import num_image_tokens
from medplib_jax.models.llama import LlamaForCausalLM, inference_layout
from medplib_jax.models.medplib import MedPLIB as MedPLIBModule

MODES = ("correct", "reference")
CORRECT_THRESHOLD = 0.5
REGION_TAGS = "<region></region>"
PROMPT_BUCKET = 32  # prompts are padded to a multiple of this: few compiled shapes
# What the embedding step reads of the batch contract (the rest stays on the host).
EMBED_KEYS = ("input_ids", "attention_mask", "image_start", "region_positions", "region_masks",
              "clip_image")


class InputError(ValueError):
  """Bad user input (unreadable image, prompt outside the image, empty or over-long question)."""


@dataclasses.dataclass
class Prediction:
  """One answer. text: the answer as the reference writes it (its slow decode with special
  tokens skipped: `<s> </s>` go, MedPLIB's tokens such as `<SEG>` stay, spaced); raw_text: the
  same with special tokens kept; tokens: the generated ids (eos dropped); seg_positions: the
  indices in `tokens` of the `<SEG>` tokens; masks: bool [H, W] per decoded `<SEG>` (original
  image size); mask_scores: the model's IoU prediction per mask; forced: the mask came from the
  reference's forced position; mask_probs: float32 [H, W] per mask, the probabilities the masks
  threshold."""
  text: str
  masks: list
  mask_scores: list
  seg_found: bool
  forced: bool
  raw_text: str
  tokens: list
  mask_probs: list = dataclasses.field(default_factory=list)
  seg_positions: list = dataclasses.field(default_factory=list)


def _find_model_dir(path: str) -> str:
  """Accepts a model directory or a training workdir holding export/."""
  for candidate in (path, os.path.join(path, "export")):
    if os.path.isfile(os.path.join(candidate, "config.json")) and os.path.isdir(
        os.path.join(candidate, "params")):
      return candidate
  raise FileNotFoundError(f"{path!r} is not a MedPLIB model directory (need params/ and "
                          "config.json, as `medplib train` exports or `medplib convert` writes)")


def load_image(image, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Path / encoded bytes / PIL image / uint8 array [H, W(, 3)] -> uint8 RGB [H, W, 3]."""
  try:
    if isinstance(image, (str, os.PathLike)):
      with open(image, "rb") as f:
        return decode_image(f.read(), str(image), max_pixels)
    if isinstance(image, (bytes, bytearray)):
      return decode_image(bytes(image), "image", max_pixels)
    if isinstance(image, Image.Image):
      buf = io.BytesIO()
      image.save(buf, format="PNG")
      return decode_image(buf.getvalue(), "image", max_pixels)
  except OSError as e:
    raise InputError(f"cannot read image {image!r}: {e}") from e
  except BadRecord as e:
    raise InputError(f"image is not usable: {e.detail}") from e
  array = np.asarray(image)
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.dtype != np.uint8:
    raise InputError(f"image array must be uint8 [H, W] or [H, W, 3|4], got {array.dtype} {array.shape}")
  if array.shape[0] * array.shape[1] > max_pixels:
    raise InputError(f"image {array.shape[1]}x{array.shape[0]} exceeds the pixel limit {max_pixels}")
  return np.ascontiguousarray(array[..., :3])


def region_from_prompt(hw, point=None, box=None, polygon=None, region_mask=None):
  """At most one of the prompts -> bool [H, W] region mask (None without a prompt)."""
  given = {k: v for k, v in dict(point=point, box=box, polygon=polygon, stroke=region_mask).items()
           if v is not None}
  if not given:
    return None
  if len(given) > 1:
    raise InputError(f"give at most one region prompt, got {sorted(given)}")
  try:
    return prompts.prompt_mask(hw, given)
  except prompts.PromptError as e:
    raise InputError(str(e)) from e


class MedPLIB:
  """A loaded MedPLIB model for inference. Build with `MedPLIB.from_pretrained(path)`."""

  def __init__(self, config, params, tokenizer, mode: str = "correct", template: str | None = None):
    if mode not in MODES:
      raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    # Decoding runs faster with the layers unrolled and the experts split (models/llama.py):
    # convert once, here.
    config = config.copy_and_resolve_references()
    config.model.llm, config.model.moe, llm_params = inference_layout(
        config.model.llm, config.model.moe, params["llm"])
    params = dict(params, llm=llm_params)
    self.config = config
    self.model_cfg = config.model
    self.params = params
    self.tokenizer = tokenizer
    self.mode = mode
    self.template = template or config.data.template
    cfg = self.model_cfg
    self.num_image_tokens = num_image_tokens(cfg.vision)
    self.max_regions = cfg.region.max_regions
    self.max_masks = max(1, cfg.grounding.max_masks)
    self.max_length = cfg.llm.max_length
    self.module = MedPLIBModule(cfg, None)  # LoRA is merged in exported params
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.llm = LlamaForCausalLM(cfg.llm, cfg.moe, None, dtype=dtype, param_dtype=param_dtype)
    module = self.module

    def embed(params, batch):
      features = module.apply({"params": params}, batch["clip_image"],
                              method=MedPLIBModule.image_features)
      return module.apply({"params": params}, batch, features, True,
                          method=MedPLIBModule.multimodal_embeddings)

    def decode(params, sam_image, hidden, index):
      states = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [B, M, D]
      return module.apply({"params": params}, sam_image, states, method=MedPLIBModule.decode_masks)

    self._embed = jax.jit(embed)
    self._decode = jax.jit(decode)

  # --- loading -----------------------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, path: str, mode: str = "correct", template: str | None = None,
                      tokenizer_path: str | None = None) -> "MedPLIB":
    """Loads `<path>/{params, config.json, tokenizer/}` (a stage export or converted weights)."""
    model_dir = _find_model_dir(path)
    config = model_dir_lib.load_config(model_dir)
    params = model_dir_lib.load_params(model_dir)
    tok_dir = tokenizer_path or os.path.join(model_dir, "tokenizer")
    if not os.path.isdir(tok_dir):
      tok_dir = config.data.tokenizer
    tokenizer = load_tokenizer(tok_dir)
    if len(tokenizer) != config.model.llm.vocab_size:
      raise ValueError(f"tokenizer {tok_dir!r} has {len(tokenizer)} tokens but the model's "
                       f"vocabulary is {config.model.llm.vocab_size}")
    return cls(config, params, tokenizer, mode=mode, template=template)

  # --- host-side preparation -----------------------------------------------------------------------

  def prepare(self, image: np.ndarray, question: str, region_masks=(), template: str | None = None,
              max_new_tokens: int = 0, history=()) -> ConversationSample:
    """The generation prompt for `question` about a uint8 RGB image [H, W, 3], laid out as
    training lays out a conversation (data/preprocess.py `conversation_sample`).

    region_masks: bool [H, W] per `<region></region>` of the conversation, in order (the tags
    are appended to the question when regions are given and no turn has one). history: earlier
    rounds as (question, answer) pairs; the image goes with the first question.
    """
    if not isinstance(question, str) or not question.strip():
      raise InputError("the question is empty")
    history = [tuple(turn) for turn in history or ()]
    if any(len(turn) != 2 for turn in history):
      raise InputError("history must be a list of (question, answer) pairs")
    asked = [str(q) for q, _ in history] + [question]
    region_masks = [np.asarray(m, bool) for m in region_masks]
    if region_masks and not any(REGION_TAGS in q for q in asked):
      asked[-1] = question.rstrip() + " " + REGION_TAGS
    n_tags = sum(q.count(REGION_TAGS) for q in asked)
    if n_tags != len(region_masks):
      raise InputError(f"the question refers to {n_tags} region(s) ({REGION_TAGS}) but "
                       f"{len(region_masks)} region prompt(s) were given")
    if n_tags > self.max_regions:
      raise InputError(f"{n_tags} regions given; the model takes at most {self.max_regions}")
    for m in region_masks:
      if m.shape != image.shape[:2]:
        raise InputError(f"region mask is {m.shape[1]}x{m.shape[0]} but the image is "
                         f"{image.shape[1]}x{image.shape[0]} (WxH)")
    conversations = []
    for i, q in enumerate(asked):
      q = q.replace(IMAGE_TOKEN, "").strip()
      conversations.append({"from": HUMAN, "value": IMAGE_TOKEN + "\n" + q if i == 0 else q})
      if i < len(history):
        conversations.append({"from": GPT, "value": str(history[i][1])})
    try:
      sample = conversation_sample(image, conversations, region_masks, self.tokenizer,
                                   self.model_cfg, template or self.template, generation=True)
    except BadRecord as e:
      raise InputError(e.detail) from e
    budget = self.max_length - max_new_tokens
    if len(sample.ids) > budget:
      raise InputError(f"the question is too long: {len(sample.ids)} prompt tokens (with "
                       f"{self.num_image_tokens} image tokens) + {max_new_tokens} new tokens exceed "
                       f"the model's {self.max_length}")
    return sample

  # --- device run ----------------------------------------------------------------------------------

  def _batch(self, samples: list[ConversationSample], batch_size: int) -> dict:
    """The batch contract, left-padded (every prompt ends where generation starts) to a bucket
    length; rows past the samples repeat the last one (their outputs are dropped)."""
    longest = max(len(s.ids) for s in samples)
    length = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    length = min(length, self.max_length) if longest <= self.max_length else longest
    rows = samples + [samples[-1]] * (batch_size - len(samples))
    return collate([s.arrays() for s in rows], self.model_cfg, length, self.tokenizer.pad_id,
                   padding="left")

  def run(self, samples: list[ConversationSample], *, max_new_tokens: int = 64, temperature: float = 0.0,
          top_p: float = 1.0, seed: int = 0, mode: str | None = None, force_mask: bool | None = None,
          batch_size: int | None = None) -> list[Prediction]:
    """Generates for prepared samples (one device batch of `batch_size`, default len(samples)).

    force_mask (default: True in reference mode): decode a mask even when no `<SEG>` was
    generated, from the reference's position -2, i.e. the state that predicted the second-to-last
    generated token (the first generated token when only one was produced).
    """
    mode = mode or self.mode
    if mode not in MODES:
      raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    force_mask = (mode == "reference") if force_mask is None else force_mask
    batch_size = max(batch_size or len(samples), len(samples))
    batch = self._batch(samples, batch_size)
    embeds = self._embed(self.params, {k: batch[k] for k in EMBED_KEYS})
    rng = jax.random.key(seed)
    out = generate(self.llm, {"params": self.params["llm"]}, inputs_embeds=embeds,
                   attention_mask=batch["attention_mask"], max_new_tokens=int(max_new_tokens),
                   eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, rng=rng,
                   temperature=float(temperature), top_p=float(top_p))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)

    m = self.max_masks
    index = np.zeros((batch_size, m), np.int32)
    decode_rows, forced = {}, {}
    for i in range(len(samples)):
      n = int(lengths[i])
      seg_at = [t for t in range(n) if tokens[i, t] == self.tokenizer.seg_id][:m]
      if not seg_at and force_mask:
        seg_at, forced[i] = [max(n - 2, 0)], True
      if seg_at:
        index[i, :len(seg_at)] = seg_at
        decode_rows[i] = len(seg_at)
    logits = iou = None
    if decode_rows:
      logits, iou = self._decode(self.params, batch["sam_image"], out.hidden, index)
      logits, iou = np.asarray(logits), np.asarray(iou)

    threshold = REFERENCE_THRESHOLD if mode == "reference" else CORRECT_THRESHOLD
    results = []
    for i, s in enumerate(samples):
      n = int(lengths[i])
      toks = [int(t) for t in tokens[i, :n]]
      if toks and toks[-1] == self.tokenizer.eos_id:
        toks = toks[:-1]
      masks, scores, probs = [], [], []
      if i in decode_rows:
        k = decode_rows[i]
        geo = canvas.geometry(s.orig_hw, self.model_cfg.sam.image_size)
        probs = list(mask_probabilities(postprocess_logits(logits[i, :k], geo, mode)))
        masks = [p > np.float32(threshold) for p in probs]
        scores = [float(v) for v in iou[i, :k]]
      results.append(Prediction(
          text=self.tokenizer.decode(toks, skip_special_tokens=True).strip(),
          masks=masks, mask_scores=scores, seg_found=self.tokenizer.seg_id in toks,
          forced=bool(forced.get(i)), raw_text=self.tokenizer.decode(toks), tokens=toks,
          mask_probs=probs,
          seg_positions=[t for t, v in enumerate(toks) if v == self.tokenizer.seg_id]))
    return results

  # --- public calls --------------------------------------------------------------------------------

  def predict(self, image, question: str, point=None, box=None, region_mask=None, polygon=None,
              history=(), **kwargs) -> Prediction:
    """Answers one question. image: path, encoded bytes, PIL image or uint8 array. Region prompt
    (at most one, original-image pixels): point (x, y), box (x0, y0, x1, y1), polygon
    [(x, y), ...] or region_mask (bool/uint8 array of the image size, or a PNG path).
    history: earlier rounds as (question, answer) pairs.
    kwargs: max_new_tokens, temperature, top_p, seed, mode, force_mask, template."""
    prompt = {k: v for k, v in dict(point=point, box=box, polygon=polygon,
                                     region_mask=region_mask).items() if v is not None}
    return self.predict_batch([image], [question], [prompt or None], histories=[history],
                              **kwargs)[0]

  def predict_batch(self, images, questions, region_prompts=None, *, max_new_tokens: int = 64,
                    template: str | None = None, batch_size: int | None = None,
                    histories=None, **kwargs) -> list[Prediction]:
    """Answers several questions in one batched call. region_prompts: per sample None or a dict
    with one of point / box / polygon / region_mask (see `predict`); histories: per sample the
    earlier rounds as (question, answer) pairs."""
    if len(images) != len(questions):
      raise InputError(f"{len(images)} images but {len(questions)} questions")
    region_prompts = region_prompts or [None] * len(images)
    histories = histories or [()] * len(images)
    mode = kwargs.get("mode") or self.mode
    if template is None and mode == "reference":
      template = "vicuna_v1"
    samples = []
    for image, question, prompt, history in zip(images, questions, region_prompts, histories):
      array = load_image(image)
      region = region_from_prompt(array.shape[:2], **(prompt or {}))
      samples.append(self.prepare(array, question, [] if region is None else [region],
                                  template=template, max_new_tokens=max_new_tokens,
                                  history=history))
    return self.run(samples, max_new_tokens=max_new_tokens, batch_size=batch_size, **kwargs)



def mask_png(mask) -> bytes:
  """bool [H, W] -> 8-bit PNG bytes (0 / 255)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).save(buf, format="PNG")
  return buf.getvalue()


def overlay(image: np.ndarray, masks, colour=(255, 40, 40), alpha: float = 0.45) -> np.ndarray:
  """uint8 RGB [H, W, 3] with each mask blended in `colour` -> uint8 RGB [H, W, 3]."""
  out = image.astype(np.float32)
  for m in masks:
    m = np.asarray(m, bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(colour, np.float32)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)
