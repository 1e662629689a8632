"""Inference API and `medplib predict` on a tiny random checkpoint: contracts, not answers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medplib_jax import cli
from medplib_jax.data import preprocess
from medplib_jax.data.batch import batch_spec
from medplib_jax.infer import api
from tiny_checkpoint import make_tiny_checkpoint, write_image

NEW = 4  # new tokens per answer: enough to exercise the decode loop


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def model(ckpt):
  return api.MedPLIB.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
  return write_image(str(tmp_path_factory.mktemp("img") / "ct_0001.png"), hw=(60, 90))


def test_lazy_top_level_export():
  code = ("import sys, medplib_jax; assert 'jax' not in sys.modules; "
          "from medplib_jax import MedPLIB; from medplib_jax.infer.api import MedPLIB as M; "
          "assert MedPLIB is M")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_from_pretrained_accepts_workdir_and_export(ckpt, model):
  assert api._find_model_dir(os.path.dirname(ckpt)) == ckpt
  assert model.template == "llava_v1" and model.mode == "correct"
  assert len(model.tokenizer) == model.model_cfg.llm.vocab_size
  with pytest.raises(FileNotFoundError, match="not a MedPLIB model directory"):
    api._find_model_dir(os.path.dirname(os.path.dirname(ckpt)))


def test_forced_mask_is_at_original_size(model, image_path):
  out = model.predict(image_path, "Please segment the liver.", max_new_tokens=NEW, force_mask=True,
                      batch_size=2)
  assert isinstance(out.text, str) and len(out.tokens) <= NEW
  assert out.forced != out.seg_found  # forced exactly when no <SEG> was generated
  assert len(out.masks) == 1 and out.masks[0].shape == (60, 90) and out.masks[0].dtype == bool
  assert len(out.mask_scores) == 1 and np.isfinite(out.mask_scores[0])
  # The probabilities the mask thresholds (correct mode: > 0.5), at the original size.
  probs = out.mask_probs[0]
  assert probs.shape == (60, 90) and probs.dtype == np.float32
  assert ((probs >= 0) & (probs <= 1)).all()
  np.testing.assert_array_equal(out.masks[0], probs > 0.5)


def test_no_mask_without_seg_in_correct_mode(model, image_path):
  out = model.predict(image_path, "Is there a lesion?", max_new_tokens=NEW, batch_size=2)
  assert out.forced is False
  assert len(out.masks) == (1 if out.seg_found else 0)


def test_batch_equals_single_calls(model, image_path, tmp_path):
  other = write_image(str(tmp_path / "mr_2.png"), hw=(80, 50), seed=3)
  questions = ["What modality is this image?", "Where is the liver located in this scan?"]
  batch = model.predict_batch([image_path, other], questions, max_new_tokens=NEW)
  singles = [model.predict(img, q, max_new_tokens=NEW, batch_size=2)
             for img, q in zip([image_path, other], questions)]
  assert [p.tokens for p in batch] == [p.tokens for p in singles]  # left padding is neutral


def test_region_prompt_builds_the_region_slot(model, image_path):
  image = api.load_image(image_path)
  region = api.region_from_prompt(image.shape[:2], box=(10, 5, 40, 30))
  sample = model.prepare(image, "What is inside the box?", [region])
  assert "<region></region>" in sample.prompt and sample.prompt.endswith("ASSISTANT:")
  assert len(sample.region_positions) == 1 and sample.region_grids[0].any()
  assert sample.ids[sample.region_positions[0]] == model.tokenizer.pad_id
  assert sample.ids[sample.region_positions[0] - 1] == model.tokenizer.region_start_id
  assert sample.image_start >= 0
  assert len(sample.ids) >= sample.image_start + model.num_image_tokens


def test_round_two_prompt_is_the_training_layout_up_to_its_answer(model, image_path):
  """prepare(question 2, history=[round 1]) == the training sample of both rounds, cut after
  round 2's "ASSISTANT:": same text, token ids, image slots, region slot and grid."""
  image = api.load_image(image_path)
  region = api.region_from_prompt(image.shape[:2], box=(10, 5, 40, 30))
  rounds = [("What is inside the box <region></region>?", "The spleen."),
            ("Where is the liver located?", "In the upper left of the image.")]
  conversations = [{"from": "human", "value": "<image>\n" + rounds[0][0]},
                   {"from": "gpt", "value": rounds[0][1]},
                   {"from": "human", "value": rounds[1][0]}, {"from": "gpt", "value": rounds[1][1]}]
  trained = preprocess.conversation_sample(image, conversations, [region], model.tokenizer,
                                           model.model_cfg, model.template)
  prompt = model.prepare(image, rounds[1][0], [region], history=rounds[:1])
  assert trained.prompt == prompt.prompt + " " + rounds[1][1] + "</s>"
  assert trained.ids[:len(prompt.ids)] == prompt.ids
  assert prompt.labels == [-100] * len(prompt.ids)
  assert (prompt.image_start, prompt.region_positions) == (trained.image_start,
                                                           trained.region_positions)
  assert np.array_equal(prompt.region_grids, trained.region_grids) and prompt.region_grids[0].any()
  for k in ("clip_image", "sam_image"):
    assert np.array_equal(getattr(prompt, k), getattr(trained, k)), k
  with pytest.raises(api.InputError, match="2 region"):
    model.prepare(image, "And in <region></region>?", [region], history=rounds[:1])
  with pytest.raises(api.InputError, match="pairs"):
    model.prepare(image, "What?", history=["no answer"])


def test_generation_batch_is_the_left_padded_contract(model, image_path):
  image = api.load_image(image_path)
  samples = [model.prepare(image, "What modality is this image?"),
             model.prepare(image, "Where is the liver located in this scan?")]
  batch = model._batch(samples, 3)
  length = batch["input_ids"].shape[1]
  assert length % api.PROMPT_BUCKET == 0
  for k, (shape, dtype) in batch_spec(model.model_cfg, length).items():
    assert batch[k].shape == (3,) + shape and batch[k].dtype == dtype, k
  for row, s in enumerate(samples + samples[-1:]):
    shift = length - len(s.ids)
    assert batch["input_ids"][row, shift:].tolist() == s.ids
    assert batch["attention_mask"][row].sum() == len(s.ids) and batch["attention_mask"][row, -1]
    assert batch["image_start"][row] == s.image_start + shift


@pytest.mark.parametrize("kwargs, match", [
    (dict(question="", box=None), "empty"),
    (dict(question="What is here?", point=(200, 5)), "outside"),
    (dict(question="What is here?", box=(10, 10, 95, 20)), "outside"),
    (dict(question="word " * 2000, box=None), "too long"),
])
def test_bad_input_raises_input_error(model, image_path, kwargs, match):
  question = kwargs.pop("question")
  with pytest.raises(api.InputError, match=match):
    model.predict(image_path, question, max_new_tokens=NEW, **kwargs)


def test_unreadable_image(model, tmp_path):
  bad = tmp_path / "x.png"
  bad.write_bytes(b"not an image")
  with pytest.raises(api.InputError, match="not usable"):
    model.predict(str(bad), "What is this?")


def test_predict_cli_writes_masks_at_original_size(ckpt, image_path, tmp_path, capsys):
  out_dir = tmp_path / "out"
  code = cli.main(["predict", "--checkpoint", ckpt, "--image", image_path, "--question",
                   "Segment the liver.", "--max-new-tokens", str(NEW), "--force-mask",
                   "--box", "10,5,40,30", "--out", str(out_dir), "--json"])
  assert code == 0
  result = json.loads(capsys.readouterr().out)
  assert result["image_size"] == [90, 60] and len(result["masks"]) == 1
  with Image.open(result["masks"][0]["mask"]) as m:
    assert m.size == (90, 60) and set(np.unique(np.asarray(m))) <= {0, 255}
  with Image.open(result["masks"][0]["overlay"]) as o:
    assert o.size == (90, 60) and o.mode == "RGB"


@pytest.mark.parametrize("extra, match", [
    (["--box", "10,5,400,30"], "outside"),
    (["--point", "1,2,3"], "expected 2 numbers"),
    (["--question", "   "], "empty"),
])
def test_predict_cli_bad_input_exits_2(ckpt, image_path, capsys, extra, match, monkeypatch, model):
  monkeypatch.setattr(api.MedPLIB, "from_pretrained", classmethod(lambda cls, *a, **k: model))
  argv = ["predict", "--checkpoint", ckpt, "--image", image_path, "--question", "What?"] + extra
  assert cli.main(argv) == 2
  assert match in capsys.readouterr().err


def test_predict_cli_unreadable_image_exits_2(ckpt, tmp_path, capsys):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG broken")
  assert cli.main(["predict", "--checkpoint", ckpt, "--image", str(bad), "--question", "What?"]) == 2
  assert "not usable" in capsys.readouterr().err
