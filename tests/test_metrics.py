"""VQA and grounding metrics against hand-worked examples (reference and correct modes)."""

import math
import sys

import numpy as np
import pytest

from medplib_jax.eval import grounding_metrics as gm
from medplib_jax.eval import vqa_metrics as vm

# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("mode", vm.MODES)
@pytest.mark.parametrize("text, expected", [
    ("The liver, and a kidney.", "liver and kidney"),
    ("x-ray", "x ray"),
    ("Two lesions", "2 lesions"),
    ("none", "0"),
    ("It is 3.5 cm.", "it is 3.5 cm"),
    ("dont know", "don't know"),
    ("Yes!", "yes"),
    ("(left) lung; upper lobe", "left lung upper lobe"),
])
def test_normalize_common(mode, text, expected):
  assert vm.normalize_answer(text, mode) == expected


@pytest.mark.parametrize("text, reference, correct", [
    # A hyphen touching a space anywhere makes the reference delete *every* hyphen.
    ("x-ray - yes", "xray yes", "x ray yes"),
    # A digit-comma-digit anywhere makes the reference delete every punctuation mark.
    ("1,000 cells (x-ray)", "1000 cells xray", "1000 cells x ray"),
    # Capitalised contraction keys never match a lower-cased word in the reference table.
    ("Im fine", "im fine", "i'm fine"),
    # The reference table maps "somebody'd" the wrong way round.
    ("somebody'd", "somebodyd", "somebody'd"),
])
def test_normalize_quirks(text, reference, correct):
  assert vm.normalize_answer(text, "reference") == reference
  assert vm.normalize_answer(text, "correct") == correct


def test_reference_period_limit_per_pass():
  text = "x. " * 40  # 40 sentence-final periods
  once = vm.normalize_answer(text, "reference").split()
  assert once.count("x") == 32 and once.count("x.") == 8  # re.sub(count=re.UNICODE == 32)
  assert vm.normalize_answer(text, "reference", passes=2).split() == ["x"] * 40
  assert vm.normalize_answer(text, "correct").split() == ["x"] * 40


def test_unknown_mode():
  with pytest.raises(ValueError, match="unknown metric mode"):
    vm.normalize_answer("yes", "strict")


# ----------------------------------------------------------------------------- closed / tokens


@pytest.mark.parametrize("mode", vm.MODES)
def test_closed_match(mode):
  assert vm.closed_match("Yes.", "yes", mode) == 1.0
  assert vm.closed_match("Yes, it is", "yes", mode) == 0.0
  assert vm.closed_match("The CT", "ct", mode) == 1.0


def test_token_scores_reference():
  # pred: liver x2, kidney; answer: liver, spleen.
  s = vm.token_scores("liver liver kidney", "liver spleen", "reference")
  assert s["exact_match"] == pytest.approx(1 / 3)  # 1 distinct answer word found / 3 pred tokens
  assert s["precision"] == pytest.approx(2 / 3)  # tp=2 (pred count), fp=1
  assert s["recall"] == pytest.approx(2 / 3)  # tp=2 / (tp + fn=1)
  assert s["f1"] == pytest.approx(2 / 3)
  # Recall mixes prediction and answer counts: 3 / (3 + 1) although half the answer is missing.
  s = vm.token_scores("liver liver liver", "liver kidney", "reference")
  assert s["recall"] == pytest.approx(0.75) and s["precision"] == 1.0
  assert s["f1"] == pytest.approx(2 * 0.75 / 1.75)
  assert vm.token_scores("", "liver", "reference") == {
      "exact_match": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_token_scores_correct():
  s = vm.token_scores("liver liver kidney", "liver spleen", "correct")
  assert s == pytest.approx({"exact_match": 0.0, "precision": 1 / 3, "recall": 0.5, "f1": 0.4})
  s = vm.token_scores("liver liver liver", "liver kidney", "correct")
  assert s == pytest.approx({"exact_match": 0.0, "precision": 1 / 3, "recall": 0.5, "f1": 0.4})
  s = vm.token_scores("The left kidney.", "left kidney", "correct")
  assert s == pytest.approx({"exact_match": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0})


# ----------------------------------------------------------------------------- BLEU

BP = math.exp(1 - 5 / 4)  # hypothesis 4 tokens, reference 5


def test_bleu_reference_individual_orders():
  ref, hyp = [list("abcde")], list("abcx")  # p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/1
  assert vm.sentence_bleu(ref, hyp, (1, 0, 0, 0)) == pytest.approx(BP * 3 / 4, rel=1e-12)
  assert vm.sentence_bleu(ref, hyp, (0, 1, 0, 0)) == pytest.approx(BP * 2 / 3, rel=1e-12)
  assert vm.sentence_bleu(ref, hyp, (0, 0, 1, 0)) == pytest.approx(BP * 1 / 2, rel=1e-12)
  # NLTK: the 4-gram precision 0 enters as sys.float_info.min -> tiny but non-zero.
  expected = BP * math.exp(0.25 * (math.log(0.75 * (2 / 3) * 0.5) + math.log(sys.float_info.min)))
  got = vm.sentence_bleu(ref, hyp)
  assert 0 < got < 1e-70 and got == pytest.approx(expected, rel=1e-9)
  # An order with weight 1 and no match: the score is ~float_info.min, not 0.
  got = vm.sentence_bleu([["a", "b"]], ["b", "a"], (0, 1, 0, 0))
  assert 0 < got < 1e-300


def test_bleu_correct_cumulative():
  ref, hyp = [list("abcde")], list("abcx")
  assert vm.sentence_bleu(ref, hyp, (1.0,), "correct") == pytest.approx(BP * 0.75)
  assert vm.sentence_bleu(ref, hyp, (0.5, 0.5), "correct") == pytest.approx(BP * math.sqrt(0.5))
  assert vm.sentence_bleu(ref, hyp, (1 / 3,) * 3, "correct") == pytest.approx(BP * 0.25 ** (1 / 3))
  assert vm.sentence_bleu(ref, hyp, (0.25,) * 4, "correct") == 0.0


@pytest.mark.parametrize("mode", vm.MODES)
def test_bleu_clipping_brevity_and_empty(mode):
  # Clipped unigram count 1 of 3; hypothesis longer than reference -> no brevity penalty.
  assert vm.sentence_bleu([["a", "b"]], ["a", "a", "a"], (1, 0, 0, 0), mode) == pytest.approx(1 / 3)
  # Closest reference length ties (2 and 4 for a 3-token hypothesis) go to the shorter: bp = 1.
  assert vm.sentence_bleu([["a", "b"], list("abcd")], list("abc"), (1, 0, 0, 0), mode) == 1.0
  assert vm.sentence_bleu([["a"]], ["b"], (1, 0, 0, 0), mode) == 0.0
  assert vm.sentence_bleu([["a"]], [], (1, 0, 0, 0), mode) == 0.0


def test_bleu_scores_names():
  ref = vm.bleu_scores("liver and kidney", "liver and spleen", "reference")
  assert set(ref) == {"bleu", "bleu_1", "bleu_2", "bleu_3"}
  assert ref["bleu_1"] == pytest.approx(2 / 3) and ref["bleu_2"] == pytest.approx(1 / 2)
  cor = vm.bleu_scores("liver and kidney", "liver and spleen", "correct")
  assert set(cor) == {"bleu", "bleu_1", "bleu_2", "bleu_3", "bleu_4"}
  assert cor["bleu_2"] == pytest.approx(math.sqrt(2 / 3 * 1 / 2)) and cor["bleu_3"] == 0.0


# ----------------------------------------------------------------------------- open accuracy

CANDIDATES = ["liver", "left kidney", "right kidney", "yes"]


@pytest.mark.parametrize("mode", vm.MODES)
def test_open_accuracy_clear_cases(mode):
  assert vm.open_accuracy("The left kidney is enlarged", "left kidney", CANDIDATES, mode) == 1.0
  assert vm.open_accuracy("Left kidney.", "left kidney", [], mode) == 1.0  # equal after normalising
  assert vm.open_accuracy("spleen", "left kidney", CANDIDATES, mode) == 0.0


def test_open_accuracy_ties_and_short_candidates():
  # "kidney" is equally close to both kidneys: the reference takes the first candidate.
  assert vm.open_accuracy("kidney", "left kidney", CANDIDATES, "reference") == 1.0
  assert vm.open_accuracy("kidney", "left kidney", CANDIDATES[::-1], "reference") == 0.0
  assert vm.open_accuracy("kidney", "left kidney", CANDIDATES, "correct") == 0.0
  assert vm.open_accuracy("kidney", "left kidney", CANDIDATES[::-1], "correct") == 0.0
  # No candidate shares a word: the reference still picks the first one.
  assert vm.open_accuracy("spleen", "liver", CANDIDATES, "reference") == 1.0
  assert vm.open_accuracy("spleen", "liver", CANDIDATES, "correct") == 0.0
  # Reference closeness = share of the candidate's words found, so a one-word candidate wins.
  cands = ["liver", "liver and kidney"]
  assert vm.open_accuracy("liver and kidneys", "liver and kidney", cands, "reference") == 0.0
  assert vm.open_accuracy("liver and kidneys", "liver and kidney", cands, "correct") == 1.0


# ----------------------------------------------------------------------------- accumulator

RECORDS = [
    {"text": "Yes.", "gt": "yes", "answer_type": "closed"},
    {"text": "no", "gt": "yes", "answer_type": "CLOSED"},
    {"text": "liver liver kidney", "gt": "liver spleen", "answer_type": "OPEN"},
    {"text": "the left kidney is enlarged", "gt": "left kidney", "answer_type": "other"},
    {"text": "b", "gt": "a", "answer_type": "choice"},
]


def test_evaluate_vqa_reference():
  r = vm.evaluate_vqa(RECORDS, "reference")
  assert (r["num_open"], r["num_closed"], r["num_skipped"]) == (2, 2, 1)
  assert r["closed_accuracy"] == 50.0
  # exact_match: 1/3 and 2/4 (both answer words among 4 prediction words).
  assert r["exact_match"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)
  assert r["precision"] == pytest.approx(100 * (2 / 3 + 2 / 4) / 2)
  assert r["recall"] == pytest.approx(100 * (2 / 3 + 1) / 2)
  # Candidates = every answer (yes, liver spleen, left kidney, a). Record 3 ties between
  # "liver spleen" and "left kidney" (1/2 each); the first is the answer.
  assert r["open_accuracy"] == 100.0
  assert r["bleu_1"] == pytest.approx(100 * (1 / 3 + 2 / 4 * 1.0) / 2)


def test_evaluate_vqa_correct():
  r = vm.evaluate_vqa(RECORDS, "correct")
  assert r["closed_accuracy"] == 50.0
  assert r["exact_match"] == 0.0
  assert r["f1"] == pytest.approx(100 * (0.4 + 2 * 0.5 * 1 / 1.5) / 2)
  assert r["open_accuracy"] == 50.0  # the tie of record 3 is a miss
  assert r["bleu_4"] == 0.0 and r["bleu"] == r["bleu_4"]


def test_vqa_accumulator_modality_macro_and_empty():
  acc = vm.VqaAccumulator("correct")
  acc.add("yes", "yes", "closed", modality="CT")
  acc.add("no", "yes", "closed", modality="CT")
  acc.add("a", "a", "closed", modality="MR")
  r = acc.result()
  assert r["closed_accuracy_by_modality"] == {"CT": 50.0, "MR": 100.0}
  assert r["closed_accuracy_macro"] == 75.0
  assert r["closed_accuracy"] == pytest.approx(200 / 3)
  assert r["f1"] is None  # correct mode: no open question, no number
  assert vm.VqaAccumulator("reference").result()["f1"] == 0.0  # the reference prints 0
  with pytest.raises(ValueError, match="lacks"):
    vm.evaluate_vqa([{"text": "yes"}])


def test_empty_answer_type_skipped_in_reference_mode_inferred_in_correct_mode():
  """The reference's script scores neither branch for an empty type (skipped, counted); correct
  mode scores a yes/no answer as closed and any other as open."""
  rows = [("Yes.", "yes", ""), ("left kidney", "the left kidney", ""), ("no", "no", "closed")]
  ref = vm.VqaAccumulator("reference")
  cor = vm.VqaAccumulator("correct")
  for pred, ans, kind in rows:
    ref.add(pred, ans, kind)
    cor.add(pred, ans, kind)
  r, c = ref.result(), cor.result()
  assert (r["num_closed"], r["num_open"], r["num_skipped"], r["num_inferred_type"]) == (1, 0, 2, 0)
  assert (c["num_closed"], c["num_open"], c["num_skipped"], c["num_inferred_type"]) == (2, 1, 0, 2)
  assert c["closed_accuracy"] == 100.0 and c["exact_match"] == 100.0


# ----------------------------------------------------------------------------- grounding


def test_mask_iou_dice_and_empty_union():
  pred = np.array([[1, 1], [0, 0]], bool)
  gt = np.array([[1, 0], [1, 0]], bool)
  assert gm.mask_iou(pred, gt) == pytest.approx(1 / 3)
  assert gm.dice_from_iou(1 / 3) == pytest.approx(0.5)  # = 2|P&G| / (|P|+|G|) = 2/4
  empty = np.zeros((2, 2), bool)
  for mode in gm.MODES:
    assert gm.sample_iou(empty, empty, mode) == 0.0
    assert gm.sample_iou(None, gt, mode) == 0.0


def test_modality_from_path():
  assert gm.modality_from_path("/data/SAMed2D/ct_00012_liver.png") == "ct"
  assert gm.modality_from_path("x_ray_12.png") == "x"
  assert gm.modality_from_path("dermoscopy_ISIC_001.png") == "dermoscopy"


def test_grounding_accumulator_by_modality():
  pred = np.array([[1, 1], [0, 0]], bool)
  gt = np.array([[1, 0], [1, 0]], bool)
  acc = gm.GroundingAccumulator()
  assert acc.add(pred, gt, "ct") == pytest.approx(1 / 3)
  acc.add(gt.astype(np.uint8), gt, "ct")  # 0/1 integers are accepted
  acc.add(None, gt, "mr")  # nothing decoded
  r = acc.result()
  assert r["num_samples"] == 3
  assert r["miou"] == pytest.approx(100 * (1 / 3 + 1 + 0) / 3)
  assert r["mdice"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
  # ct: (I, U) = (1, 3) and (2, 2): gIoU (1/3 + 1) / 2, cIoU 3 / 5, Dice 2/4 and 4/4.
  assert r["by_modality"]["ct"] == pytest.approx(
      {"miou": 100 * 2 / 3, "mdice": 75.0, "giou": 100 * 2 / 3, "ciou": 60.0, "median_dice": 75.0,
       "num_samples": 2, "num_objects": 2})
  assert r["by_modality"]["mr"] == {"miou": 0.0, "mdice": 0.0, "giou": 0.0, "ciou": 0.0,
                                    "median_dice": 0.0, "num_samples": 1, "num_objects": 1}
  assert gm.GroundingAccumulator().result()["miou"] is None
  assert gm.grounding_metrics([(pred, gt, "ct")])["miou"] == pytest.approx(100 / 3)


def test_grounding_multi_mask_modes():
  gt = np.array([[[1, 0], [1, 0]], [[0, 1], [0, 1]]], bool)  # left column, right column
  pred = gt.copy()
  assert gm.sample_iou(pred, gt, "correct") == 1.0
  # Reference: the first prediction against both masks: I = 2 + 0, U = 2 + 4.
  assert gm.sample_iou(pred, gt, "reference") == pytest.approx(1 / 3)
  assert gm.sample_iou(pred[:1], gt, "correct") == pytest.approx(0.5)  # missing mask -> IoU 0


def test_grounding_bad_input():
  with pytest.raises(ValueError, match="threshold"):
    gm.mask_iou(np.full((2, 2), 0.7), np.ones((2, 2), bool))
  with pytest.raises(ValueError, match="shape"):
    gm.mask_iou(np.ones((2, 2), bool), np.ones((3, 2), bool))
  with pytest.raises(ValueError, match="unknown metric mode"):
    gm.GroundingAccumulator("paper")


def _block(rows, cols, shape=(4, 4)):
  mask = np.zeros(shape, bool)
  mask[rows, cols] = True
  return mask


def test_giou_ciou_median_dice_worked_example():
  """Three one-object samples on 4x4 images, counted by hand:
  A: gt top-left 2x2 (4 px), pred its top row (2 px)        I 2, U 4: IoU 1/2, Dice 4/6
  B: gt left half (8 px), pred its top three rows (6 px)     I 6, U 8: IoU 3/4, Dice 12/14
  C: gt one pixel, nothing decoded                           I 0, U 1: IoU 0,   Dice 0
  gIoU = (1/2 + 3/4 + 0) / 3, cIoU = (2 + 6 + 0) / (4 + 8 + 1) = 8/13, median Dice = 4/6."""
  samples = [(_block(0, slice(0, 2)), _block(slice(0, 2), slice(0, 2)), "ct"),
             (_block(slice(0, 3), slice(0, 2)), _block(slice(None), slice(0, 2)), "ct"),
             (None, _block(3, 3), "mr")]
  assert [gm.mask_counts(p, g) for p, g, _ in samples] == [([2], [4]), ([6], [8]), ([0], [1])]
  r = gm.grounding_metrics(samples, "correct")
  assert r["giou"] == pytest.approx(100 * 1.25 / 3) == pytest.approx(r["miou"])  # one object each
  assert r["ciou"] == pytest.approx(100 * 8 / 13)
  assert r["median_dice"] == pytest.approx(100 * 4 / 6)
  assert r["mdice"] == pytest.approx(100 * (4 / 6 + 12 / 14 + 0) / 3)
  assert (r["num_samples"], r["num_objects"]) == (3, 3)
  assert r["by_modality"]["ct"]["ciou"] == pytest.approx(100 * 8 / 12)
  # Reference mode: LISA's epsilons, I / (U + 1e-5) and sum I / (sum U + 1e-10).
  ref = gm.grounding_metrics(samples, "reference")
  assert ref["giou"] == pytest.approx(100 * (2 / (4 + 1e-5) + 6 / (8 + 1e-5)) / 3, rel=1e-12)
  assert ref["ciou"] == pytest.approx(100 * 8 / (13 + 1e-10), rel=1e-12)
  assert ref["giou"] != r["giou"]


def test_giou_counts_objects_miou_counts_samples():
  """A sample with two objects found 1 and 0 (sample IoU 1/2) and one with one object found 1:
  mIoU (1/2 + 1) / 2 = 3/4, gIoU over the three objects (1 + 0 + 1) / 3, cIoU 6 / 10, median
  Dice of (1, 0, 1) = 1. A bare IoU (no counts) is one object and leaves cIoU undefined."""
  acc = gm.GroundingAccumulator("correct")
  assert acc.add_counts([4, 0], [4, 4], "ct") == 0.5
  acc.add_counts([2], [2], "ct")
  r = acc.result()
  assert r["miou"] == pytest.approx(75.0) and r["giou"] == pytest.approx(100 * 2 / 3)
  assert r["ciou"] == pytest.approx(60.0) and r["median_dice"] == 100.0
  assert (r["num_samples"], r["num_objects"]) == (2, 3)
  acc.add_iou(0.5, "mr")
  r = acc.result()
  assert r["ciou"] is None and r["num_objects"] == 4
  assert r["giou"] == pytest.approx(100 * 2.5 / 4) and r["by_modality"]["mr"]["median_dice"] == (
      pytest.approx(100 * 2 / 3))  # Dice of IoU 1/2


def test_empty_union_is_a_found_no_object_target_for_giou():
  """LISA counts an empty union as IoU 1 (`acc_iou[union_i == 0] += 1.0`); mIoU keeps 0."""
  for mode in gm.MODES:
    acc = gm.GroundingAccumulator(mode)
    acc.add_counts([0], [0], "ct")
    r = acc.result()
    assert (r["miou"], r["giou"], r["median_dice"]) == (0.0, 100.0, 100.0)


def test_mask_counts_pairing_follows_the_mode():
  gt = np.array([[[1, 0], [1, 0]], [[0, 1], [0, 1]]], bool)  # left column, right column
  assert gm.mask_counts(gt, gt, "correct") == ([2, 2], [2, 2])
  assert gm.mask_counts(gt, gt, "reference") == ([2, 0], [2, 4])  # the first prediction, twice
  assert gm.mask_counts(gt[:1], gt, "correct") == ([2, 0], [2, 2])  # a missing one is empty
  assert gm.iou_from_counts([2, 0], [2, 4], "reference") == pytest.approx(1 / 3)
  assert gm.iou_from_counts([2, 0], [2, 2], "correct") == pytest.approx(0.5)
  with pytest.raises(ValueError, match="as many"):
    gm.iou_from_counts([1], [1, 2])
