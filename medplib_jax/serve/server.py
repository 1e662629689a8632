"""HTTP server for one loaded model: a web page and a JSON API, standard library only.

Endpoints
  GET  /                 the demo page (static/index.html, app.js, style.css)
  GET  /v1/health        {"status": "ok", "queue": n, "max_queue": n}
  POST /v1/predict       multipart/form-data (fields: image file, question, prompt JSON,
                         region_mask file, max_new_tokens, force_mask) or application/json
                         ({"image_b64", "question", "prompt": {"point"|"box"|"polygon": ...},
                         "region_mask_b64", "max_new_tokens", "force_mask"})
                         -> {"text", "seg_found", "forced", "width", "height",
                             "masks": [{"png_b64", "rle": {"size", "counts"}, "area", "score"}],
                             "elapsed_s"}

One worker thread owns the model: requests wait in a bounded queue (503 when full) and the worker
takes up to `max_batch` queued requests with the same generation settings into one batched call.
Limits: request body bytes (413), image pixels, question characters, max_new_tokens (400),
per-request timeout (504). Static files come from a fixed table; no request field is ever used
as a file path (region masks arrive as image bytes and are decoded in memory).
"""

import base64
import binascii
import dataclasses
import email.parser
import email.policy
import http.server
import json
import logging
import os
import queue
import threading
import time

import numpy as np

from medplib_jax.data.mecovqa import BadRecord, decode_mask
from medplib_jax.infer.masks import mask_rle
from medplib_jax.infer import api

log = logging.getLogger(__name__)
STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
                "/static/style.css": ("style.css", "text/css; charset=utf-8")}


@dataclasses.dataclass(frozen=True)
class Limits:
  max_body_bytes: int = 16 * 1024 * 1024
  max_pixels: int = 4096 * 4096
  max_question_chars: int = 2000
  max_new_tokens: int = 256
  default_new_tokens: int = 64
  max_queue: int = 8
  max_batch: int = 4
  timeout_s: float = 120.0


class HttpError(Exception):
  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


@dataclasses.dataclass
class Job:
  image: np.ndarray
  question: str
  prompt: dict
  max_new_tokens: int
  force_mask: bool
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  result: object = None
  error: Exception | None = None


class Worker:
  """Runs queued jobs on the model, batching those that share generation settings."""

  def __init__(self, model: api.MedPLIB, limits: Limits):
    self.model, self.limits = model, limits
    self.jobs: queue.Queue = queue.Queue(maxsize=limits.max_queue)
    self._held: list[Job] = []  # taken from the queue, waiting for a batch with their settings
    self._thread = threading.Thread(target=self._loop, name="medplib-worker", daemon=True)
    self._thread.start()

  def submit(self, job: Job) -> None:
    try:
      self.jobs.put_nowait(job)
    except queue.Full:
      raise HttpError(503, f"server busy: {self.limits.max_queue} requests already queued") from None

  def _next(self, block: bool):
    if self._held:
      return self._held.pop(0)
    return self.jobs.get() if block else self.jobs.get_nowait()

  def _loop(self):
    while True:
      first = self._next(block=True)
      batch, held = [first], []
      while len(batch) + len(held) < self.limits.max_batch:
        try:
          job = self._next(block=False)
        except queue.Empty:
          break
        same = (job.max_new_tokens, job.force_mask) == (first.max_new_tokens, first.force_mask)
        (batch if same else held).append(job)
      # Jobs with other settings run next round, ahead of the queue (never re-queued, which
      # could block this, the only consumer, on a full queue).
      self._held = held + self._held
      self._run(batch)

  def _run(self, batch: list[Job]):
    try:
      samples = []
      for job in batch:
        region = api.region_from_prompt(job.image.shape[:2], **job.prompt)
        samples.append(self.model.prepare(job.image, job.question, [] if region is None else [region],
                                          max_new_tokens=job.max_new_tokens))
    except api.InputError as e:
      # Some job in the batch is bad: run each alone so only that one fails.
      if len(batch) > 1:
        for job in batch:
          self._run([job])
        return
      batch[0].error = HttpError(400, str(e))
      batch[0].done.set()
      return
    try:
      preds = self.model.run(samples, max_new_tokens=batch[0].max_new_tokens,
                             force_mask=batch[0].force_mask, batch_size=self.limits.max_batch)
      for job, pred in zip(batch, preds):
        job.result = pred
    except Exception as e:  # report to the waiting requests, keep the worker alive
      log.exception("prediction failed")
      for job in batch:
        job.error = HttpError(500, f"prediction failed: {type(e).__name__}: {e}")
    for job in batch:
      job.done.set()


def _b64(text, field: str) -> bytes:
  try:
    return base64.b64decode(text, validate=False)
  except (binascii.Error, TypeError, ValueError):
    raise HttpError(400, f"{field}: not valid base64") from None


def parse_request(content_type: str, body: bytes) -> dict:
  """Body -> {"image": bytes, "question", "prompt": dict, "region_mask": bytes|None, ...}."""
  if content_type.startswith("application/json"):
    try:
      data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise HttpError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
      raise HttpError(400, "request body must be a JSON object")
    fields = {k: data.get(k) for k in ("question", "prompt", "max_new_tokens", "force_mask")}
    fields["image"] = _b64(data["image_b64"], "image_b64") if data.get("image_b64") else None
    fields["region_mask"] = (_b64(data["region_mask_b64"], "region_mask_b64")
                             if data.get("region_mask_b64") else None)
    return fields
  if content_type.startswith("multipart/form-data"):
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
      raise HttpError(400, "malformed multipart body")
    fields = {}
    for part in message.iter_parts():
      name = part.get_param("name", header="content-disposition")
      if name:
        fields[name] = part.get_payload(decode=True) or b""
    out = {"image": fields.get("image"), "region_mask": fields.get("region_mask") or None}
    for key in ("question", "prompt", "max_new_tokens", "force_mask"):
      if key in fields:
        out[key] = fields[key].decode("utf-8", errors="replace")
    if isinstance(out.get("prompt"), str):
      try:
        out["prompt"] = json.loads(out["prompt"]) if out["prompt"].strip() else None
      except json.JSONDecodeError:
        raise HttpError(400, "prompt: not valid JSON") from None
    return out
  raise HttpError(415, "send multipart/form-data or application/json")


def make_job(fields: dict, limits: Limits) -> Job:
  """Validates parsed fields into a Job (HttpError 400 with a message on bad input)."""
  if not fields.get("image"):
    raise HttpError(400, "image: missing")
  try:
    image = api.load_image(fields["image"], limits.max_pixels)
  except api.InputError as e:
    raise HttpError(400, f"image: {e}") from None
  question = fields.get("question")
  if not isinstance(question, str) or not question.strip():
    raise HttpError(400, "question: empty")
  if len(question) > limits.max_question_chars:
    raise HttpError(400, f"question: {len(question)} characters exceed the limit of "
                    f"{limits.max_question_chars}")
  prompt = fields.get("prompt") or {}
  if not isinstance(prompt, dict) or not set(prompt) <= {"point", "box", "polygon"}:
    raise HttpError(400, "prompt: expected an object with one of point, box, polygon")
  prompt = {k: v for k, v in prompt.items() if v is not None}
  if fields.get("region_mask"):
    try:
      prompt["region_mask"] = decode_mask(fields["region_mask"], "region_mask", limits.max_pixels)
    except BadRecord as e:
      raise HttpError(400, f"region_mask: {e.detail}") from None
  try:
    region = api.region_from_prompt(image.shape[:2], **prompt)
  except (api.InputError, TypeError) as e:
    raise HttpError(400, f"prompt: {e}") from None
  del region  # validated here so the error reaches this request; the worker recomputes it
  try:
    new_tokens = int(fields.get("max_new_tokens") or limits.default_new_tokens)
  except (TypeError, ValueError):
    raise HttpError(400, "max_new_tokens: not an integer") from None
  if not 1 <= new_tokens <= limits.max_new_tokens:
    raise HttpError(400, f"max_new_tokens: must be in 1..{limits.max_new_tokens}")
  force = str(fields.get("force_mask") or "").lower() in ("1", "true", "on", "yes")
  return Job(image, question, prompt, new_tokens, force)


def response_json(pred: api.Prediction, image: np.ndarray, elapsed: float) -> dict:
  return {"text": pred.text, "seg_found": pred.seg_found, "forced": pred.forced,
          "width": int(image.shape[1]), "height": int(image.shape[0]), "elapsed_s": elapsed,
          "masks": [{"png_b64": base64.b64encode(api.mask_png(m)).decode("ascii"),
                     "rle": mask_rle(m), "area": int(m.sum()), "score": s}
                    for m, s in zip(pred.masks, pred.mask_scores)]}


class Handler(http.server.BaseHTTPRequestHandler):
  server_version = "medplib-serve"
  protocol_version = "HTTP/1.1"
  # Socket timeout: a client that stalls while sending headers or body is dropped, so slow
  # senders cannot hold handler threads forever.
  timeout = 60

  def log_message(self, fmt, *args):
    log.info("%s %s", self.address_string(), fmt % args)

  def _send(self, status: int, body: bytes, content_type: str):
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("X-Content-Type-Options", "nosniff")
    self.end_headers()
    self.wfile.write(body)

  def _json(self, status: int, obj: dict):
    self._send(status, json.dumps(obj).encode(), "application/json")

  def do_GET(self):
    path = self.path.split("?", 1)[0]
    if path == "/v1/health":
      worker = self.server.worker
      return self._json(200, {"status": "ok", "queue": worker.jobs.qsize(),
                              "max_queue": worker.limits.max_queue})
    if path in STATIC_FILES:
      name, ctype = STATIC_FILES[path]
      with open(os.path.join(STATIC_DIR, name), "rb") as f:
        return self._send(200, f.read(), ctype)
    self._json(404, {"error": f"no such page: {path}"})

  def do_POST(self):
    limits = self.server.worker.limits
    try:
      if self.path.split("?", 1)[0] != "/v1/predict":
        raise HttpError(404, f"no such endpoint: {self.path}")
      try:
        length = int(self.headers.get("Content-Length", ""))
      except ValueError:
        raise HttpError(411, "Content-Length required") from None
      if length < 0:
        self.close_connection = True
        raise HttpError(400, f"Content-Length {length} is negative")
      if length > limits.max_body_bytes:
        self.close_connection = True  # the body is not read
        raise HttpError(413, f"request body of {length} bytes exceeds the limit of "
                        f"{limits.max_body_bytes}")
      body = self.rfile.read(length)
      start = time.perf_counter()
      job = make_job(parse_request(self.headers.get("Content-Type", ""), body), limits)
      self.server.worker.submit(job)
      if not job.done.wait(limits.timeout_s):
        raise HttpError(504, f"prediction did not finish within {limits.timeout_s:.0f} s")
      if job.error is not None:
        raise job.error
      self._json(200, response_json(job.result, job.image, time.perf_counter() - start))
    except HttpError as e:
      self._json(e.status, {"error": e.message})


class Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 128  # listen backlog: bursts of connections wait for accept, not a reset

  def __init__(self, address, model: api.MedPLIB, limits: Limits = Limits()):
    self.worker = Worker(model, limits)
    super().__init__(address, Handler)


def warm_up(model: api.MedPLIB, limits: Limits) -> None:
  """Compiles the request shapes once so the first user does not wait for XLA."""
  image = np.zeros((64, 64, 3), np.uint8)
  sample = model.prepare(image, "warm up", max_new_tokens=limits.default_new_tokens)
  model.run([sample], max_new_tokens=limits.default_new_tokens, force_mask=True,
            batch_size=limits.max_batch)
