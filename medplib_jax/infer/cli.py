"""`medplib predict`: answer one question about one image; write the masks of `<SEG>` answers.

    medplib predict --checkpoint runs/demo/stage4/export --image ct_0001.png \\
        --question "Please segment the liver." [--box 10,20,80,90] [--out DIR] [--json]

Prints the answer. For each decoded mask it writes `<stem>_mask<k>.png` (0/255, original size)
and `<stem>_overlay<k>.png` into --out. Bad input (unreadable image, prompt outside the image,
empty or over-long question, missing checkpoint) prints a message and exits with status 2.
"""

import json
import os
import sys

from PIL import Image

from medplib_jax.infer import api

EXIT_BAD_INPUT = 2


def _floats(text: str, name: str, count: int | None = None, even: bool = False) -> list[float]:
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    raise ValueError(f"--{name} {text!r}: expected comma-separated numbers") from None
  if count is not None and len(values) != count:
    raise ValueError(f"--{name} {text!r}: expected {count} numbers, got {len(values)}")
  if even and (len(values) % 2 or len(values) < 6):
    raise ValueError(f"--{name} {text!r}: expected at least 3 x,y pairs")
  return values


def add_arguments(p) -> None:
  p.add_argument("--checkpoint", required=True, help="model directory (params/, config.json, tokenizer/)")
  p.add_argument("--image", required=True, help="image file (PNG / JPEG / ...)")
  p.add_argument("--question", required=True, help="the question; '<region></region>' marks the region")
  prompt = p.add_mutually_exclusive_group()
  prompt.add_argument("--point", help="X,Y region prompt (pixels of the original image)")
  prompt.add_argument("--box", help="X0,Y0,X1,Y1 region prompt")
  prompt.add_argument("--polygon", help="X,Y,X,Y,... free-form region prompt (>= 3 vertices)")
  prompt.add_argument("--region-mask", help="PNG of the image size; nonzero pixels are the region")
  p.add_argument("--out", default=".", help="directory for mask and overlay PNGs (default: .)")
  p.add_argument("--json", action="store_true", help="print a JSON object instead of the answer")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--mode", choices=("correct", "reference"), default="correct",
                 help="post-processing and prompt setting (docs/evaluation.md)")
  p.add_argument("--force-mask", action="store_true",
                 help="decode a mask even without <SEG> (the reference's forced mask)")


def _prompt(args) -> dict:
  if args.point:
    return {"point": _floats(args.point, "point", 2)}
  if args.box:
    return {"box": _floats(args.box, "box", 4)}
  if args.polygon:
    v = _floats(args.polygon, "polygon", even=True)
    return {"polygon": list(zip(v[0::2], v[1::2]))}
  if args.region_mask:
    if not os.path.isfile(args.region_mask):
      raise ValueError(f"--region-mask {args.region_mask!r}: no such file")
    return {"region_mask": args.region_mask}
  return {}


def run(args) -> int:
  try:
    prompt = _prompt(args)
    if args.max_new_tokens < 1:
      raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    image = api.load_image(args.image)
    model = api.MedPLIB.from_pretrained(args.checkpoint, mode=args.mode)
    pred = model.predict(image, args.question, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         force_mask=args.force_mask or None, **prompt)
  except (ValueError, FileNotFoundError) as e:
    print(f"medplib predict: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT

  written = []
  if pred.masks:
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.image))[0]
    for k, mask in enumerate(pred.masks):
      mask_path = os.path.join(args.out, f"{stem}_mask{k}.png")
      overlay_path = os.path.join(args.out, f"{stem}_overlay{k}.png")
      with open(mask_path, "wb") as f:
        f.write(api.mask_png(mask))
      Image.fromarray(api.overlay(image, [mask])).save(overlay_path)
      written.append({"mask": mask_path, "overlay": overlay_path, "area": int(mask.sum()),
                      "score": pred.mask_scores[k]})
  if args.json:
    print(json.dumps({"text": pred.text, "seg_found": pred.seg_found, "forced": pred.forced,
                      "image_size": [int(image.shape[1]), int(image.shape[0])], "masks": written}))
  else:
    print(pred.text)
    for w in written:
      print(f"mask: {w['mask']}  overlay: {w['overlay']}", file=sys.stderr)
  return 0
