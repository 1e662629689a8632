"""The MedPLIB tokenizer: a LLaMA/LLaVA tokenizer directory plus MedPLIB's added tokens.

`load_tokenizer(dir)` loads any Hugging Face tokenizer directory (the released LLaVA-v1.5 / MedPLIB
one, or the small one `train_tokenizer` writes for the tiny model) with `transformers`, appends
`ADDED_TOKENS` in SPEC order (as the reference does with `add_tokens(..., special_tokens=True)`),
and sets pad = unk. Ids of the structural tokens are exposed as attributes so nothing downstream
looks tokens up by string.

Text is encoded as the reference's slow `LlamaTokenizer` (transformers 4.31, legacy) does it,
whatever the installed transformers does: the text is split at every added token (leftmost, longest
first); the whitespace on both sides of an added token is stripped (newlines and tabs included),
except beside `<s> </s> <unk>`, which keep it; each remaining chunk is encoded on its own by the base
model with its dummy prefix: sentencepiece for a `tokenizer.model` directory, the `tokenizer.json`
model otherwise. So `is <SEG>.` is `▁is <SEG> ▁ .` and `<im_end>\nPlease` is `<im_end> ▁Please`
(tests/test_tokenizer_reference.py compares against ids recorded from the reference).

The tiny default is a LLaMA-style byte-fallback BPE (SentencePiece-like `▁` word marker, ids 0/1/2 =
`<unk>`/`<s>`/`</s>`, ids 3..258 = the 256 byte tokens) with a base vocabulary of exactly
`vocab_size` ids, so `configs/common.py`'s tiny `vocab_size = 1000 + len(ADDED_TOKENS)` holds.
"""

import dataclasses
import functools
import json
import os
import re

import sentencepiece
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Added to the LLaMA vocabulary, in this order (SPEC.md: tokens and sequence layout).
ADDED_TOKENS = (
    ["<SEG>", "<ref>", "</ref>", "<region>", "</region>", "<sr>", "</sr>", "<mask>", "</mask>"]
    + [f"<gen_{i}>" for i in range(1, 257)]
    + ["<im_start>", "<im_end>"]
)

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # the reference's placeholder id for the image features
REGION_TOKEN_INDEX = -300  # ... and for the region feature between <region></region>
_SPECIALS = ("<unk>", "<s>", "</s>")
_BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))


class TokenizerError(ValueError):
  """A tokenizer directory that cannot serve MedPLIB (missing files or tokens)."""


@dataclasses.dataclass(frozen=True)
class MedplibTokenizer:
  """A loaded HF tokenizer with MedPLIB's tokens; `.hf` is the transformers object (vocabulary,
  decoding); `encode` follows the reference's splitting rule (module docstring)."""
  hf: object
  pad_id: int
  bos_id: int
  eos_id: int
  unk_id: int
  seg_id: int
  im_start_id: int
  im_end_id: int
  region_start_id: int
  region_end_id: int
  mask_start_id: int
  mask_end_id: int
  chunks: "ChunkEncoder" = dataclasses.field(repr=False)
  added: "AddedTokens" = dataclasses.field(repr=False)

  def __len__(self) -> int:
    return len(self.hf)

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of `text`; with `add_bos`, exactly `tokenizer(text).input_ids` of the reference."""
    ids = [self.bos_id] if add_bos else []
    for piece, added_id in self.added.split(text):
      ids.extend([added_id] if added_id is not None else self.chunks.encode(piece))
    return ids

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Text of `ids` exactly as the reference's slow LlamaTokenizer (4.31) decodes them: runs of
    base-vocabulary ids are decoded by the base model, MedPLIB's tokens are joined to them with
    a space on both sides (`is <SEG> .`), `<s> </s> <unk>` are written inline, and
    `skip_special_tokens` drops only those three (MedPLIB's tokens stay, as the reference's
    answer files show them). Negative placeholder ids are left out."""
    special = self.added.keep_space_ids
    texts, run = [], []
    for i in (int(i) for i in ids):
      if i < 0 or (skip_special_tokens and i in special):
        continue
      if i in self.added.token_of and i not in special:
        if run:
          texts.append(self._run_text(run))
          run = []
        texts.append(self.added.token_of[i])
      else:
        run.append(i)
    if run:
      texts.append(self._run_text(run))
    text = " ".join(texts)
    return self.hf.clean_up_tokenization(text) if self.hf.clean_up_tokenization_spaces else text

  def _run_text(self, ids: list[int]) -> str:
    # LlamaTokenizer.convert_tokens_to_string: `<s> </s> <unk>` inline, a space before one that
    # follows text, everything else through the base model's decoder.
    out, pieces, after_special = "", [], False
    for n, i in enumerate(ids):
      if i in self.added.keep_space_ids:
        if not after_special and n:
          out += " "
        out += self.chunks.decode(pieces) + self.added.token_of[i]
        pieces, after_special = [], True
      else:
        pieces.append(i)
        after_special = False
    return out + self.chunks.decode(pieces)

  def token_id(self, token: str) -> int:
    tid = self.hf.convert_tokens_to_ids(token)
    if tid is None or tid == self.unk_id and token != "<unk>":
      raise TokenizerError(f"token {token!r} is not in the vocabulary")
    return int(tid)


class AddedTokens:
  """Splits text at added tokens as transformers 4.31's slow tokenizer does (`tokenize`)."""

  def __init__(self, ids: dict[str, int], keep_space: set[str]):
    """ids: added token -> id; keep_space: those that leave the whitespace beside them."""
    self.ids = dict(ids)
    self.keep_space = frozenset(keep_space)
    self.token_of = {i: t for t, i in self.ids.items()}
    self.keep_space_ids = frozenset(self.ids[t] for t in self.keep_space if t in self.ids)
    # Longest first: at one position the longest token wins, as with 4.31's trie.
    self.pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(ids, key=len, reverse=True))
                              + ")")

  def split(self, text: str) -> list[tuple[str, int | None]]:
    """[(text, None) for a chunk to encode | (token, id) for an added token], empty chunks dropped."""
    parts = self.pattern.split(text)  # chunk, token, chunk, ..., chunk
    for i in range(1, len(parts), 2):
      if parts[i] not in self.keep_space:
        parts[i - 1] = parts[i - 1].rstrip()
        parts[i + 1] = parts[i + 1].lstrip()
    return [(p, self.ids[p] if i % 2 else None) for i, p in enumerate(parts) if p]


class ChunkEncoder:
  """Ids of one chunk of text (no added token in it) by the directory's base model."""

  def __init__(self, path: str):
    model_file, json_file = (os.path.join(path, f) for f in ("tokenizer.model", "tokenizer.json"))
    self.sentencepiece = self.model = None
    if os.path.isfile(model_file):  # the file the reference's slow LlamaTokenizer reads
      self.sentencepiece = sentencepiece.SentencePieceProcessor(model_file=model_file)
    elif os.path.isfile(json_file):
      self.model = Tokenizer.from_file(json_file)
    else:
      raise TokenizerError(f"tokenizer in {path!r} has neither tokenizer.model nor tokenizer.json")

  def encode(self, chunk: str) -> list[int]:
    if self.sentencepiece is not None:
      return self.sentencepiece.encode(chunk)
    return self.model.encode(chunk, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    """Text of base-vocabulary ids (the model's word-marker and byte-fallback decoding)."""
    if self.sentencepiece is not None:
      return self.sentencepiece.decode(ids)
    return self.model.decode(ids, skip_special_tokens=False)


def _structural_ids(hf) -> dict[str, int]:
  def tid(tok):
    i = hf.convert_tokens_to_ids(tok)
    if i is None or (i == hf.unk_token_id and tok != hf.unk_token):
      raise TokenizerError(f"token {tok!r} missing after adding MedPLIB's tokens")
    return int(i)
  return dict(seg_id=tid("<SEG>"), im_start_id=tid("<im_start>"), im_end_id=tid("<im_end>"),
              region_start_id=tid("<region>"), region_end_id=tid("</region>"),
              mask_start_id=tid("<mask>"), mask_end_id=tid("</mask>"))


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str) -> MedplibTokenizer:
  """Loads a tokenizer directory and adds MedPLIB's tokens (in SPEC order) after its base vocabulary.

  Tokens already present (a MedPLIB checkpoint's own tokenizer) keep their ids; a directory that
  has only some of them in a different order is rejected, since embedding rows would not match.
  """
  if not os.path.isdir(path):
    raise TokenizerError(f"tokenizer directory {path!r} does not exist")
  try:
    hf = transformers.AutoTokenizer.from_pretrained(path, padding_side="right", legacy=True)
  except (OSError, ValueError) as e:
    raise TokenizerError(f"cannot load a tokenizer from {path!r}: {e}") from e
  if hf.unk_token is None or hf.bos_token is None or hf.eos_token is None:
    raise TokenizerError(f"tokenizer in {path!r} lacks <unk>/<s>/</s> (not a LLaMA tokenizer)")
  present = [t for t in ADDED_TOKENS if t in hf.get_vocab()]
  if present and present != list(ADDED_TOKENS):
    raise TokenizerError(f"tokenizer in {path!r} has {len(present)} of MedPLIB's "
                         f"{len(ADDED_TOKENS)} added tokens; expected none or all")
  if not present:
    base = len(hf)
    hf.add_tokens(list(ADDED_TOKENS), special_tokens=True)
    first = hf.convert_tokens_to_ids(ADDED_TOKENS[0])
    if first != base:
      raise TokenizerError(f"added tokens start at id {first}, expected {base} in {path!r}")
  hf.pad_token = hf.unk_token
  hf.model_max_length = 1 << 30  # truncation is done by the template, with a counted warning
  ids = _structural_ids(hf)
  added = AddedTokens({str(t): int(i) for i, t in hf.added_tokens_decoder.items()},
                      keep_space={hf.bos_token, hf.eos_token, hf.unk_token})
  return MedplibTokenizer(hf=hf, pad_id=int(hf.unk_token_id), bos_id=int(hf.bos_token_id),
                          eos_id=int(hf.eos_token_id), unk_id=int(hf.unk_token_id),
                          chunks=ChunkEncoder(path), added=added, **ids)


def train_tokenizer(texts, out_dir: str, vocab_size: int = 1000) -> str:
  """Trains a LLaMA-style byte-fallback BPE on `texts` and saves it (HF format) in `out_dir`.

  The base vocabulary has exactly `vocab_size` ids: `<unk> <s> </s>`, the 256 byte tokens, then the
  learned pieces (single characters first, then merges in training order). Deterministic for a
  given text list. If the corpus is too small to learn that many pieces, the remaining ids are
  `<reserved_N>` tokens that never occur in tokenised text.
  """
  fixed = len(_SPECIALS) + len(_BYTE_TOKENS)
  learned = vocab_size - fixed
  if learned <= 0:
    raise TokenizerError(f"vocab_size {vocab_size} leaves no room beyond {fixed} fixed tokens")
  # MedPLIB's tokens are added after the base vocabulary, so they must not be learned as pieces;
  # the pieces are learned from the chunks `encode` hands the model: the text between those tokens
  # (and <image>, where the prompt is split), stripped, each starting a new word.
  marker = re.compile("|".join(re.escape(t) for t in (IMAGE_TOKEN,) + tuple(ADDED_TOKENS)))
  texts = [c.strip() for t in texts for c in marker.split(t) if c.strip()]
  # A few spare pieces in case a learned piece spells a byte token literally.
  trainer = trainers.BpeTrainer(vocab_size=len(_SPECIALS) + learned + 16, special_tokens=list(_SPECIALS),
                                limit_alphabet=min(200, learned), show_progress=False)
  draft = Tokenizer(models.BPE(unk_token="<unk>"))
  draft.pre_tokenizer = _word_marker()
  draft.train_from_iterator(texts, trainer)
  draft_vocab = draft.get_vocab()
  pieces = sorted((t for t in draft_vocab if t not in _SPECIALS), key=draft_vocab.get)
  vocab = {t: i for i, t in enumerate(_SPECIALS + _BYTE_TOKENS)}
  for t in pieces:
    if len(vocab) == vocab_size:
      break
    vocab.setdefault(t, len(vocab))
  # A small corpus can run out of merges before the size is reached: the rest are reserved ids
  # (never produced by the tokenizer), so the embedding size stays what the config says.
  while len(vocab) < vocab_size:
    vocab[f"<reserved_{len(vocab)}>"] = len(vocab)
  merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
            for m in _draft_merges(draft)]
  merges = [m for m in merges if m[0] + m[1] in vocab]

  return save_bpe_tokenizer(vocab, merges, out_dir)


def save_bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], out_dir: str) -> str:
  """Saves a byte-fallback BPE with LLaMA's conventions (BOS added, `▁` word marker) in HF format."""
  for i, t in enumerate(_SPECIALS):
    if vocab.get(t) != i:
      raise TokenizerError(f"{t} must have id {i}")
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                             fuse_unk=True))
  tok.pre_tokenizer = _word_marker()
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", 1)])
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                            unk_token="<unk>", clean_up_tokenization_spaces=False)
  os.makedirs(out_dir, exist_ok=True)
  hf.save_pretrained(out_dir)
  return out_dir


def _word_marker():
  # SentencePiece-like: `▁` before the text and for every space; pieces never cross a `▁`.
  # "always" adds the marker after every special token too (the legacy LLaMA behaviour).
  return pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)


def _draft_merges(draft):
  return json.loads(draft.to_str())["model"]["merges"]
