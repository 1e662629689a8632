"""MeCoVQA reader and preprocessing: one crafted bad record per named reason, image modes, canvases."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs.common import model_config
from medplib_jax.cli import main as medplib_main
from medplib_jax.data import mecovqa, preprocess
from medplib_jax.data.batch import batch_spec
from medplib_jax.data.template import template_texts
from medplib_jax.data.tokenizer import load_tokenizer, train_tokenizer

Q = "<image>\nSegment the liver."


def _png(array, **kw):
  buf = io.BytesIO()
  Image.fromarray(array, **kw).save(buf, format="PNG")
  return buf.getvalue()


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  r = tmp_path_factory.mktemp("root")
  img = np.zeros((40, 60, 3), np.uint8)
  img[..., 0] = np.arange(60, dtype=np.uint8)[None] * 4
  mask = np.zeros((40, 60), np.uint8)
  mask[10:30, 20:50] = 255
  _write(r / "images/ct_1.png", _png(img))
  _write(r / "masks/ct_1.png", _png(mask))
  _write(r / "masks/empty.png", _png(np.zeros((40, 60), np.uint8)))
  _write(r / "masks/small.png", _png(np.ones((20, 20), np.uint8)))
  _write(r / "images/broken.png", b"\x89PNG\r\n\x1a\nnot really")
  outside = tmp_path_factory.mktemp("outside")
  _write(outside / "secret.png", _png(img))
  os.symlink(outside / "secret.png", r / "images/link.png")
  return r


def _rec(rid, image="images/ct_1.png", q=Q, a="Sure, <SEG><mask>masks/ct_1.png</mask>.", **kw):
  conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  return dict({"id": rid, "image": image, "conversations": conv}, **kw)


BAD = {
    "malformed": {"id": "m", "image": "images/ct_1.png", "conversations": "hello"},
    "missing_image": _rec("mi", image="images/nope.png"),
    "unreadable_image": _rec("ui", image="images/broken.png"),
    "path_outside_root": _rec("po", image="images/link.png"),
    "mask_size_mismatch": _rec("ms", a="Sure, <SEG><mask>masks/small.png</mask>."),
    "empty_mask": _rec("em", a="Sure, <SEG><mask>masks/empty.png</mask>."),
    "seg_without_mask": _rec("sw", a="Sure, <SEG>."),
    "mask_without_seg": _rec("mw", a="Sure <mask>masks/ct_1.png</mask>."),
    "region_without_file": _rec("rw", q="<image>\nWhat is in <region></region>?", a="Liver."),
    "too_long": _rec("tl", q="<image>\n" + "Is this the liver? " * 60, a="Yes."),
}


def test_every_reason_has_a_crafted_record():
  assert set(BAD) == set(mecovqa.REASONS)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = ["Segment the liver. Sure, it is here. What is in the region? Liver. Yes. No."] * 50
  return load_tokenizer(train_tokenizer(texts + template_texts() * 20,
                                        str(tmp_path_factory.mktemp("tok"))))


def test_data_check_names_each_reason(root, tok, tmp_path, capsys):
  good = [_rec("ok"), _rec("okr", q="<image>\nWhat is in <region>masks/ct_1.png</region>?", a="Liver.")]
  path = tmp_path / "d.json"
  json.dump(good + list(BAD.values()), open(path, "w"))
  rc = medplib_main(["data", "check", "--json", str(path), "--image-root", str(root),
                     "--tokenizer", tok.hf.name_or_path, "--max-length", "128"])
  out = capsys.readouterr().out.strip().splitlines()
  assert rc == 1
  lines = [l.split("\t") for l in out if not l.startswith("#")]
  got = {cols[1]: cols[3].split(":")[0] for cols in lines}
  assert got == {rec["id"]: reason for reason, rec in BAD.items()}
  assert [int(cols[0]) for cols in lines] == list(range(2, 2 + len(BAD)))
  assert out[-1].startswith(f"# {path}: {2 + len(BAD)} records, 2 good, {len(BAD)} bad")
  json.dump(good, open(path, "w"))
  assert medplib_main(["data", "check", "--json", str(path), "--image-root", str(root)]) == 0


def test_paths_never_leave_the_root(root):
  for rel in ("/etc/passwd", "../x.png", "images/../../x.png", "images/link.png"):
    with pytest.raises(mecovqa.BadRecord) as e:
      mecovqa.resolve_path(str(root), rel, "image")
    assert e.value.reason == "path_outside_root"
  assert mecovqa.resolve_path(str(root), "images/ct_1.png", "image").endswith("ct_1.png")


def test_image_modes_decode_to_rgb():
  grey = np.array([[0, 128], [255, 7]], np.uint8)
  assert np.array_equal(mecovqa.decode_image(_png(grey)), np.repeat(grey[..., None], 3, -1))
  g16 = np.array([[0, 32768], [65535, 256]], np.uint16)
  assert np.array_equal(mecovqa.decode_image(_png(g16))[..., 0], (g16 >> 8).astype(np.uint8))
  rgba = np.dstack([np.full((2, 2, 3), 9, np.uint8), np.zeros((2, 2, 1), np.uint8)])
  assert np.array_equal(mecovqa.decode_image(_png(rgba)), np.full((2, 2, 3), 9, np.uint8))
  pal = Image.fromarray(grey).convert("P")
  buf = io.BytesIO()
  pal.save(buf, format="PNG")
  assert np.array_equal(mecovqa.decode_image(buf.getvalue())[..., 1], grey)
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(buf, format="JPEG")
  assert mecovqa.decode_image(buf.getvalue()).shape == (4, 4, 3)
  assert np.array_equal(mecovqa.decode_mask(_png(np.array([[0, 1], [2, 255]], np.uint8))),
                        [[False, True], [True, True]])
  with pytest.raises(mecovqa.BadRecord, match="pixel limit"):
    mecovqa.decode_image(_png(grey), max_pixels=3)


def test_build_sample_layout(root, tok):
  cfg = model_config("tiny")
  rec = _rec("ok")
  s, meta = preprocess.build_sample(rec, tok, cfg, 128, str(root), rng=np.random.default_rng(0))
  for k, (shape, dtype) in batch_spec(cfg, 128).items():
    assert s[k].shape == shape and s[k].dtype == dtype, k
  n_img = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
  ids = s["input_ids"]
  start = int(s["image_start"])
  assert ids[start - 1] == tok.im_start_id and ids[start + n_img] == tok.im_end_id
  assert np.all(ids[start:start + n_img] == tok.pad_id)
  seg = int(s["seg_positions"][0])
  assert ids[seg] == tok.seg_id and s["labels"][seg] == tok.seg_id  # <SEG> is supervised
  assert s["labels"][meta["length"] - 1] == tok.eos_id and s["attention_mask"].sum() == meta["length"]
  assert list(s["orig_hw"]) == [40, 60] and list(s["sam_resized_hw"]) == [85, 128]
  # the mask sits centred on the SAM canvas: rows 10..30 of 40 -> 21..64 of the 85-row band + 21
  assert s["masks"][0].any() and not s["masks"][0][:21].any() and not s["masks"][0][107:].any()
  _, meta_eval = preprocess.build_sample(rec, tok, cfg, 128, str(root), train=False)
  assert meta_eval["masks_orig"][0].shape == (40, 60) and meta_eval["masks_orig"][0].sum() == 600


def test_region_on_grid_and_sub_region(root, tok):
  cfg = model_config("tiny")
  rec = _rec("r", q="<image>\nWhat is in <region>masks/ct_1.png</region>?", a="Liver.")
  s, meta = preprocess.build_sample(rec, tok, cfg, 128, str(root), train=False)
  pos = int(s["region_positions"][0])
  assert s["input_ids"][pos - 1] == tok.region_start_id and s["input_ids"][pos + 1] == tok.region_end_id
  mask = np.zeros((40, 60), bool)
  mask[10:30, 20:50] = True
  want = preprocess.canvas.mask_canvas(mask, 112)[::14, ::14]
  assert np.array_equal(s["region_masks"][0], want) and meta["task"] == "R"
  grid = np.zeros((24, 24), bool)
  grid[2:12, 2:12] = True
  grid[20:22, 20:22] = True  # a smaller second component is never used
  for seed in range(5):
    sub = preprocess.sub_region(grid, np.random.default_rng(seed))
    assert sub.sum() >= 10 and not (sub & ~grid[:, :]).any() and not sub[20:, 20:].any()
    assert preprocess.ndimage.label(sub, np.ones((3, 3)))[1] == 1
  assert np.array_equal(preprocess.sub_region(grid, np.random.default_rng(1)),
                        preprocess.sub_region(grid, np.random.default_rng(1)))


def test_truncate_mode_counts_instead_of_skipping(root, tok):
  cfg = model_config("tiny")
  rec = BAD["too_long"]
  opts = preprocess.PreprocessOptions(overflow="truncate")
  s, meta = preprocess.build_sample(rec, tok, cfg, 128, str(root), options=opts)
  assert meta["truncated"] and s["attention_mask"].all()
