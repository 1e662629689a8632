"""Input pipeline throughput: 512x512 PNG + mask -> tokens, CLIP canvas, SAM canvas, mask canvas.

Ours: the grain pipeline (`make_train_iterator`, 0 and 2 workers) at the 7B canvas sizes (336 /
256). Reference: a PyTorch Dataset/DataLoader (0 and 2 workers) doing MedPLIB's
LazySupervisedDataset steps on the same files with PIL in place of cv2 (cv2 is not installed):
decode, ResizeLongestSide (PIL bilinear, as SAM's `apply_image`), per-channel centred padding,
the CLIP image processor (PIL backend), mask binarisation, and `preprocess_v1` tokenisation with
the same tokenizer. Both sides do no training augmentation on these grounding records.

Run: .venv/bin/python bench/bench_data.py
"""

import copy
import json
import os
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import compare, write_result  # noqa: E402
from configs.common import base_config  # noqa: E402
from medplib_jax.data import pipeline  # noqa: E402
from medplib_jax.data.mecovqa import load_records  # noqa: E402
from medplib_jax.data.template import template_texts  # noqa: E402
from medplib_jax.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

N_FILES = 32
BATCH = 8
# Many batches per timing so that the background buffers of both sides (a few batches) matter little.
BATCHES_PER_REP = 24
SIZE = 512


def make_files(root: str) -> str:
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  os.makedirs(os.path.join(root, "masks"), exist_ok=True)
  yy, xx = np.mgrid[:SIZE, :SIZE]
  records = []
  for i in range(N_FILES):
    cy, cx, r = rng.integers(120, 392), rng.integers(120, 392), rng.integers(40, 110)
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    img = (rng.normal(90, 25, (SIZE, SIZE, 3)) + 80 * inside[..., None]).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(root, f"images/ct_{i}.png"))
    Image.fromarray(inside.astype(np.uint8) * 255).save(os.path.join(root, f"masks/ct_{i}.png"))
    records.append({"id": str(i), "image": f"images/ct_{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nPlease segment the liver in this CT image."},
        {"from": "gpt", "value": f"Sure, it is <SEG><mask>masks/ct_{i}.png</mask>."}]})
  path = os.path.join(root, "train.json")
  json.dump(records, open(path, "w"))
  return path


class ReferenceDataset:
  """MedPLIB's LazySupervisedDataset.__getitem__ steps for an image + <mask> record (torch, PIL)."""

  PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
  PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)

  def __init__(self, json_path, root, tok, max_length):
    import torch
    from transformers import CLIPImageProcessorPil
    self.torch = torch
    self.records = load_records(json_path)
    self.root, self.tok, self.max_length = root, tok, max_length
    self.processor = CLIPImageProcessorPil(size={"shortest_edge": 336},
                                           crop_size={"height": 336, "width": 336})
    self.clip_mean = (torch.tensor([0.48145466, 0.4578275, 0.40821073]) * 255).to(torch.int)

  def __len__(self):
    return len(self.records)

  @staticmethod
  def _apply_image(image, target):  # SAM ResizeLongestSide.apply_image
    h, w = image.shape[:2]
    scale = target / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    return np.array(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))

  def _pad(self, x, size, values):
    torch = self.torch
    pad_h, pad_w = size - x.shape[-2], size - x.shape[-1]
    top, left = pad_h // 2, pad_w // 2
    out = torch.empty((x.shape[0], size, size), dtype=x.dtype)
    for c in range(x.shape[0]):
      out[c] = values[c]
    out[:, top:top + x.shape[1], left:left + x.shape[2]] = x
    return out

  def _tokenize(self, conversations):
    from medplib_jax.data.template import tokenize_conversation
    return tokenize_conversation(conversations, self.tok, "llava_v1")

  def __getitem__(self, i):
    torch = self.torch
    rec = copy.deepcopy(self.records[i])
    answer = rec["conversations"][1]["value"]
    mask_name = answer.split("<mask>")[1].split("</mask>")[0]
    mask = np.array(Image.open(os.path.join(self.root, mask_name)).convert("L"))
    mask[mask >= 1] = 1
    rec["conversations"][1]["value"] = answer.replace(f"<mask>{mask_name}</mask>", "")
    image = np.array(Image.open(os.path.join(self.root, rec["image"])).convert("RGB"))
    sam = torch.from_numpy(self._apply_image(image, 256)).permute(2, 0, 1).float()
    sam = (sam - torch.from_numpy(self.PIXEL_MEAN)[:, None, None]) / torch.from_numpy(self.PIXEL_STD)[:, None, None]
    sam = self._pad(sam, 256, torch.zeros(3))
    clip = torch.from_numpy(self._apply_image(image, 336)).permute(2, 0, 1).contiguous()
    clip = self._pad(clip, 336, self.clip_mean)
    clip = self.processor.preprocess(clip, return_tensors="pt")["pixel_values"][0]
    tok = self._tokenize(rec["conversations"])
    return {"input_ids": torch.tensor(tok.input_ids), "labels": torch.tensor(tok.labels),
            "clip": clip, "sam": sam, "mask": torch.from_numpy(mask).float()}


def _collate(items):
  import torch
  out = {k: torch.stack([it[k] for it in items]) for k in ("clip", "sam", "mask")}
  for k in ("input_ids", "labels"):
    out[k] = torch.nn.utils.rnn.pad_sequence([it[k] for it in items], batch_first=True,
                                             padding_value=0 if k == "input_ids" else -100)
  return out


def _endless(make):
  while True:
    yield from make()


def main():
  import torch
  torch.set_num_threads(1)
  with tempfile.TemporaryDirectory() as root:
    json_path = make_files(root)
    texts = [t["value"] for r in load_records(json_path) for t in r["conversations"]]
    tok = load_tokenizer(train_tokenizer(texts * 10 + template_texts() * 20,
                                         os.path.join(root, "tok")))
    cfg = base_config(stage=3, size="7b")
    cfg.data.train = (json_path,)
    cfg.data.image_root = root
    cfg.data.max_length = 1024
    cfg.optim.global_batch_size = BATCH

    ours = {}
    for workers in (0, 2):
      c = copy.deepcopy(cfg)
      c.data.num_workers = workers
      ours[workers] = pipeline.make_train_iterator(c, tok)
    ds = ReferenceDataset(json_path, root, tok, cfg.data.max_length)
    ref = {w: _endless(lambda w=w: torch.utils.data.DataLoader(
        ds, batch_size=BATCH, shuffle=True, num_workers=w, collate_fn=_collate,
        persistent_workers=w > 0, drop_last=True)) for w in (0, 2)}

    def pull(it):
      return lambda: [next(it) for _ in range(BATCHES_PER_REP)]

    fns = {"grain_0_workers": pull(ours[0]), "grain_2_workers": pull(ours[2]),
           "torch_0_workers": pull(ref[0]), "torch_2_workers": pull(ref[2])}
    timings = compare(fns, reps=5, warmup=1)
    samples = BATCH * BATCHES_PER_REP
    rate = {k: samples / v["median_s"] for k, v in timings.items()}
    for k, v in timings.items():
      v["samples_per_s"] = rate[k]
    ratio = rate["grain_2_workers"] / rate["torch_2_workers"]
    path = write_result(
        "data_pipeline",
        what="samples/s: 512x512 PNG + mask -> tokens + CLIP (336) + SAM (256) canvases + mask",
        command="python bench/bench_data.py",
        inputs={"files": N_FILES, "image": f"{SIZE}x{SIZE} RGB PNG", "batch": BATCH,
                "batches_per_rep": BATCHES_PER_REP, "max_length": cfg.data.max_length},
        timings=timings, ratio=ratio,
        ratio_means="grain pipeline (2 workers) samples/s / PyTorch DataLoader (2 workers) samples/s",
        goal=">= 1.5",
        extra={"samples_per_s": rate,
               "ratio_0_workers": rate["grain_0_workers"] / rate["torch_0_workers"]})
    print(json.dumps(rate, indent=1), "ratio", ratio, "->", path)


if __name__ == "__main__":
  main()
