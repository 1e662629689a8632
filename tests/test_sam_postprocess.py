"""SAM canvas pre-processing and mask post-processing (correct and reference modes)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medplib_jax.data.canvas import SAM_MEAN, SAM_STD, geometry, mask_canvas, sam_canvas
from medplib_jax.infer.masks import (REFERENCE_THRESHOLD, masks_from_logits, postprocess_logits,
                                     resize_bilinear)

torch.set_num_threads(1)


def test_sam_canvas_is_resized_normalised_and_centred():
  image = np.random.default_rng(0).integers(0, 256, size=(120, 200, 3), dtype=np.uint8)
  canvas, geo = sam_canvas(image, 256)
  # ResizeLongestSide: 120 * 1.28 = 153.6 -> int(153.6 + 0.5) = 154; pad (256 - 154) // 2 = 51 on top.
  assert geo.resized_hw == (154, 256) and (geo.pad_top, geo.pad_left) == (51, 0)
  assert canvas.shape == (256, 256, 3) and canvas.dtype == np.float32
  resized = np.asarray(Image.fromarray(image).resize((256, 154), Image.BILINEAR), np.float32)
  np.testing.assert_allclose(canvas[51:205], (resized - SAM_MEAN) / SAM_STD, atol=1e-5)
  assert not canvas[:51].any() and not canvas[205:].any()  # zero pad after normalisation


@pytest.mark.parametrize("in_hw,out_hw", [((64, 64), (256, 256)), ((40, 64), (97, 151)),
                                          ((64, 64), (23, 37))])
def test_resize_matches_torch_interpolate(in_hw, out_hw):
  x = np.random.default_rng(1).normal(size=(2,) + in_hw).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x)[:, None], out_hw, mode="bilinear",
                      align_corners=False)[:, 0].numpy()
  np.testing.assert_allclose(np.asarray(resize_bilinear(x, out_hw)), ref, atol=1e-4)


def _square_case(hw=(120, 200), box=(30, 70, 110, 150)):
  """A square in a non-square original, and its low-res logits on the SAM canvas."""
  y0, y1, x0, x1 = box
  mask = np.zeros(hw, bool)
  mask[y0:y1, x0:x1] = True
  canvas = mask_canvas(mask, 256).astype(np.float32)
  low_res = canvas.reshape(64, 4, 64, 4).mean(axis=(1, 3))  # area-downsample to the 64 logits
  return mask, (low_res * 2.0 - 1.0) * 20.0, geometry(hw, 256)


def test_correct_mode_puts_the_square_back():
  mask, logits, geo = _square_case()
  out = np.asarray(postprocess_logits(logits[None], geo, "correct"))
  assert out.shape == (1, 120, 200)
  pred = np.asarray(masks_from_logits(out, 0.5))[0]
  iou = (pred & mask).sum() / (pred | mask).sum()
  assert iou > 0.95
  ys, xs = np.nonzero(pred)
  assert abs(ys.mean() - 49.5) < 0.5 and abs(xs.mean() - 129.5) < 0.5  # rows 30..69, cols 110..149
  assert pred[32:68, 112:148].all() and not pred[:27].any() and not pred[73:].any()


def _medplib_postprocess(masks, input_size, original_size):
  """MedPLIB's `postprocess_masks` (model/MedPLIB.py), written out with torch ops."""
  pad_h = masks.shape[-2] - input_size[0]
  pad_w = masks.shape[-1] - input_size[1]
  pad_top, pad_left = pad_h // 2, pad_w // 2
  h, w = masks.shape[-2] - pad_h, masks.shape[-1] - pad_w
  masks = masks[:, :, pad_top:pad_top + h, pad_left:pad_left + w]
  return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("hw", [(120, 200), (200, 120), (77, 300), (150, 150)])
def test_reference_mode_reproduces_medplib(hw):
  _, logits, geo = _square_case(hw, box=(10, 40, 20, 60))
  ref = _medplib_postprocess(torch.from_numpy(logits)[None, None], geo.resized_hw, hw)[0].numpy()
  ours = np.asarray(postprocess_logits(logits[None], geo, "reference"))
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  if hw[0] == hw[1]:  # square: the reference crop keeps all 64 rows, so the masks agree
    correct = np.asarray(masks_from_logits(postprocess_logits(logits[None], geo, "correct"), 0.5))
    ref_mask = np.asarray(masks_from_logits(ours, 0.5))
    assert (correct & ref_mask).sum() / (correct | ref_mask).sum() > 0.95


def test_reference_mode_shifts_non_square_masks():
  mask, logits, geo = _square_case()
  ref = np.asarray(masks_from_logits(postprocess_logits(logits[None], geo, "reference"), 0.5))[0]
  ys, _ = np.nonzero(ref)
  # pad = 64 - 154 = -90 -> slice(-45, 109) keeps logit rows 19..63, stretched over the 120 rows:
  # the square (canvas rows ~22..35 of 64) lands near rows 8..42 instead of 30..69.
  assert ys.mean() < 49.5 - 20
  assert (ref & mask).sum() / (ref | mask).sum() < 0.5


def test_threshold_is_a_parameter():
  logits = np.array([-3.0, -2.0, 0.0, 1.0], np.float32)
  np.testing.assert_array_equal(np.asarray(masks_from_logits(logits, REFERENCE_THRESHOLD)),
                                [False, True, True, True])  # sigmoid(-2) = 0.119 > 0.1
  np.testing.assert_array_equal(np.asarray(masks_from_logits(logits, 0.5)),
                                [False, False, False, True])
  with pytest.raises(ValueError, match="mode"):
    postprocess_logits(logits.reshape(1, 2, 2), geometry((2, 2), 256), "bogus")
