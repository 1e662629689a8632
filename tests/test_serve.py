"""`medplib serve` JSON API contract: status codes, response schema, limits, queueing."""

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from medplib_jax.infer import api
from medplib_jax.serve import server as srv
from tiny_checkpoint import make_tiny_checkpoint

NEW = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return api.MedPLIB.from_pretrained(make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt"))))


def _start(model, **limits):
  server = srv.Server(("127.0.0.1", 0), model, srv.Limits(**limits))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def url(model):
  server, base = _start(model, max_batch=2, max_question_chars=300)
  yield base
  server.shutdown()
  server.server_close()


def _png(hw=(48, 72)) -> bytes:
  buf = io.BytesIO()
  img = np.zeros(hw + (3,), np.uint8)
  img[10:30, 20:50] = 200
  Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


def _multipart(fields: dict) -> tuple[bytes, str]:
  boundary = "medplibtestboundary"
  out = b""
  for name, value in fields.items():
    if isinstance(value, bytes):
      head = f'Content-Disposition: form-data; name="{name}"; filename="{name}.png"\r\nContent-Type: image/png'
    else:
      head, value = f'Content-Disposition: form-data; name="{name}"', str(value).encode()
    out += f"--{boundary}\r\n{head}\r\n\r\n".encode() + value + b"\r\n"
  return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _post(url, body: bytes, ctype: str, path="/v1/predict"):
  req = urllib.request.Request(url + path, data=body, headers={"Content-Type": ctype}, method="POST")
  try:
    with urllib.request.urlopen(req, timeout=300) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _post_json(url, obj):
  return _post(url, json.dumps(obj).encode(), "application/json")


def test_page_static_and_health(url):
  with urllib.request.urlopen(url + "/") as r:
    page = r.read().decode()
  assert r.status == 200 and 'id="ask"' in page and "/static/app.js" in page
  with urllib.request.urlopen(url + "/static/app.js") as r:
    assert r.status == 200 and "javascript" in r.headers["Content-Type"]
  with urllib.request.urlopen(url + "/v1/health") as r:
    assert json.loads(r.read())["status"] == "ok"
  for path in ("/static/../server.py", "/etc/passwd", "/static/index.html%00"):
    with pytest.raises(urllib.error.HTTPError) as e:
      urllib.request.urlopen(url + path)
    assert e.value.code == 404


def test_multipart_predict_with_forced_mask(url):
  body, ctype = _multipart({"image": _png(), "question": "Segment the bright box.",
                            "prompt": json.dumps({"box": [20, 10, 50, 30]}), "force_mask": "1",
                            "max_new_tokens": NEW})
  status, out = _post(url, body, ctype)
  assert status == 200, out
  assert isinstance(out["text"], str) and (out["width"], out["height"]) == (72, 48)
  assert out["forced"] != out["seg_found"] and len(out["masks"]) == 1
  mask = out["masks"][0]
  with Image.open(io.BytesIO(base64.b64decode(mask["png_b64"]))) as m:
    pixels = np.asarray(m) > 0
  assert pixels.shape == (48, 72) and mask["rle"]["size"] == [48, 72]
  assert sum(mask["rle"]["counts"]) == 48 * 72 and int(pixels.sum()) == mask["area"]


def test_json_predict_and_region_mask(url):
  region = np.zeros((48, 72), np.uint8)
  region[5:20, 5:25] = 255
  buf = io.BytesIO()
  Image.fromarray(region).save(buf, format="PNG")
  status, out = _post_json(url, {"image_b64": base64.b64encode(_png()).decode(),
                                 "question": "What is in <region></region>?",
                                 "region_mask_b64": base64.b64encode(buf.getvalue()).decode(),
                                 "max_new_tokens": NEW})
  assert status == 200, out
  assert out["masks"] == [] or out["seg_found"]


@pytest.mark.parametrize("fields, match", [
    ({"question": "What?"}, "image: missing"),
    ({"image_b64": base64.b64encode(b"junk").decode(), "question": "What?"}, "image"),
    ({"image": True, "question": " "}, "question: empty"),
    ({"image": True, "question": "x" * 301}, "exceed the limit"),
    ({"image": True, "question": "What?", "prompt": {"box": [0, 0, 500, 10]}}, "outside"),
    ({"image": True, "question": "What?", "prompt": {"point": [1, 2], "box": [0, 0, 5, 5]}},
     "at most one"),
    ({"image": True, "question": "What?", "prompt": {"path": "/etc/passwd"}}, "prompt"),
    ({"image": True, "question": "What?", "max_new_tokens": 100000}, "max_new_tokens"),
    ({"image": True, "question": "word " * 55}, "too long"),
])
def test_bad_requests_get_400_with_message(url, fields, match):
  fields = dict(fields)
  if fields.pop("image", False):
    fields["image_b64"] = base64.b64encode(_png()).decode()
  code, out = _post_json(url, fields)
  assert code == 400 and match in out["error"]


def test_wrong_type_endpoint_and_body_limit(model):
  server, base = _start(model, max_body_bytes=1000)
  try:
    assert _post(base, b"x", "text/plain")[0] == 415
    assert _post(base, b"{}", "application/json", path="/v1/other")[0] == 404
    code, out = _post_json(base, {"image_b64": "A" * 2000, "question": "What?"})
    assert code == 413 and "exceeds the limit" in out["error"]
  finally:
    server.shutdown()
    server.server_close()


class _BlockingModel:
  """Stands in for the model: `run` waits until released, to fill the queue deterministically."""

  def __init__(self):
    self.release, self.started = threading.Event(), threading.Event()

  def prepare(self, image, question, regions, max_new_tokens=0):
    return image

  def run(self, samples, **kwargs):
    self.started.set()
    self.release.wait(30)
    return [api.Prediction("ok", [], [], False, False, "ok", []) for _ in samples]


def test_full_queue_gives_503_and_slow_request_504():
  stub = _BlockingModel()
  server, base = _start(stub, max_queue=1, max_batch=1, timeout_s=1.0)
  request = {"image_b64": base64.b64encode(_png()).decode(), "question": "What?"}
  try:
    results = []
    first = threading.Thread(target=lambda: results.append(_post_json(base, request)))
    first.start()
    assert stub.started.wait(10)  # the worker holds request 1
    second = threading.Thread(target=lambda: results.append(_post_json(base, request)))
    second.start()
    for _ in range(100):  # request 2 waits in the queue
      if server.worker.jobs.qsize() == 1:
        break
      time.sleep(0.02)
    code, out = _post_json(base, request)
    assert code == 503 and "busy" in out["error"]
    first.join(), second.join()
    assert sorted(c for c, _ in results) == [504, 504]
  finally:
    stub.release.set()
    server.shutdown()
    server.server_close()
