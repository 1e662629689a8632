"""Synthetic MeCoVQA: format, answers consistent with the pixels and masks, determinism."""

import collections
import hashlib
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from medplib_jax.data import synth

N, SEED = 32, 3

# Mean colour (grey level, or RGB) a structure's inside should show, worked out by hand from the
# design in docs/synthetic_data.md (rims / cores weighted by their share of an ellipse's area).
# A mask's mean image colour must be nearest to the class the record names.
EXPECTED_MEAN = {
    "ct": {"liver": 150, "kidney": 200, "tumor": 60},
    "mr": {"ventricle": 27, "cerebellum": 150, "tumor": 236},
    "x": {"lung": 35, "heart": 155, "mass": 228},
    "ultrasound": {"kidney": 162, "vessel": 97, "cyst": 36},
    "dermoscopy": {"melanoma": (90, 57, 44), "vessel": (195, 50, 60), "bubble": (219, 217, 217)},
    "endoscopy": {"lumen": (25, 8, 8), "polyp": (230, 140, 95), "fold": (245, 190, 175)},
    "fundus": {"optic disc": (252, 225, 140), "macula": (135, 40, 12), "hemorrhage": (75, 6, 6)},
    "microscopy": {"gland": (192, 149, 204), "vessel": (215, 50, 70), "tumor": (80, 31, 117)},
}
PREFIXES = {"ct", "mr", "x", "ultrasound", "dermoscopy", "endoscopy", "fundus", "microscopy"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth")
  paths = synth.write_synthetic(str(out), N, SEED)
  records = {split: json.load(open(p)) for split, p in paths.items()}
  return str(out), paths, records


def _load(root, rel):
  return np.asarray(Image.open(os.path.join(root, rel)))


def _gpt(record):
  turns = record["conversations"]
  assert [t["from"] for t in turns] == ["human", "gpt"]
  return turns[1]["value"]


def _human(record):
  return record["conversations"][0]["value"]


def _nearest_class(modality, image, mask):
  mean = image[mask].mean(axis=0)
  grey = np.isscalar(next(iter(EXPECTED_MEAN[modality].values())))
  mean = mean[:1] if grey else mean
  return min(EXPECTED_MEAN[modality],
             key=lambda c: np.linalg.norm(mean - np.atleast_1d(EXPECTED_MEAN[modality][c])))


def _all(records):
  return [r for rs in records.values() for r in rs]


def _by_image(records):
  groups = collections.defaultdict(list)
  for r in _all(records):
    groups[r["image"]].append(r)
  return groups


def test_format_and_splits(dataset):
  root, paths, records = dataset
  assert set(paths) == {"train", "val", "test"}
  images = {split: {r["image"] for r in rs} for split, rs in records.items()}
  # 32 images: round(25.6) = 26 train, round(28.8) - 26 = 3 val, 3 test; no image in two splits.
  assert [len(images[s]) for s in ("train", "val", "test")] == [26, 3, 3]
  assert not (images["train"] & images["val"]) and not (images["train"] & images["test"])
  ids = [r["id"] for r in _all(records)]
  assert len(ids) == len(set(ids))
  sizes = []
  for r in _all(records):
    assert _human(r).startswith("<image>\n") and _human(r).count("<image>") == 1
    assert r["task"] in "CRG" and r["answer_type"] in ("CLOSED", "OPEN")
    name = os.path.basename(r["image"])
    assert name.split("_")[0] == r["modality"] and r["modality"] in PREFIXES
    image = _load(root, r["image"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    sizes.append(image.shape[:2])
  hs, ws = np.array(sizes).T
  assert hs.min() >= 96 and ws.min() >= 96 and max(hs.max(), ws.max()) <= 320
  aspects = ws / hs
  assert aspects.min() >= 0.59 and aspects.max() <= 1.61
  assert (aspects < 0.9).any() and (aspects > 1.1).any()   # non-square both ways
  assert {r["modality"] for r in _all(records)} == PREFIXES
  assert {r["question_type"] for r in _all(records)} >= {
      "modality", "lesion", "presence", "where", "point", "box", "free", "grounding"}


def test_grounding_masks_nonempty_and_match_named_structure(dataset):
  root, _, records = dataset
  grounding = [r for r in _all(records) if r["task"] == "G"]
  assert len(grounding) >= N
  for r in grounding:
    answer = _gpt(r)
    match = re.fullmatch(r"Sure, the (.+) is <SEG><mask>(masks/[^<]+\.png)</mask>\.", answer)
    assert match, answer
    name, rel = match.groups()
    assert name == r["structure"]
    question = _human(r)
    assert re.search(rf"the {name}\b", question) or ("the lesion" in question and
                                          name in json.load(open(os.path.join(root, "meta.json")))
                                          ["lesions"][r["modality"]])
    image, mask = _load(root, r["image"]), _load(root, rel)
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert (mask > 0).mean() >= 0.05
    assert _nearest_class(r["modality"], image, mask > 0) == name, (r["id"], name)


def test_structures_disjoint_and_distinct_per_image(dataset):
  root, _, records = dataset
  for image, rs in _by_image(records).items():
    masks = [re.search(r"<mask>(.*)</mask>", _gpt(r)).group(1) for r in rs if r["task"] == "G"]
    names = [r["structure"] for r in rs if r["task"] == "G"]
    assert 1 <= len(masks) <= 3 and len(set(names)) == len(names)
    total = sum((_load(root, m) > 0).astype(int) for m in masks)
    assert total.max() == 1


def test_region_inside_named_structure(dataset):
  root, _, records = dataset
  region_records = [r for r in _all(records) if r["task"] == "R"]
  assert {r["region_kind"] for r in region_records} == {"point", "box", "free"}
  for r in region_records:
    rels = re.findall(r"<region>(.*?)</region>", _human(r))
    assert len(rels) == 1
    region = _load(root, rels[0]) > 0
    structure = _load(root, r["structure_mask"]) > 0
    assert region.any() and not (region & ~structure).any(), r["id"]
    assert _gpt(r) == r["structure"]
    grounding = [g for g in _by_image(records)[r["image"]]
                 if g["task"] == "G" and g["structure"] == r["structure"]]
    assert f"<mask>{r['structure_mask']}</mask>" in _gpt(grounding[0])
    ys, xs = np.nonzero(region)
    box_filled = region[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
    if r["region_kind"] == "point":
      side = ys.max() - ys.min() + 1
      assert box_filled and side == xs.max() - xs.min() + 1 and side % 2 == 1 and side <= 41
    elif r["region_kind"] == "box":
      assert box_filled


def test_where_largest_and_closed_answers(dataset):
  root, _, records = dataset
  lesions = json.load(open(os.path.join(root, "meta.json")))["lesions"]
  modality_answer = {"ct": "ct", "mr": "mr", "x": "x-ray", "ultrasound": "ultrasound",
                     "dermoscopy": "dermoscopy", "endoscopy": "endoscopy", "fundus": "fundus",
                     "microscopy": "microscopy"}
  seen = collections.Counter()
  for image, rs in _by_image(records).items():
    present = {r["structure"]: re.search(r"<mask>(.*)</mask>", _gpt(r)).group(1)
               for r in rs if r["task"] == "G"}
    for r in rs:
      kind, answer = r["question_type"], _gpt(r)
      seen[kind] += 1
      if kind == "modality":
        assert answer == modality_answer[r["modality"]]
      elif kind == "lesion":
        assert answer == ("yes" if set(present) & set(lesions[r["modality"]]) else "no")
      elif kind == "presence":
        assert answer == ("yes" if r["structure"] in present else "no")
        assert r["structure"] in _human(r)
      elif kind == "where":
        mask = _load(root, present[r["structure"]]) > 0
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        col = ("left", "center", "right")[min(2, int(3 * xs.mean() / w))]
        row = ("top", "middle", "bottom")[min(2, int(3 * ys.mean() / h))]
        expected = "center" if (row, col) == ("middle", "center") else f"{row} {col}"
        assert answer == expected, r["id"]
      elif kind == "largest":
        areas = {n: (_load(root, m) > 0).sum() for n, m in present.items()}
        assert answer == max(areas, key=areas.get)
  assert seen["lesion"] and seen["presence"] and seen["where"]


def _digest(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      path = os.path.join(dirpath, f)
      out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def test_same_seed_same_bytes(tmp_path):
  a, b, c, prefix = (str(tmp_path / k) for k in "abcp")
  synth.write_synthetic(a, 10, 7)
  synth.write_synthetic(b, 10, 7)
  synth.write_synthetic(c, 10, 8)
  synth.write_synthetic(prefix, 6, 7)
  da, db, dc, dp = _digest(a), _digest(b), _digest(c), _digest(prefix)
  assert da == db and len(da) > 30
  assert da != dc
  # Image i depends only on (seed, i): a smaller n gives the same first pictures.
  shared = [k for k in dp if k.startswith("images/")]
  assert len(shared) == 6 and all(dp[k] == da[k] for k in shared)


def test_corpus_texts_drop_paths(dataset):
  _, paths, _ = dataset
  texts = synth.synth_corpus_texts(paths.values())
  assert len(texts) == 2 * sum(len(json.load(open(p))) for p in paths.values())
  assert not any(".png" in t for t in texts)
  assert any("<region></region>" in t for t in texts)
  assert any(t.startswith("Sure, the ") and t.endswith(" is <SEG>.") for t in texts)


def test_chance_levels_hand_worked(tmp_path):
  os.makedirs(tmp_path / "masks")
  mask = np.zeros((10, 20), np.uint8)
  mask[:5, :4] = 255            # 20 of 200 px: full-image Dice = 2*20/(20+200) = 2/11
  Image.fromarray(mask).save(tmp_path / "masks" / "m.png")

  def rec(kind, task, answer_type, answer, modality="ct"):
    return {"id": "x", "image": f"images/{modality}_0.png", "modality": modality, "task": task,
            "answer_type": answer_type, "question_type": kind,
            "conversations": [{"from": "human", "value": "<image>\nq"},
                              {"from": "gpt", "value": answer}]}

  records = [rec("modality", "C", "CLOSED", "ct"), rec("modality", "C", "CLOSED", "ct"),
             rec("modality", "C", "CLOSED", "mr", "mr"),
             rec("lesion", "C", "CLOSED", "yes"), rec("lesion", "C", "CLOSED", "no", "mr"),
             rec("where", "C", "OPEN", "center"),
             rec("point", "R", "OPEN", "liver"), rec("box", "R", "OPEN", "liver"),
             rec("free", "R", "OPEN", "tumor", "mr"), rec("point", "R", "OPEN", "ventricle", "mr"),
             rec("grounding", "G", "OPEN", "Sure, the liver is <SEG><mask>masks/m.png</mask>.")]
  path = tmp_path / "split.json"
  path.write_text(json.dumps(records))
  levels = synth.chance_levels(str(path))
  # closed: modality majority "ct" 2/3, lesion majority 1/2 -> (2 + 1) / 5.
  assert levels["closed_vqa"] == pytest.approx(3 / 5)
  assert levels["closed_vqa_by_type"] == pytest.approx({"lesion": 0.5, "modality": 2 / 3})
  # per (type, modality): every group is answered perfectly here.
  assert levels["closed_vqa_modality_prior"] == pytest.approx(1.0)
  assert levels["region_vqa"] == pytest.approx(2 / 4)
  assert levels["region_vqa_modality_prior"] == pytest.approx(3 / 4)   # ct: 2/2, mr: 1/2
  assert levels["grounding_mdice_full_image"] == pytest.approx(2 / 11)
  assert (levels["n_closed"], levels["n_region"], levels["n_grounding"]) == (5, 4, 1)


def test_bad_arguments():
  with pytest.raises(ValueError, match="fractions"):
    synth.write_synthetic("/nonexistent", 4, 0, splits=(("train", 0.5), ("test", 0.4)))
  with pytest.raises(ValueError, match="n must be"):
    synth.write_synthetic("/nonexistent", 0, 0)
