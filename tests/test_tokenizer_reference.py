"""Token ids from text equal the original MedPLIB's (issue #17), on ids recorded from its code.

tests/fixtures/tokenizer/ (written by tests/reference/make_tokenizer_fixture.py, see
tests/reference/README.md) holds a tiny LLaMA-like sentencepiece model as a base LLaMA directory
(llama/, MedPLIB's tokens added by `load_tokenizer`) and as a MedPLIB checkpoint saves it (medplib/,
tokens already there), a byte-fallback BPE of the kind `train_tokenizer` writes (bpe/), and in
reference.json the ids that transformers 4.31's slow LlamaTokenizer, built as train_ds_medplib.py
builds it, gives for every string, plus the reference's own prompts, ids and labels for
conversations (its conversation.py, preprocess_multimodal, preprocess_v1, tokenizer_image_token).
"""

import json
import os

import pytest

from medplib_jax.data import template as T
from medplib_jax.data.tokenizer import ADDED_TOKENS, load_tokenizer

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tokenizer")
DIRS = {"llama": "sentencepiece", "medplib": "sentencepiece", "bpe": "bpe"}


@pytest.fixture(scope="module")
def reference():
  with open(os.path.join(FIXTURE, "reference.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module", params=sorted(DIRS))
def tokenizer(request):
  """(directory name, reference kind, loaded tokenizer)."""
  return request.param, DIRS[request.param], load_tokenizer(os.path.join(FIXTURE, request.param))


def _mismatches(tok, texts, got, want):
  bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
  return [f"{t!r}: ours {tok.hf.convert_ids_to_tokens([i for i in g if i >= 0])} "
          f"reference {tok.hf.convert_ids_to_tokens([i for i in w if i >= 0])}" for t, g, w in bad[:5]]


def test_fixture_covers_the_issue(reference):
  texts = reference["strings"]
  assert len(texts) >= 150 and "" in texts
  assert all(any(t in s for s in texts) for t in ADDED_TOKENS)
  assert reference["versions"]["transformers"] == "4.31.0"


def test_added_token_ids(tokenizer):
  _, kind, tok = tokenizer
  base = {"sentencepiece": 700, "bpe": 600}[kind]
  assert len(tok) == base + len(ADDED_TOKENS)
  assert [tok.token_id(t) for t in ADDED_TOKENS] == list(range(base, len(tok)))
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 0, 1, 2)


def test_ids_equal_the_reference(tokenizer, reference):
  _, kind, tok = tokenizer
  texts = reference["strings"]
  got = [tok.encode(s) for s in texts]
  want = reference["ids"][kind]
  assert got == want, _mismatches(tok, texts, got, want)


def test_image_token_ids_equal_the_reference(tokenizer, reference):
  """The reference's tokenizer_image_token: -200 for <image>, -300 inside <region></region>."""
  _, kind, tok = tokenizer
  texts = reference["strings"]
  got = [T.tokenizer_image_token(s, tok) for s in texts]
  want = reference["image_ids"][kind]
  assert got == want, _mismatches(tok, texts, got, want)


def test_conversations_equal_the_reference(tokenizer, reference):
  """Prompt, ids and labels of preprocess_v1, and vqa_infer.py's prompt (cut after the last ':')."""
  _, kind, tok = tokenizer
  records = [r for r in reference["conversations"] if r["tokenizer"] == kind]
  assert len(records) == 20
  for r in records:
    out = T.tokenize_conversation(r["conversations"], tok, r["template"])
    assert out.prompt == r["prompt"]
    assert out.input_ids == r["input_ids"], _mismatches(tok, [r["prompt"]], [out.input_ids],
                                                        [r["input_ids"]])
    assert out.labels == r["labels"], r["prompt"]
    prompt = T.generation_prompt(r["conversations"], r["template"])
    assert T.tokenizer_image_token(prompt, tok) == r["generation_ids"], prompt


@pytest.mark.parametrize("name", ["llama", "medplib"])  # the decodes were recorded with these
@pytest.mark.parametrize("skip", [False, True], ids=["keep_special", "skip_special"])
def test_decoded_text_equals_the_reference(reference, name, skip):
  """The reference's slow decode (what its answer files hold: skip_special_tokens=True): MedPLIB's
  tokens joined with spaces and kept when special tokens are skipped; only <s> </s> <unk> go."""
  tok = load_tokenizer(os.path.join(FIXTURE, name))
  want = reference["decode"]["skip_special" if skip else "keep_special"]
  got = [tok.decode(ids, skip_special_tokens=skip) for ids in reference["ids"][DIRS[name]]]
  bad = [(s, g, w) for s, g, w in zip(reference["strings"], got, want) if g != w]
  assert not bad, f"{len(bad)} of {len(want)} differ, e.g. {bad[:3]}"
