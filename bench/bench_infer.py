"""Inference benchmarks on the tiny model (CPU here; the same script runs on an accelerator):

* generation tokens/s of the full multimodal path (CLIP + splice + prefill + KV-cache decode),
  batch 4, from `MedPLIB.run` with 1 and with N new tokens (decode rate from the difference);
* grounding latency per image: answer + forced `<SEG>` mask (SAM encode/decode, original-size
  post-processing) against the same call without the mask;
* served requests/s on loopback: `medplib serve`'s server in-process, 4 client threads.

The ours-vs-torch generation comparison lives in bench_generate.py.
Run: .venv/bin/python -m bench.bench_infer  -> bench/results/infer.json
"""

import base64
import io
import json
import os
import tempfile
import threading
import time
import urllib.request

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.harness import compare, write_result  # noqa: E402

BATCH, NEW_TOKENS, REQUESTS, CLIENTS = 4, 32, 16, 4


def _image(seed, hw=(96, 128)):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 255, hw + (3,)).astype(np.uint8)


def main():
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
  from tiny_checkpoint import make_tiny_checkpoint
  from medplib_jax.infer.api import MedPLIB
  from medplib_jax.serve import server as srv

  ckpt = make_tiny_checkpoint(tempfile.mkdtemp(prefix="bench_infer_"))
  model = MedPLIB.from_pretrained(ckpt)
  questions = ["What modality is this image?", "Is there a lesion?", "Where is the liver?",
               "Please segment the kidney."]
  samples = [model.prepare(_image(i), q, max_new_tokens=NEW_TOKENS) for i, q in enumerate(questions)]

  def answer(new_tokens, force_mask=False, rows=samples):
    return lambda: model.run(rows, max_new_tokens=new_tokens, force_mask=force_mask,
                             batch_size=len(rows))

  gen = compare({"prefill_1_token": answer(1), f"generate_{NEW_TOKENS}_tokens": answer(NEW_TOKENS)},
                reps=5)
  t1, tn = gen["prefill_1_token"]["median_s"], gen[f"generate_{NEW_TOKENS}_tokens"]["median_s"]
  lengths = [len(p.tokens) for p in answer(NEW_TOKENS)()]
  generated = sum(lengths)

  one = samples[3:4]
  ground = compare({"answer_only": answer(8, False, one), "answer_and_mask": answer(8, True, one)},
                   reps=5)

  limits = srv.Limits(max_batch=BATCH, max_queue=REQUESTS, default_new_tokens=8)
  srv.warm_up(model, limits)
  server = srv.Server(("127.0.0.1", 0), model, limits)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{server.server_address[1]}/v1/predict"
  buf = io.BytesIO()
  Image.fromarray(_image(9, (64, 64))).save(buf, format="PNG")
  body = json.dumps({"image_b64": base64.b64encode(buf.getvalue()).decode(), "question": "warm up",
                     "force_mask": True}).encode()

  def post():
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
      assert r.status == 200

  post()
  statuses = []

  def client(n):
    for _ in range(n):
      post()
      statuses.append(200)

  t0 = time.perf_counter()
  threads = [threading.Thread(target=client, args=(REQUESTS // CLIENTS,)) for _ in range(CLIENTS)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  served_s = time.perf_counter() - t0
  server.shutdown()
  server.server_close()

  extra = {
      "generation_tokens_per_s_end_to_end": generated / tn,
      "decode_tokens_per_s": (generated - BATCH) / max(tn - t1, 1e-9),
      "prefill_s_batch": t1,
      "generated_tokens": generated,
      "grounding_latency_s_per_image": ground["answer_and_mask"]["median_s"],
      "mask_overhead_s": ground["answer_and_mask"]["median_s"] - ground["answer_only"]["median_s"],
      "served_requests_per_s": REQUESTS / served_s,
      "served_requests": len(statuses), "served_clients": CLIENTS,
  }
  path = write_result(
      "infer", what="tiny MedPLIB inference: multimodal generation, grounding latency, served req/s",
      command="python -m bench.bench_infer",
      inputs={"batch": BATCH, "new_tokens": NEW_TOKENS, "image_hw": [96, 128], "model": "stage4 tiny",
              "grounding_new_tokens": 8, "served_new_tokens": 8, "served_max_batch": BATCH},
      timings={**gen, **ground}, ratio=ground["answer_and_mask"]["median_s"] /
      ground["answer_only"]["median_s"],
      ratio_means="grounding call (answer + forced mask) / answer-only call, batch 1, 8 new tokens",
      extra=extra)
  print(json.dumps(extra, indent=1))
  print("wrote", path)


if __name__ == "__main__":
  main()
