"""A bad-input corpus, made here, for data records, weight files, training checkpoints, training
steps and the HTTP server: every case asserts a named error (reason/field, file, status code) or a
counted skip, never a hang, a crash of the process, or executed code.
"""

import base64
import io
import json
import os
import pickle
import socket
import struct
import threading
import urllib.error
import urllib.request
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from PIL import Image

from medplib_jax.checkpoint import torch_io
from medplib_jax.data import mecovqa
from medplib_jax.data.mecovqa import BadRecord
from medplib_jax.infer import api
from medplib_jax.serve import server as srv
from medplib_jax.checkpoint import model_dir
from medplib_jax.train import checkpointing

RNG = np.random.default_rng(0)
HW = (40, 50)


# --- file makers -------------------------------------------------------------------------------

def _encode(img: Image.Image, fmt="PNG") -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def _rgb_png(hw=HW) -> bytes:
  return _encode(Image.fromarray(RNG.integers(0, 255, hw + (3,)).astype(np.uint8)))


def _mask_png(hw=HW, empty=False) -> bytes:
  m = np.zeros(hw, np.uint8)
  if not empty:
    m[5:20, 10:30] = 255
  return _encode(Image.fromarray(m))


def _png_header_only(width: int, height: int) -> bytes:
  """A PNG whose header claims width x height over a few bytes of data (a decompression bomb)."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
          + chunk(b"IEND", b""))


IMAGE_BYTES = {
    "zero_byte": b"",
    "not_an_image": b"this is text, not pixels",
    "truncated_png": _rgb_png()[:150],
    "truncated_jpeg": _encode(Image.fromarray(RNG.integers(0, 255, HW + (3,)).astype(np.uint8)),
                              "JPEG")[:300],
    "bomb_over_limit": _png_header_only(9000, 9000),       # 81 M pixels > 64 M default limit
    "bomb_over_pil_limit": _png_header_only(30000, 30000),  # PIL's own DecompressionBombError
    "unsupported_mode_lab": _encode(Image.new("LAB", (8, 8)), "TIFF"),
}
IMAGE_DETAIL = {"bomb_over_limit": "pixel limit", "bomb_over_pil_limit": "pixel limit",
                "unsupported_mode_lab": "unsupported image mode 'LAB'",
                "truncated_png": "truncated"}


def _vqa(image, question="What is shown?"):
  return {"id": "rec-1", "image": image,
          "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                            {"from": "gpt", "value": "A CT scan."}]}


def _grounding(image, mask):
  return {"id": "rec-1", "image": image,
          "conversations": [{"from": "human", "value": "<image>\nSegment the liver."},
                            {"from": "gpt", "value": f"It is <SEG>.<mask>{mask}</mask>"}]}


def _region(image, region):
  return {"id": "rec-1", "image": image,
          "conversations": [{"from": "human", "value": f"<image>\nWhat is in <region>{region}</region>?"},
                            {"from": "gpt", "value": "The spleen."}]}


@pytest.fixture
def root(tmp_path):
  """An image root with a good image and mask, and a secret file outside it."""
  r = tmp_path / "root"
  (r / "images").mkdir(parents=True)
  (r / "images" / "ct_1.png").write_bytes(_rgb_png())
  (r / "images" / "mask_1.png").write_bytes(_mask_png())
  (tmp_path / "secret.png").write_bytes(_rgb_png())
  (tmp_path / "outside").mkdir()
  (tmp_path / "outside" / "m.png").write_bytes(_mask_png())
  return r


def _write(root, name, data: bytes) -> str:
  (root / "images" / name).write_bytes(data)
  return f"images/{name}"


# Each case: root -> record; expected (reason, field, text in the message).
DATA_CASES = {
    "image_absolute_path": (lambda r: _vqa(str(r.parent / "secret.png")),
                            ("path_outside_root", "image", "absolute path")),
    "image_home_path": (lambda r: _vqa("~/secret.png"), ("path_outside_root", "image", "absolute")),
    "image_dotdot": (lambda r: _vqa("images/../../secret.png"), ("path_outside_root", "image", "'..'")),
    "image_escaping_symlink": (
        lambda r: (os.symlink(r.parent / "secret.png", r / "images" / "link.png"), _vqa("images/link.png"))[1],
        ("path_outside_root", "image", "outside")),
    "mask_dotdot": (lambda r: _grounding("images/ct_1.png", "../outside/m.png"),
                    ("path_outside_root", "mask[0]", "'..'")),
    "mask_through_symlinked_dir": (
        lambda r: (os.symlink(r.parent / "outside", r / "ext"), _grounding("images/ct_1.png", "ext/m.png"))[1],
        ("path_outside_root", "mask[0]", "outside")),
    "region_absolute_path": (lambda r: _region("images/ct_1.png", str(r.parent / "outside" / "m.png")),
                             ("path_outside_root", "region[0]", "absolute path")),
    "missing_image": (lambda r: _vqa("images/nope.png"), ("missing_image", "image", "not found")),
    "image_is_a_directory": (lambda r: _vqa("images"), ("missing_image", "image", "not found")),
    **{f"image_{name}": ((lambda data: lambda r: _vqa(_write(r, "bad.png", data)))(data),
                         ("unreadable_image", "image", IMAGE_DETAIL.get(name, "")))
       for name, data in IMAGE_BYTES.items()},
    "mask_zero_byte": (lambda r: _grounding("images/ct_1.png", _write(r, "m0.png", b"")),
                       ("unreadable_image", "mask[0]", "")),
    "mask_size_mismatch": (lambda r: _grounding("images/ct_1.png", _write(r, "m2.png", _mask_png((20, 20)))),
                           ("mask_size_mismatch", "mask[0]", "20x20")),
    "mask_empty": (lambda r: _grounding("images/ct_1.png", _write(r, "m3.png", _mask_png(empty=True))),
                   ("empty_mask", "mask[0]", "")),
    "region_missing_file": (lambda r: _region("images/ct_1.png", "images/none.png"),
                            ("region_without_file", "region[0]", "")),
    "seg_without_mask": (lambda r: {**_vqa("images/ct_1.png"), "conversations": [
        {"from": "human", "value": "<image>\nSegment."}, {"from": "gpt", "value": "<SEG>"}]},
        ("seg_without_mask", "conversations[1]", "")),
    "mask_without_seg": (lambda r: {**_vqa("images/ct_1.png"), "conversations": [
        {"from": "human", "value": "<image>\nSegment."},
        {"from": "gpt", "value": "no<mask>images/mask_1.png</mask>"}]},
        ("mask_without_seg", "conversations[1]", "")),
    "no_assistant_turn": (lambda r: {**_vqa("images/ct_1.png"), "conversations": [
        {"from": "human", "value": "<image>\nHello?"}]}, ("malformed", "conversations", "")),
    "image_not_a_string": (lambda r: _vqa(["images/ct_1.png"]), ("malformed", "image", "")),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_record_gets_a_named_reason(root, case):
  make, (reason, field, text) = DATA_CASES[case]
  record = make(root)
  with pytest.raises(BadRecord) as info:
    mecovqa.decode_raw(mecovqa.load_raw(record, str(root)))
  assert (info.value.reason, info.value.field) == (reason, field), str(info.value)
  assert text in str(info.value)


def test_good_records_and_inside_symlinks_are_accepted(root):
  os.symlink(root / "images" / "ct_1.png", root / "images" / "alias.png")  # stays inside root
  for record in (_vqa("images/alias.png"), _grounding("images/ct_1.png", "images/mask_1.png"),
                 _region("images/ct_1.png", "images/mask_1.png")):
    decoded = mecovqa.decode_raw(mecovqa.load_raw(record, str(root)))
    assert decoded.image.shape == HW + (3,)


def test_bad_records_are_counted_by_reason_and_the_budget_names_the_record():
  budget = mecovqa.BadRecordBudget(2)
  budget.skip(BadRecord("path_outside_root", "image", "'..' in 'x'"), "rec-7")
  budget.skip(BadRecord("unreadable_image", "mask[0]", "truncated"), "rec-8")
  assert budget.counts == {"path_outside_root": 1, "unreadable_image": 1}
  with pytest.raises(mecovqa.BudgetExceeded, match="rec-7"):
    budget.skip(BadRecord("empty_mask", "mask[0]", "no foreground"), "rec-9")


# --- weight files ------------------------------------------------------------------------------

class _Payload:
  """Unpickling this runs `open(marker, "w")`: the file appears iff pickled code executed."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def _malicious(path, marker):
  torch.save({"weight": torch.zeros(2, 2), "payload": _Payload(str(marker))}, str(path))
  return str(path)


def _safetensors(header, data=b"", header_len=None) -> bytes:
  raw = json.dumps(header).encode()
  return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


_F32 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
WEIGHT_CASES = {
    "zero_byte_bin": ("w.bin", b"", "refused to load"),
    "text_as_pth": ("w.pth", b"not a pickle", "refused to load"),
    "zero_byte_safetensors": ("w.safetensors", b"", "not a readable safetensors"),
    "safetensors_huge_header": ("w.safetensors", _safetensors({}, header_len=2**40), "implausible"),
    "safetensors_header_not_json": ("w.safetensors", struct.pack("<Q", 4) + b"\xff\xfe{[", "not a readable"),
    "safetensors_header_a_list": ("w.safetensors", _safetensors([1, 2]), "not a JSON object"),
    "safetensors_bad_dtype": ("w.safetensors", _safetensors({"w": {**_F32, "dtype": "C64"}}, bytes(16)),
                              "unsupported dtype"),
    "safetensors_truncated": ("w.safetensors", _safetensors({"w": _F32}, bytes(8)), "outside the file"),
    "safetensors_shape_mismatch": ("w.safetensors", _safetensors({"w": {**_F32, "shape": [3, 3]}}, bytes(16)),
                                   "malformed header entry"),
    "safetensors_no_offsets": ("w.safetensors", _safetensors({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)),
                               "malformed header entry"),
    "unknown_extension": ("w.npz", b"PK", "unknown weights format"),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_bad_weight_file_gives_checkpoint_error_naming_the_file(tmp_path, case):
  name, data, text = WEIGHT_CASES[case]
  path = tmp_path / name
  path.write_bytes(data)
  with pytest.raises(torch_io.CheckpointError, match=text) as info:
    torch_io.read_state_dict(str(path))
  assert str(path) in str(info.value)


@pytest.mark.parametrize("layout", ["file.bin", "file.pth", "hf_dir", "hf_sharded"])
def test_malicious_pickle_is_refused_and_never_executes(tmp_path, layout):
  marker = tmp_path / "PWNED"
  if layout.startswith("file"):
    target = _malicious(tmp_path / f"evil.{layout.split('.')[1]}", marker)
  else:
    target = str(tmp_path / "hf")
    os.makedirs(target)
    if layout == "hf_dir":
      _malicious(os.path.join(target, "pytorch_model.bin"), marker)
    else:
      torch.save({"a": torch.zeros(2)}, os.path.join(target, "pytorch_model-00001-of-00002.bin"))
      _malicious(os.path.join(target, "pytorch_model-00002-of-00002.bin"), marker)
      with open(os.path.join(target, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"weight_map": {"a": "pytorch_model-00001-of-00002.bin",
                                  "weight": "pytorch_model-00002-of-00002.bin"}}, f)
  with pytest.raises(torch_io.CheckpointError, match="refused to load") as info:
    torch_io.read_state_dict(target)
  assert "evil" in str(info.value) or "pytorch_model" in str(info.value)
  assert not marker.exists(), "the pickle's payload ran"


def test_the_malicious_payload_is_live(tmp_path):
  """Control: the same file loaded unsafely does run its payload, so the test above means something."""
  marker = tmp_path / "PWNED"
  path = _malicious(tmp_path / "evil.bin", marker)
  with open(path, "rb") as f:
    head = f.read(2)
  assert head == b"PK"  # torch's zip container; the payload sits in data.pkl
  torch.load(path, weights_only=False)
  assert marker.exists()
  assert pickle.HIGHEST_PROTOCOL >= 2


# --- training checkpoints ----------------------------------------------------------------------

def _small_state(value):
  return {"w": np.full((4, 3), value, np.float32), "step": np.array(value, np.int32)}


def _saved_manager(tmp_path, steps=(1, 2)):
  mngr = checkpointing.manager(str(tmp_path), keep=5, save_every=1, async_save=False)
  for s in steps:
    checkpointing.save(mngr, s, _small_state(s), data_iterator=None, force=True)
  mngr.wait_until_finished()
  return mngr


def test_interrupted_checkpoint_write_is_never_latest(tmp_path):
  _saved_manager(tmp_path).close()
  # What a write killed mid-way leaves behind: orbax's temporary directory, never renamed.
  tmp_dir = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
  (tmp_dir / "state").mkdir(parents=True)
  (tmp_dir / "state" / "garbage").write_bytes(b"\0" * 10)
  mngr = checkpointing.manager(str(tmp_path), keep=5, save_every=1, async_save=False)
  step, state = checkpointing.restore_latest(mngr, _small_state(0), None)
  assert step == 2 and np.all(state["w"] == 2)


def _corrupt_latest(tmp_path):
  """Overwrites every data file of step 2 with garbage (a damaged disk or a partial copy)."""
  for dirpath, _, files in os.walk(tmp_path / "checkpoints" / "2"):
    for name in files:
      with open(os.path.join(dirpath, name), "wb") as f:
        f.write(b"garbage")


def test_corrupt_checkpoint_names_the_directory_without_fallback(tmp_path):
  _saved_manager(tmp_path).close()
  _corrupt_latest(tmp_path)
  mngr = checkpointing.manager(str(tmp_path), keep=5, save_every=1, async_save=False)
  with pytest.raises(checkpointing.CheckpointCorrupt) as info:
    checkpointing.restore_latest(mngr, _small_state(0), None, fallback=False)
  assert os.path.join("checkpoints", "2") in str(info.value)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
  _saved_manager(tmp_path).close()
  _corrupt_latest(tmp_path)
  mngr = checkpointing.manager(str(tmp_path), keep=5, save_every=1, async_save=False)
  step, state = checkpointing.restore_latest(mngr, _small_state(0), None, fallback=True)
  assert step == 1 and np.all(state["w"] == 1)


def test_missing_export_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="no exported params"):
    model_dir.load_params(str(tmp_path / "nowhere"))


# --- non-finite training steps -----------------------------------------------------------------

@pytest.fixture(scope="module")
def nan_setup():
  from medplib_jax.config_loading import load_config
  from test_train_step import fixed_batch
  cfg = load_config("configs/stage1_align.py:tiny", [
      "--config.data.max_length=80", "--config.model.llm.depth=1", "--config.model.vision.depth=1",
      "--config.model.sam.depth=1", "--config.model.sam.global_attn_indexes=(0,)",
      "--config.train.checkpoint_every=1",
      "--config.train.log_every=1", "--config.optim.warmup_ratio=0.0"])
  good = fixed_batch(cfg)
  bad = dict(good, clip_image=np.full_like(good["clip_image"], np.nan))
  return cfg, good, bad


def test_nonfinite_step_is_skipped_counted_and_never_checkpointed(tmp_path, nan_setup):
  from medplib_jax.train import trainer
  cfg, good, bad = nan_setup
  result = trainer.train_stage(cfg, str(tmp_path), iter([good, bad, good]), 3, export=False)
  assert [m["skipped"] for m in result.history] == [0.0, 1.0, 0.0]
  assert [m["skipped_steps"] for m in result.history] == [0.0, 1.0, 1.0]
  assert result.skipped_steps == 1
  mngr = checkpointing.manager(str(tmp_path), 5, 1, async_save=False)
  saved = {s: mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
           for s in mngr.all_steps()}
  assert sorted(saved) == [1, 2, 3]
  for s in saved.values():
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(s["trainable"]) if x is not None)
  # The skipped step 2 kept step 1's params; step 3 updated them again.
  same = jax.tree.map(np.array_equal, saved[1]["trainable"], saved[2]["trainable"])
  assert all(jax.tree.leaves(same))
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, saved[2]["trainable"],
                                              saved[3]["trainable"])))


def test_nonfinite_step_halts_naming_the_step_when_configured(tmp_path, nan_setup):
  from medplib_jax.train import trainer
  cfg, good, bad = nan_setup
  cfg = cfg.copy_and_resolve_references()
  cfg.train.on_nonfinite = "halt"
  with pytest.raises(trainer.NonFiniteStep, match="step 2: non-finite"):
    trainer.train_stage(cfg, str(tmp_path), iter([good, bad, good]), 3, export=False)
  mngr = checkpointing.manager(str(tmp_path), 5, 1, async_save=False)
  assert mngr.all_steps() == [1]  # the non-finite step 2 was never saved
  cfg.train.on_nonfinite = "ignore"
  with pytest.raises(ValueError, match="on_nonfinite"):
    trainer.train_stage(cfg, str(tmp_path), iter([]), 3, export=False)


# --- HTTP server -------------------------------------------------------------------------------

class _InstantModel:
  def prepare(self, image, question, regions, max_new_tokens=0):
    return image

  def run(self, samples, **kwargs):
    return [api.Prediction("ok", [], [], False, False, "ok", []) for _ in samples]


@pytest.fixture(scope="module")
def server():
  srv_ = srv.Server(("127.0.0.1", 0), _InstantModel(),
                    srv.Limits(max_body_bytes=200_000, max_pixels=100_000, max_question_chars=50,
                               max_new_tokens=16, default_new_tokens=8, timeout_s=5.0))
  threading.Thread(target=srv_.serve_forever, daemon=True).start()
  yield srv_
  srv_.shutdown()
  srv_.server_close()


def _url(server):
  return f"http://127.0.0.1:{server.server_address[1]}"


def _request(server, method, path, body=None, ctype="application/json"):
  req = urllib.request.Request(_url(server) + path, data=body, method=method,
                               headers={"Content-Type": ctype} if body is not None else {})
  try:
    with urllib.request.urlopen(req, timeout=30) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read() or b"{}")


def _raw(server, data: bytes) -> bytes:
  """Sends raw bytes and reads the reply (bounded by a timeout)."""
  with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := s.recv(65536):
      out += chunk
  return out


_GOOD = base64.b64encode(_rgb_png()).decode()
SERVER_CASES = {
    "json_not_object": ([1, 2, 3], 400, "JSON object"),
    "image_missing": ({"question": "What?"}, 400, "image: missing"),
    "image_zero_byte": ({"image_b64": "", "question": "What?"}, 400, "image: missing"),
    "image_not_base64_image": ({"image_b64": "!!!not base64!!!", "question": "What?"}, 400, "image_b64: not valid base64"),
    "image_truncated": ({"image_b64": base64.b64encode(_rgb_png()[:120]).decode(), "question": "q"},
                        400, "image:"),
    "image_bomb": ({"image_b64": base64.b64encode(_png_header_only(20000, 20000)).decode(),
                    "question": "q"}, 400, "pixel limit"),
    "image_over_server_pixel_limit": ({"image_b64": base64.b64encode(_mask_png((400, 400))).decode(),
                                       "question": "q"}, 400, "pixel limit"),
    "question_empty": ({"image_b64": _GOOD, "question": "  "}, 400, "question: empty"),
    "question_too_long": ({"image_b64": _GOOD, "question": "x" * 51}, 400, "exceed the limit"),
    "max_new_tokens_too_big": ({"image_b64": _GOOD, "question": "q", "max_new_tokens": 10**9}, 400,
                               "max_new_tokens"),
    "max_new_tokens_not_int": ({"image_b64": _GOOD, "question": "q", "max_new_tokens": "many"}, 400,
                               "max_new_tokens"),
    "prompt_with_a_path_field": ({"image_b64": _GOOD, "question": "q",
                                  "prompt": {"path": "/etc/passwd"}}, 400, "prompt:"),
    "box_outside_image": ({"image_b64": _GOOD, "question": "q", "prompt": {"box": [0, 0, 1e9, 1e9]}},
                          400, "prompt:"),
    "region_mask_not_image": ({"image_b64": _GOOD, "question": "q",
                               "region_mask_b64": base64.b64encode(b"/etc/passwd").decode()}, 400,
                              "region_mask:"),
}


@pytest.mark.parametrize("case", sorted(SERVER_CASES))
def test_bad_request_gets_a_status_and_a_message(server, case):
  body, status, text = SERVER_CASES[case]
  code, out = _request(server, "POST", "/v1/predict", json.dumps(body).encode())
  assert code == status, out
  assert text in out["error"]


def test_bad_json_and_wrong_content_type(server):
  assert _request(server, "POST", "/v1/predict", b"{not json")[0] == 400
  assert _request(server, "POST", "/v1/predict", b"x", "text/plain")[0] == 415
  assert _request(server, "POST", "/v1/other", b"{}")[0] == 404


def test_paths_in_urls_and_fields_never_reach_the_filesystem(server):
  for path in ("/../../etc/passwd", "/static/../server.py", "/static/%2e%2e/server.py", "/static/"):
    code, _ = _request(server, "GET", path)
    assert code == 404, path
  # A path string where image bytes belong is decoded as (bad) image bytes, not opened.
  code, out = _request(server, "POST", "/v1/predict",
                       json.dumps({"image_b64": base64.b64encode(b"/etc/hostname").decode(),
                                   "question": "q", "image": "/etc/hostname"}).encode())
  assert code == 400 and "not a decodable image" in out["error"]
  # The good request still works with extra path-like fields and a hostile multipart filename.
  boundary = "b0undary"
  body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"../../etc/passwd\""
          f"\r\nContent-Type: image/png\r\n\r\n").encode() + _rgb_png() + (
          f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\nWhat?\r\n"
          f"--{boundary}--\r\n").encode()
  code, out = _request(server, "POST", "/v1/predict", body, f"multipart/form-data; boundary={boundary}")
  assert code == 200 and out["text"] == "ok", out


def test_missing_negative_and_oversized_content_length(server):
  head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
  reply = _raw(server, head + b"Content-Length: 1000000000\r\n\r\n")  # the body is never read
  assert b" 413 " in reply.split(b"\r\n")[0] and b"exceeds the limit" in reply
  assert b" 411 " in _raw(server, head + b"Connection: close\r\n\r\n").split(b"\r\n")[0]
  reply = _raw(server, head + b"Content-Length: -5\r\n\r\n{}")
  assert b" 400 " in reply.split(b"\r\n")[0] and b"negative" in reply


def test_stalled_client_is_dropped_not_served_forever(server, monkeypatch):
  monkeypatch.setattr(srv.Handler, "timeout", 0.5)
  with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
    s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
    assert s.recv(1024) == b""  # the server closed the connection after its socket timeout
  assert _request(server, "GET", "/v1/health")[0] == 200
