"""VQA answer metrics as used by MedPLIB (descended from LLaVA-Med's evaluation).

Every answer is lower-cased and normalised (punctuation, articles, number words -> digits,
contractions) before scoring. Closed (yes/no, multiple-choice) questions are scored by exact
match of the normalised strings; open questions by token precision / recall / F1, sentence BLEU
and "open accuracy" (the prediction is mapped to the closest candidate answer). Rates are x100.

Two modes:
* ``"reference"`` reproduces the reference scripts' numbers, quirks included (see
  docs/evaluation.md for the list).
* ``"correct"`` fixes what is wrong there. It is the default for new work; say which mode
  produced a number when reporting it.

Pure functions score one answer; `VqaAccumulator` collects a whole evaluation set, and
`evaluate_vqa` runs it over a list of records.
"""

import collections
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

MODES = ("reference", "correct")
OPEN_TYPES = ("open", "other", "number")
CLOSED_TYPES = ("yes/no", "closed")

# Punctuation handled by the VQA normaliser (':', "'", '%', '*', '#' ... are kept, as there).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_ARTICLES = frozenset(("a", "an", "the"))
# "none" counts as zero: a VQA convention both modes keep (counting questions answer "none").
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# A '.' not followed by a digit is dropped. The reference pattern reads "(?!<=\d)(\.)(?!\d)":
# its first group was meant as a look-behind but is a look-ahead for "<=", so this is what it does.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")
# The reference passes re.UNICODE (== 32) as `count` to re.sub: at most 32 periods go per pass.
_REFERENCE_PERIOD_LIMIT = int(re.UNICODE)

# Contracted forms the normaliser restores (the VQA evaluation's list). A form with one
# apostrophe is also matched without it; a form with several is matched with any single one
# missing ("couldnt've", "couldn'tve" -> "couldn't've").
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've "
    "it'll ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't "
    "'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll "
    "somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd "
    "where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've").split()


def _contraction_table(lowercase_keys: bool) -> dict[str, str]:
  table = {}
  for form in _CONTRACTED:
    positions = [i for i, ch in enumerate(form) if ch == "'"]
    if len(positions) == 1:
      keys = [form.replace("'", "")]
    else:
      keys = [form[:i] + form[i + 1:] for i in positions]
    for key in keys:
      table[key.lower() if lowercase_keys else key] = form.lower() if lowercase_keys else form
  return table


# Reference table: keys like "Im" keep their capital and can never match a lower-cased word, and
# "somebody'd" is listed the wrong way round (it turns into "somebodyd").
_REFERENCE_CONTRACTIONS = {**_contraction_table(lowercase_keys=False), "somebody'd": "somebodyd"}
_CORRECT_CONTRACTIONS = {**_contraction_table(lowercase_keys=True), "somebodyd": "somebody'd"}


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"unknown metric mode {mode!r}; use one of {MODES}")


def _reference_normalize(text: str) -> str:
  """One pass of the reference `normalize_word`."""
  out = text
  # When the text holds a digit-comma-digit anywhere, *every* punctuation mark is deleted.
  strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  for p in _PUNCTUATION:
    if p + " " in text or " " + p in text or strip_all:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  out = _PERIOD.sub("", out, count=_REFERENCE_PERIOD_LIMIT)
  words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
  words = [_REFERENCE_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
  return " ".join(words).replace(",", "")


def _correct_normalize(text: str) -> str:
  out = _THOUSANDS_COMMA.sub("", text.lower())
  for p in _PUNCTUATION:
    out = out.replace(p, " ")
  out = _PERIOD.sub("", out)
  words = [_NUMBER_WORDS.get(w, w) for w in out.split()]
  return " ".join(_CORRECT_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text, mode: str = "correct", passes: int = 1) -> str:
  """Lower-cases and normalises an answer.

  `passes` > 1 repeats the reference normaliser, as the reference scripts do (their per-pass
  period limit makes repeated passes differ on long answers); the correct normaliser is
  idempotent, so passes are ignored there.
  """
  _check_mode(mode)
  text = str(text).lower()
  if mode == "correct":
    return _correct_normalize(text)
  for _ in range(passes):
    text = _reference_normalize(text)
  return text


def closed_match(prediction: str, answer: str, mode: str = "correct") -> float:
  """1.0 when the normalised prediction equals the normalised answer, else 0.0."""
  return float(normalize_answer(prediction, mode) == normalize_answer(answer, mode))


def token_scores(prediction: str, answer: str, mode: str = "correct") -> dict[str, float]:
  """Token-level scores of one open answer, as fractions: exact_match, precision, recall, f1.

  reference: `exact_match` is the reference "exact match" score = (number of *distinct* answer
    tokens found in the prediction) / (number of prediction tokens); precision = prediction
    tokens whose word occurs in the answer / prediction tokens; recall = the same matched count
    (prediction multiplicities) / (itself + answer tokens whose word is not predicted), which
    mixes prediction and answer counts; all three are 0 when nothing matches.
  correct: `exact_match` = normalised strings equal; precision / recall / F1 from clipped
    token counts (sum over words of min(count in prediction, count in answer)) over the
    prediction / answer length.
  """
  _check_mode(mode)
  passes = 2  # the reference normalises in the caller and again inside each metric
  pred_words = normalize_answer(prediction, mode, passes).split()
  ans_words = normalize_answer(answer, mode, passes).split()
  pred_counts, ans_counts = collections.Counter(pred_words), collections.Counter(ans_words)
  if mode == "reference":
    found = sum(1 for w in ans_counts if w in pred_counts)
    exact = found / len(pred_words) if pred_words else 0.0
    tp = sum(c for w, c in pred_counts.items() if w in ans_counts)
    fp = sum(c for w, c in pred_counts.items() if w not in ans_counts)
    fn = sum(c for w, c in ans_counts.items() if w not in pred_counts)
    if not pred_words or not ans_words or tp == 0:
      return {"exact_match": exact, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    precision, recall = tp / (tp + fp), tp / (tp + fn)
  else:
    exact = float(pred_words == ans_words)
    overlap = sum((pred_counts & ans_counts).values())
    if overlap == 0:
      return {"exact_match": exact, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    precision, recall = overlap / len(pred_words), overlap / len(ans_words)
  return {"exact_match": exact, "precision": precision, "recall": recall,
          "f1": 2 * precision * recall / (precision + recall)}


def _ngram_counts(words: Sequence[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def sentence_bleu(references: Sequence[Sequence[str]], hypothesis: Sequence[str],
                  weights: Sequence[float] = (0.25, 0.25, 0.25, 0.25),
                  mode: str = "reference") -> float:
  """Sentence BLEU without smoothing, as a fraction.

  reference: NLTK's `sentence_bleu` -- 0 when no unigram matches; an order with no matching
    n-gram enters the geometric mean as `sys.float_info.min` (so the score is ~1e-77 rather
    than 0 when its weight is non-zero, and is unaffected when its weight is 0).
  correct: an order with non-zero weight and no match makes the score exactly 0.
  Both: modified (clipped) n-gram precision with the maximum count over references, denominator
  at least 1, brevity penalty against the closest reference length (ties -> the shorter).
  """
  _check_mode(mode)
  hypothesis = list(hypothesis)
  numerators, denominators = [], []
  for n in range(1, len(weights) + 1):
    hyp_counts = _ngram_counts(hypothesis, n)
    max_ref = collections.Counter()
    for ref in references:
      max_ref |= _ngram_counts(list(ref), n)
    numerators.append(sum(min(c, max_ref[g]) for g, c in hyp_counts.items()))
    denominators.append(max(1, sum(hyp_counts.values())))
  if not numerators or numerators[0] == 0:
    return 0.0
  hyp_len = len(hypothesis)
  ref_len = min((len(r) for r in references), key=lambda r: (abs(r - hyp_len), r))
  brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
  log_terms = []
  for w, num, den in zip(weights, numerators, denominators):
    if num == 0:
      if mode == "correct":
        if w:
          return 0.0
        continue
      log_terms.append(w * math.log(sys.float_info.min))
    else:
      log_terms.append(w * math.log(num / den))
  return brevity * math.exp(math.fsum(log_terms))


# (name, weights) reported per mode: the reference reports NLTK's default BLEU plus the
# *individual* 1-, 2- and 3-gram scores; correct mode reports cumulative BLEU-1..4.
BLEU_WEIGHTS = {
    "reference": (("bleu", (0.25, 0.25, 0.25, 0.25)), ("bleu_1", (1, 0, 0, 0)),
                  ("bleu_2", (0, 1, 0, 0)), ("bleu_3", (0, 0, 1, 0))),
    "correct": (("bleu_1", (1.0,)), ("bleu_2", (0.5, 0.5)), ("bleu_3", (1 / 3,) * 3),
                ("bleu_4", (0.25,) * 4), ("bleu", (0.25,) * 4)),
}


def bleu_scores(prediction: str, answer: str, mode: str = "correct") -> dict[str, float]:
  """The BLEU family of one open answer (fractions), on normalised whitespace tokens."""
  _check_mode(mode)
  hyp = normalize_answer(prediction, mode).split()
  ref = normalize_answer(answer, mode).split()
  return {name: sentence_bleu([ref], hyp, w, mode) for name, w in BLEU_WEIGHTS[mode]}


def _candidate_similarity(pred_words: set, cand_words: set, mode: str) -> float:
  if not cand_words:
    return 0.0
  found = len(pred_words & cand_words)
  if mode == "reference":
    return found / len(cand_words)
  if found == 0:
    return 0.0
  precision, recall = found / len(pred_words), found / len(cand_words)
  return 2 * precision * recall / (precision + recall)


def open_accuracy(prediction: str, answer: str, candidates: Iterable[str],
                  mode: str = "correct") -> float:
  """1.0 when the prediction is the answer or maps onto it among the candidate answers.

  reference: the closest candidate is the one with the largest fraction of its distinct words
    found in the prediction; ties go to the first candidate (the reference iterates a Python set,
    so its tie-break changes with the hash seed; this fixes it to the candidates' order) -- even
    when no candidate shares a word with the prediction.
  correct: closeness is the F1 of distinct words, and a hit needs the answer to be the only
    closest candidate, with some word in common (an order-independent result).
  """
  _check_mode(mode)
  pred = normalize_answer(prediction, mode, passes=2)
  ans = normalize_answer(answer, mode, passes=2)
  if pred == ans:
    return 1.0
  pred_words = set(pred.split())
  normalized = [normalize_answer(c, mode) for c in candidates]
  if not normalized:
    return 0.0
  sims = [_candidate_similarity(pred_words, set(c.split()), mode) for c in normalized]
  best = max(sims)
  if mode == "reference":
    return float(normalized[sims.index(best)] == ans)
  tied = {c for c, s in zip(normalized, sims) if s == best}
  return float(best > 0 and tied == {ans})


class VqaAccumulator:
  """Collects VQA answers and reports the reference script's table (rates x100).

  add(prediction, answer, answer_type, modality=None): `answer_type` is one of OPEN_TYPES or
  CLOSED_TYPES (case-insensitive). Any other type, the empty one included, is skipped in
  reference mode, as the reference script does (counted in `num_skipped`); correct mode scores
  an empty type as closed when the answer is yes / no and as open otherwise (counted in
  `num_inferred_type`), and skips only unknown non-empty types. `modality` (e.g. OmniMedVQA's
  modality_type) enables the per-modality closed accuracy and its macro mean.

  Open accuracy needs the candidate answers: by default, as in the reference, every answer
  added (open and closed alike, in order of first appearance); pass `candidates` to override.
  """

  def __init__(self, mode: str = "correct", candidates: Iterable[str] | None = None):
    _check_mode(mode)
    self.mode = mode
    self._candidates = list(dict.fromkeys(candidates)) if candidates is not None else None
    self._open: list[tuple[str, str]] = []
    self._closed: list[float] = []
    self._closed_by_modality: dict[str, list[float]] = collections.defaultdict(list)
    self._answers: dict[str, None] = {}
    self.num_skipped = 0
    self.num_inferred_type = 0

  def add(self, prediction: str, answer: str, answer_type: str, modality: str | None = None):
    self._answers.setdefault(str(answer), None)
    kind = str(answer_type or "").strip().lower()
    if not kind and self.mode == "correct":
      kind = "closed" if normalize_answer(answer, self.mode) in ("yes", "no") else "open"
      self.num_inferred_type += 1
    if kind in OPEN_TYPES:
      self._open.append((str(prediction), str(answer)))
    elif kind in CLOSED_TYPES:
      hit = closed_match(prediction, answer, self.mode)
      self._closed.append(hit)
      if modality is not None:
        self._closed_by_modality[str(modality)].append(hit)
    else:
      self.num_skipped += 1

  def result(self) -> dict:
    empty = 0.0 if self.mode == "reference" else None  # correct mode: no questions -> no number
    candidates = self._candidates if self._candidates is not None else list(self._answers)
    per_item = collections.defaultdict(list)
    for pred, ans in self._open:
      for k, v in token_scores(pred, ans, self.mode).items():
        per_item[k].append(v)
      for k, v in bleu_scores(pred, ans, self.mode).items():
        per_item[k].append(v)
      per_item["open_accuracy"].append(open_accuracy(pred, ans, candidates, self.mode))
    names = ["exact_match", "precision", "recall", "f1"] + [n for n, _ in BLEU_WEIGHTS[self.mode]]
    out = {"mode": self.mode}
    for name in names + ["open_accuracy"]:
      values = per_item[name]
      out[name] = 100.0 * sum(values) / len(values) if values else empty
    out["closed_accuracy"] = 100.0 * sum(self._closed) / len(self._closed) if self._closed else empty
    if self._closed_by_modality:
      by_mod = {m: 100.0 * sum(v) / len(v) for m, v in sorted(self._closed_by_modality.items())}
      out["closed_accuracy_by_modality"] = by_mod
      out["closed_accuracy_macro"] = sum(by_mod.values()) / len(by_mod)
    out.update(num_open=len(self._open), num_closed=len(self._closed), num_skipped=self.num_skipped,
               num_inferred_type=self.num_inferred_type)
    return out


def evaluate_vqa(records: Iterable[Mapping], mode: str = "correct",
                 candidates: Iterable[str] | None = None) -> dict:
  """Scores answer records as written by the reference (`text`, `gt`, `answer_type`, optional
  `modality`); see `VqaAccumulator` for the returned keys."""
  acc = VqaAccumulator(mode, candidates)
  for i, rec in enumerate(records):
    missing = [k for k in ("text", "gt", "answer_type") if k not in rec]
    if missing:
      raise ValueError(f"answer record {i} lacks {missing}; it needs text, gt and answer_type")
    acc.add(rec["text"], rec["gt"], rec["answer_type"], rec.get("modality"))
  return acc.result()
