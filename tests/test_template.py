"""Templates and label masking on hand-worked examples (tokens and labels listed by hand).

The tokenizer here is a hand-made word-level BPE in LLaMA's conventions (BOS added, `▁` word
marker, byte fallback), split as the reference's slow tokenizer splits (the whitespace beside
MedPLIB's tokens stripped, each chunk with its word marker), so every expected token is readable.
The expected labels are worked out by hand from the reference's rules (LLaVA preprocess_v1):
only the assistant answers and their `</s>` are supervised.
"""

import pytest

from medplib_jax.data.tokenizer import ADDED_TOKENS
from medplib_jax.data import template as T
from medplib_jax.data.tokenizer import (IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX, load_tokenizer,
                                        save_bpe_tokenizer, train_tokenizer)

IGN = -100
SYSTEM_WORDS = ("▁A ▁chat ▁between ▁a ▁curious ▁human ▁and ▁an ▁artificial ▁intelligence "
                "▁assistant. ▁The ▁assistant ▁gives ▁helpful, ▁detailed, ▁and ▁polite ▁answers "
                "▁to ▁the ▁human's ▁questions.").split()
WORDS = SYSTEM_WORDS + ["▁USER:", "▁ASSISTANT:", "▁Is", "▁there", "▁lesion?", "▁Yes", "▁Where?",
                        "▁Liver.", "▁What", "▁is", "▁this?", "▁Segment", "▁liver.", "▁Sure,",
                        "▁A", "▁CT", "▁scan.", "▁user", "▁user's"]


def _word_tokenizer(out_dir):
  """Word-level BPE: every word in WORDS is one token, built by left-to-right merges."""
  vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)])}
  merges = []
  for word in WORDS:
    for ch in word:
      vocab.setdefault(ch, len(vocab))
    cur = word[0]
    for ch in word[1:]:
      if cur + ch not in vocab:
        merges.append((cur, ch))
        vocab[cur + ch] = len(vocab)
      cur += ch
  return save_bpe_tokenizer(vocab, merges, str(out_dir))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return load_tokenizer(_word_tokenizer(tmp_path_factory.mktemp("wordtok")))


def _pieces(tok, ids):
  names = {IMAGE_TOKEN_INDEX: "<IMAGE>", REGION_TOKEN_INDEX: "<REGION>"}
  return [names.get(i) or tok.hf.convert_ids_to_tokens(i) for i in ids]


def test_added_tokens_in_spec_order_and_pad_is_unk(tok):
  base = len(tok) - len(ADDED_TOKENS)
  assert [tok.hf.convert_tokens_to_ids(t) for t in ADDED_TOKENS] == list(range(base, len(tok)))
  assert tok.seg_id == base and tok.im_start_id == len(tok) - 2 and tok.im_end_id == len(tok) - 1
  assert tok.region_start_id == base + 3 and tok.region_end_id == base + 4
  assert tok.pad_id == tok.unk_id == 0 and tok.bos_id == 1 and tok.eos_id == 2


def test_llava_v1_two_rounds_with_image(tok):
  conv = [{"from": "human", "value": "Is there a lesion?\n<image>"},
          {"from": "gpt", "value": "Yes"},
          {"from": "human", "value": "Where?"},
          {"from": "gpt", "value": "Liver."}]
  out = T.tokenize_conversation(conv, tok, "llava_v1")
  assert out.prompt == (
      "A chat between a curious human and an artificial intelligence assistant. The assistant "
      "gives helpful, detailed, and polite answers to the human's questions. USER: <im_start>"
      "<image><im_end>\nIs there a lesion? ASSISTANT: Yes</s>USER: Where? ASSISTANT: Liver.</s>")
  # No `▁` before <im_start>; the newline after <im_end> is stripped, "Is" starts a new chunk.
  expected = (["<s>"] + SYSTEM_WORDS + ["▁USER:", "<im_start>", "<IMAGE>", "<im_end>", "▁Is",
                                        "▁there", "▁a", "▁lesion?", "▁ASSISTANT:", "▁Yes", "</s>",
                                        "▁USER:", "▁Where?", "▁ASSISTANT:", "▁Liver.", "</s>"])
  assert _pieces(tok, out.input_ids) == expected
  supervised = {expected.index("▁Yes"), expected.index("▁Yes") + 1,
                len(expected) - 2, len(expected) - 1}
  want = [out.input_ids[i] if i in supervised else IGN for i in range(len(expected))]
  assert out.labels == want
  assert _pieces(tok, [t for t in out.labels if t != IGN]) == ["▁Yes", "</s>", "▁Liver.", "</s>"]
  assert not out.mismatch


def test_region_placeholder_between_tags(tok):
  conv = [{"from": "human", "value": "<image>\nWhat is <region></region> this?"},
          {"from": "gpt", "value": "Liver."}]
  out = T.tokenize_conversation(conv, tok, "llava_v1")
  p = _pieces(tok, out.input_ids)
  i = p.index("<region>")
  assert p[i:i + 3] == ["<region>", "<REGION>", "</region>"]
  assert p[i - 1:] == ["▁is", "<region>", "<REGION>", "</region>", "▁this?", "▁ASSISTANT:",
                       "▁Liver.", "</s>"]
  assert _pieces(tok, [t for t in out.labels if t != IGN]) == ["▁Liver.", "</s>"]


def test_grounding_answer_supervises_seg(tok):
  conv = [{"from": "human", "value": "<image>\nSegment the liver."},
          {"from": "gpt", "value": "Sure, <SEG>"}]
  out = T.tokenize_conversation(conv, tok, "llava_v1")
  # The space before <SEG> is stripped (the reference's `▁Sure, <SEG>`, not `▁Sure, ▁ <SEG>`).
  assert _pieces(tok, out.input_ids)[-4:] == ["▁ASSISTANT:", "▁Sure,", "<SEG>", "</s>"]
  assert _pieces(tok, [t for t in out.labels if t != IGN]) == ["▁Sure,", "<SEG>", "</s>"]


def test_plain_template_supervises_caption_and_newline(tok):
  conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A CT scan."}]
  out = T.tokenize_conversation(conv, tok, "plain")
  assert out.prompt == "<image>A CT scan.\n"
  assert _pieces(tok, out.input_ids) == ["<s>", "<IMAGE>", "▁A", "▁CT", "▁scan.", "<0x0A>"]
  assert out.labels[:2] == [IGN, IGN] and out.labels[2:] == out.input_ids[2:]


def test_vicuna_generation_prompt_ends_after_assistant(tok):
  conv = [{"from": "human", "value": "<image>\nIs there a lesion?"}, {"from": "gpt", "value": "Yes"}]
  prompt = T.generation_prompt(conv, "vicuna_v1")
  assert prompt.startswith("A chat between a curious user and")
  assert prompt.endswith("the user's questions. USER: <im_start><image><im_end>\nIs there a lesion? ASSISTANT:")
  assert T.generation_prompt(conv, "llava_v1").endswith("lesion? ASSISTANT:")


@pytest.mark.parametrize("conv,msg", [
    ([{"from": "human", "value": "Is there a lesion?"}], "no assistant"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "expected a 'gpt'"),
    ([{"from": "doctor", "value": "a"}, {"from": "gpt", "value": "b"}], "expected a 'human'"),
])
def test_bad_conversations(tok, conv, msg):
  with pytest.raises(T.ConversationError, match=msg):
    T.tokenize_conversation(conv, tok, "llava_v1")


def test_trained_tokenizer_has_exact_base_vocab(tmp_path):
  texts = [f"USER: Is there a lesion in image {i}? ASSISTANT: Yes, in the liver segment {i % 17}."
           for i in range(400)] + ["".join(chr(97 + (i * 7 + j) % 26) for j in range(12)) for i in range(600)]
  t = load_tokenizer(train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=1000))
  assert len(t) == 1000 + len(ADDED_TOKENS) and t.seg_id == 1000
  assert t.hf.convert_ids_to_tokens(999) == "<reserved_999>"  # this small corpus runs out of merges
  text = "Is there a lesion? é ü 肝"
  assert t.decode(t.encode(text), skip_special_tokens=True) == text
