"""Load test on loopback: >= 100 concurrent requests against the tiny model, bounded in count and
time. Every reply is 200 or 503 (bounded queue), the server stays up, and its resident memory
grows by less than MEMORY_BOUND_MIB over the burst (measured after a warm-up burst, so compiled
executables and allocator pools are already in place)."""

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import psutil
import pytest
from PIL import Image

from medplib_jax.infer import api
from medplib_jax.serve import server as srv
from tiny_checkpoint import make_tiny_checkpoint

CONCURRENT = 120
DEADLINE_S = 240
MEMORY_BOUND_MIB = 150


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
  model = api.MedPLIB.from_pretrained(make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt"))))
  limits = srv.Limits(max_queue=8, max_batch=4, max_new_tokens=4, default_new_tokens=2, timeout_s=60)
  srv.warm_up(model, limits)
  server = srv.Server(("127.0.0.1", 0), model, limits)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


def _body(i: int) -> bytes:
  img = np.zeros((48, 64, 3), np.uint8)
  img[8 + i % 10: 30, 10: 40 + i % 20] = 200
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  request = {"image_b64": base64.b64encode(buf.getvalue()).decode(), "question": f"What is shown? {i}",
             "max_new_tokens": 2}
  if i % 3 == 0:
    request["prompt"] = {"box": [5, 5, 40, 30]}
  return json.dumps(request).encode()


def _burst(url: str, n: int) -> list:
  """n requests released at once from n threads; returns status codes (or exception names)."""
  codes = [None] * n
  start = threading.Barrier(n)
  end = time.monotonic() + DEADLINE_S

  def client(i):
    req = urllib.request.Request(url + "/v1/predict", data=_body(i), method="POST",
                                 headers={"Content-Type": "application/json"})
    start.wait()
    try:
      with urllib.request.urlopen(req, timeout=max(1.0, end - time.monotonic())) as r:
        out = json.loads(r.read())
        codes[i] = r.status if "text" in out else "no text"
    except urllib.error.HTTPError as e:
      codes[i] = e.code
    except Exception as e:  # reported, never hidden: the assertion below names it
      codes[i] = type(e).__name__

  threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(max(0.0, end - time.monotonic()))
  assert not any(t.is_alive() for t in threads), f"requests still running after {DEADLINE_S} s"
  return codes


def test_concurrent_burst_gets_only_200_or_503_with_bounded_memory(base_url):
  process = psutil.Process()
  _burst(base_url, 16)  # warm-up: every request shape compiled, thread stacks and pools allocated
  rss_before = process.memory_info().rss
  codes = _burst(base_url, CONCURRENT)
  rss_after = process.memory_info().rss
  assert set(codes) <= {200, 503}, sorted(map(str, codes))
  assert codes.count(200) >= 1 and len(codes) == CONCURRENT
  growth_mib = (rss_after - rss_before) / 2**20
  assert growth_mib < MEMORY_BOUND_MIB, f"RSS grew {growth_mib:.1f} MiB over {CONCURRENT} requests"
  with urllib.request.urlopen(base_url + "/v1/health", timeout=10) as r:
    health = json.loads(r.read())
  assert health["status"] == "ok"
  print(f"{CONCURRENT} requests: {codes.count(200)} x 200, {codes.count(503)} x 503, "
        f"RSS growth {growth_mib:.1f} MiB")
