"""`medplib serve --checkpoint DIR [--host 127.0.0.1] [--port 8000]`: web page + JSON API.

Binds 127.0.0.1 by default (pass --host 0.0.0.0 deliberately to expose it). The model loads once
and is compiled for the default request shape before the "listening" line is printed.
"""

import logging
import sys

from medplib_jax.infer.api import MedPLIB
from medplib_jax.serve.server import Limits, Server, warm_up

EXIT_BAD_INPUT = 2


def add_arguments(p) -> None:
  d = Limits()
  p.add_argument("--checkpoint", required=True, help="model directory (params/, config.json, tokenizer/)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
  p.add_argument("--mode", choices=("correct", "reference"), default="correct")
  p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20)
  p.add_argument("--max-pixels", type=int, default=d.max_pixels)
  p.add_argument("--max-question-chars", type=int, default=d.max_question_chars)
  p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="per-request cap")
  p.add_argument("--default-new-tokens", type=int, default=d.default_new_tokens)
  p.add_argument("--max-queue", type=int, default=d.max_queue, help="queued requests before 503")
  p.add_argument("--max-batch", type=int, default=d.max_batch, help="requests batched per call")
  p.add_argument("--timeout", type=float, default=d.timeout_s, help="per-request seconds before 504")
  p.add_argument("--no-warmup", action="store_true", help="skip compiling before listening")


def run(args) -> int:
  # force: an imported library may already have put a handler on the root logger.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      force=True)
  limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels,
                  max_question_chars=args.max_question_chars, max_new_tokens=args.max_new_tokens,
                  default_new_tokens=min(args.default_new_tokens, args.max_new_tokens),
                  max_queue=args.max_queue, max_batch=args.max_batch, timeout_s=args.timeout)
  try:
    model = MedPLIB.from_pretrained(args.checkpoint, mode=args.mode)
  except (ValueError, FileNotFoundError) as e:
    print(f"medplib serve: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  if not args.no_warmup:
    warm_up(model, limits)
  server = Server((args.host, args.port), model, limits)
  host, port = server.server_address[:2]
  print(f"medplib serve: listening on http://{host}:{port}/", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0
