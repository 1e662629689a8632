"""Writes tests/fixtures/tokenizer/: the original MedPLIB's token ids for fixed strings (issue #17).

Not run by `make test`; README.md beside this file says how to regenerate. Two steps, each in its
own environment:

  bpe        (our .venv)  trains the byte-fallback BPE of the kind `train_tokenizer` writes for the
                          demo, on CORPUS -> bpe/
  reference  (side venv: python 3.11, transformers 4.31.0, tokenizers 0.13.3, sentencepiece 0.1.99,
             torch) trains a tiny LLaMA-like sentencepiece model on CORPUS, builds the tokenizer
             exactly as the reference's train_ds_medplib.py does (slow LlamaTokenizer, legacy, pad =
             unk, the added tokens one `add_tokens(..., special_tokens=True)` call each, then
             <im_start> <im_end>), saves it as a checkpoint would (medplib/), reloads that as
             vqa_infer.py does, and records the ids of STRINGS and of conversations laid out by the
             reference's own conversation.py / preprocess_multimodal / preprocess_v1 /
             tokenizer_image_token, read from the MedPLIB checkout passed as --medplib.

The BPE has no sentencepiece model, so transformers 4.31's LlamaTokenizer cannot load it; its
"reference behaviour" is 4.31's own slow-tokenizer splitting (`PreTrainedTokenizer.tokenize`: split
at added tokens, strip the whitespace beside MedPLIB's tokens, keep it beside <s> </s> <unk>) with
each chunk encoded by that BPE (tokenizers 0.13.3, `▁` prefix per chunk), see `_bpe_reference`.

The two steps run in different environments, so each imports its third-party packages itself.
"""

import argparse
import ast
import copy
import importlib.util
import io
import itertools
import json
import os
import types

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "fixtures", "tokenizer")
SPM_VOCAB = 700
BPE_VOCAB = 600

# MedPLIB's added tokens in the order train_ds_medplib.py adds them (utils/utils.py
# ADD_OTHERS_TOKENS, then <gen_1>..<gen_256>, then <im_start> <im_end> for use_mm_start_end).
MEDPLIB_TOKENS = (["<SEG>", "<ref>", "</ref>", "<region>", "</region>", "<sr>", "</sr>", "<mask>",
                   "</mask>"] + [f"<gen_{i}>" for i in range(1, 257)])
IM_TOKENS = ["<im_start>", "<im_end>"]

_ORGANS = ["liver", "left kidney", "right kidney", "spleen", "pancreas", "heart", "lung", "brain",
           "aorta", "gallbladder", "stomach", "bladder", "prostate", "femur", "vertebra", "thyroid"]
_MODALITIES = ["CT", "MRI", "X-ray", "ultrasound", "PET", "dermoscopy", "endoscopy",
               "fundus photograph", "histopathology slide"]
_QUESTIONS = ["What modality is used to take this image?", "Is there an abnormality in the {o}?",
              "Where is the {o} located in this {m} image?", "Please segment the {o} in this {m} scan.",
              "Can you identify the {o}?", "Is the {o} enlarged? Answer yes or no.",
              "How many lesions are visible in the {o}?", "Describe the region in detail.",
              "What organ is shown in the highlighted region?", "Segment the tumour of the {o}, please."]
_ANSWERS = ["The image is a {m} scan.", "Yes, there is a lesion in the {o}.", "No.", "Yes.",
            "It is {o}.", "Sure, it is the {o}.", "The {o} appears normal, measuring 12.5 cm.",
            "There are 3 lesions, the largest 2.4 cm in diameter.",
            "The region shows the {o} with mild enhancement."]
_PROSE = [
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "USER: What is shown in this image? ASSISTANT: An axial CT of the abdomen.",
    "The examination reveals a hypodense lesion in segment VII of the liver, about 3 x 4 cm.",
    "No pneumothorax, no pleural effusion; the cardiomediastinal silhouette is within normal limits.",
    "Findings: multiple enhancing nodules (0.5-1.2 cm) with surrounding oedema, likely metastases.",
    "Impression: acute appendicitis with a 9 mm appendix and periappendiceal fat stranding.",
    "The T2-weighted MRI shows a hyperintense mass in the right frontal lobe.",
    "Le patient présente une lésion hépatique. Der Befund zeigt eine Größenzunahme der Milz.",
    "Ménétrier disease; Sjögren syndrome; naïve café; façade; Ångström; Dvořák.",
    "肝脏 肾脏 病变 影像 检查 诊断",
    "Blood pressure 120/80 mmHg, heart rate 72 bpm, temperature 36.8 degrees, SpO2 98%.",
    "Is the lesion benign or malignant? It is most likely benign.",
    "Which side is affected, left or right? The left side.",
]


def corpus() -> list[str]:
  """The training text of both tiny tokenizers: medical questions and answers, fixed order."""
  lines = []
  for i, (o, m) in enumerate(itertools.product(_ORGANS, _MODALITIES)):
    lines.append(_QUESTIONS[i % len(_QUESTIONS)].format(o=o, m=m) + " "
                 + _ANSWERS[i % len(_ANSWERS)].format(o=o, m=m))
  return lines + _PROSE * 4


# ---- the strings whose ids are recorded --------------------------------------------------------

_CONTEXTS = ["{t}", " {t}", "{t} ", " {t} ", "  {t}  ", "a{t}b", "word {t} word", "is {t}.",
             "x\n{t}\ny", "\n{t}\n", "x\t{t}\ty", "\t {t} \n", "1{t}2", "3 {t} 4", "({t})", "{t},{t}",
             "{t}{t}", "{t} {t}", "{t}\n\n{t}", "Sure, {t}. Done", ": {t}", "{t}\nPlease", "é{t}ü",
             "{t}</s>", "</s>{t}", "<s> {t} </s>"]
_STRUCTURAL = ["<SEG>", "<ref>", "</ref>", "<region>", "</region>", "<sr>", "</sr>", "<mask>",
               "</mask>", "<gen_1>", "<gen_2>", "<gen_10>", "<gen_100>", "<gen_256>"] + IM_TOKENS


def strings() -> list[str]:
  """Every added token in every context, then tags, unicode, whitespace and prose."""
  out = []
  for t in _STRUCTURAL:
    out += [c.format(t=t) for c in _CONTEXTS]
  for t in MEDPLIB_TOKENS + IM_TOKENS:  # each added token once more: all the contexts in one text
    out.append(f"{t} a{t}b 1{t}2 ({t}). \n{t}\n\t{t}\t{t}{t} end {t}")
  out += [
      "", " ", "  ", "\n", "\t", " \n \t ", "a", " a", "a ", "  a  b  ", "\na\n", "a\r\nb",
      "<s>", "</s>", "<unk>", " <s> ", " </s> ", "a </s> b", "a</s>b", "x </s> USER", "a <unk> b",
      "<image>", "<im_start><image><im_end>", "<im_start><image><im_end>\nWhat is this?",
      "<image>\nWhat is this?", "What is this? <image>", "<image><image>", "a <image> b <image> c",
      "<region></region>", "Describe <region></region> please.", "<region> </region>",
      "<region>\n</region>", "<region>x</region>", "<region></region><region></region>",
      "What is in <region></region> and <region></region>?", "<region></region>.",
      "<mask>masks/liver_001.png</mask>", "Sure, <SEG>.<mask>a/b.png</mask>", "<mask></mask>",
      "Sure, it is <SEG>.", "Sure, the liver is <SEG> and the spleen is <SEG>.", "<SEG><SEG><SEG>",
      "<ref>liver</ref> <SEG>", "<sr>region</sr>", "<gen_1><gen_2><gen_3> <gen_4>\n<gen_5>",
      "<gen_0>", "<gen_257>", "<gen_1000>", "<gen_01>", "<GEN_1>", "<seg>", "< SEG>", "<SEG",
      "SEG>", "<<SEG>>", "<</s>>", "</ref</ref>", "<region<region>>", "<im_start", "im_end>",
      "café", "Größe", "naïve", "Ångström", "肝脏病变", "肝脏 <SEG> 病变", "emoji 😀 test",
      "🫀🫁🧠", "a😀<SEG>😀b", "\u00a0a\u00a0", "\u3000<SEG>\u3000", "a\u2028<SEG>\u2029b",
      "\u200b<SEG>", "x\u00a0<SEG>", "Ω≈ç√∫", "100%", "12.5 cm", "2024-01-31", "3x4", "  12  ",
      "Is the liver   enlarged?", "Yes.\n\nNo.", "tab\tseparated\tvalues", "trailing spaces   ",
      "   leading spaces", "The ▁ marker", "▁<SEG>▁", "ASSISTANT:", "ASSISTANT: ", "USER: hi",
  ]
  return out


# Conversations as MeCoVQA records hold them, after `<mask>path</mask>` is cut and `<region>path
# </region>` emptied (extract_masks_fun).
CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nWhat modality is used to take this image?"},
     {"from": "gpt", "value": "The image is a CT scan."}],
    [{"from": "human", "value": "What modality is this? <image>"},
     {"from": "gpt", "value": "MRI."}],
    [{"from": "human", "value": "<image>\nPlease segment the liver."},
     {"from": "gpt", "value": "Sure, it is <SEG>."}],
    [{"from": "human", "value": "<image>\nSegment the left kidney and the spleen."},
     {"from": "gpt", "value": "The left kidney is <SEG> and the spleen is <SEG>."}],
    [{"from": "human", "value": "<image>\nWhat organ is in <region></region>?"},
     {"from": "gpt", "value": "It is the pancreas."}],
    [{"from": "human", "value": "<image>\nIs there an abnormality in the liver?"},
     {"from": "gpt", "value": "Yes, there is a lesion."},
     {"from": "human", "value": "Where is it?"},
     {"from": "gpt", "value": "In segment VII, about 3 x 4 cm."},
     {"from": "human", "value": "Please segment it."},
     {"from": "gpt", "value": "<SEG>"}],
    [{"from": "human", "value": "<image>\nDescribe <region></region> and <region></region>."},
     {"from": "gpt", "value": "The first is the aorta.\nThe second is the heart."},
     {"from": "human", "value": "Which one is larger?"},
     {"from": "gpt", "value": "The heart."}],
    [{"from": "gpt", "value": "A leading non-human turn the reference drops."},
     {"from": "human", "value": "<image>\n  Is the spleen enlarged?  "},
     {"from": "gpt", "value": " Yes. "}],
    [{"from": "human", "value": "<image>\nGrößenzunahme der Milz? 肝脏?"},
     {"from": "gpt", "value": "Ja 😀, <SEG>."}],
    [{"from": "human", "value": "What is the normal heart rate?"},
     {"from": "gpt", "value": "60 to 100 bpm."}],
]
TEMPLATES = ["llava_v1", "vicuna_v1"]


# ---- step 1: the BPE (our .venv) ---------------------------------------------------------------

def make_bpe(out: str) -> None:
  from medplib_jax.data.tokenizer import train_tokenizer
  train_tokenizer(corpus(), os.path.join(out, "bpe"), vocab_size=BPE_VOCAB)


# ---- step 2: the reference (side venv) ---------------------------------------------------------

def _load_file(name: str, path: str):
  """Imports one file of the MedPLIB checkout by path (its package __init__ would pull the model)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _reference_dataset_functions(medplib: str):
  """preprocess_multimodal, preprocess_v1, tokenizer_image_token of datasets/LazySupervisedDataset.py.

  Only these three definitions are executed (their source, as the file has it), in a namespace with
  the names they use: the module's other imports (torchvision, cv2, SAM, the model package) are
  irrelevant to tokenisation and do not import on this CPU-only side venv.
  """
  import torch
  import transformers
  utils = _load_file("medplib_utils", os.path.join(medplib, "utils", "utils.py"))
  conversation = _load_file("medplib_conversation",
                            os.path.join(medplib, "model", "medplib", "conversation.py"))
  path = os.path.join(medplib, "datasets", "LazySupervisedDataset.py")
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  wanted = {"preprocess_multimodal", "preprocess_v1", "tokenizer_image_token"}
  tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
  assert {n.name for n in tree.body} == wanted, "MedPLIB's dataset functions moved"
  namespace = {"torch": torch, "transformers": transformers, "copy": copy, "Dict": dict,
               "Sequence": list, "conversation_lib": conversation, "DataArguments": None}
  for name in ("IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "DEFAULT_IMAGE_TOKEN", "DEFAULT_IM_START_TOKEN",
               "DEFAULT_IM_END_TOKEN", "REGION_TOKEN_INDEX"):
    namespace[name] = getattr(utils, name)
  exec(compile(tree, path, "exec"), namespace)
  return namespace, conversation, utils


def _medplib_tokenizer(path: str, utils):
  """The tokenizer as train_ds_medplib.py builds it from a base LLaMA directory."""
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(path, cache_dir=None, model_max_length=512,
                                                   padding_side="right", use_fast=False, legacy=True)
  tok.pad_token = tok.unk_token
  added = list(utils.ADD_OTHERS_TOKENS) + [f"<gen_{i}>" for i in range(1, 257)]
  assert added == MEDPLIB_TOKENS, "MedPLIB's added tokens changed"
  for token_name in added:
    tok.add_tokens(token_name, special_tokens=True)
  tok.add_tokens([utils.DEFAULT_IM_START_TOKEN, utils.DEFAULT_IM_END_TOKEN], special_tokens=True)
  return tok


def _bpe_reference(bpe_dir: str, utils):
  """transformers 4.31's slow splitting around added tokens, each chunk encoded by the BPE."""
  import tokenizers
  import transformers
  from transformers.tokenization_utils import AddedToken

  with open(os.path.join(bpe_dir, "tokenizer.json")) as f:
    spec = json.load(f)["model"]
  vocab = spec["vocab"]
  merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
  model = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                                     byte_fallback=True, fuse_unk=True))
  # The `▁` prefix per chunk is the BPE's counterpart of sentencepiece's dummy prefix.
  model.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", add_prefix_space=True)
  inverse = {i: t for t, i in vocab.items()}

  class BpeSlowTokenizer(transformers.PreTrainedTokenizer):
    """A slow tokenizer over the BPE, with LlamaTokenizer's special tokens and BOS handling."""

    def __init__(self, **kwargs):
      # As LlamaTokenizer wraps them: AddedToken without lstrip / rstrip, so never stripped.
      super().__init__(bos_token=AddedToken("<s>", lstrip=False, rstrip=False),
                       eos_token=AddedToken("</s>", lstrip=False, rstrip=False),
                       unk_token=AddedToken("<unk>", lstrip=False, rstrip=False), **kwargs)

    @property
    def vocab_size(self):
      return len(vocab)

    def get_vocab(self):
      return dict(vocab, **self.added_tokens_encoder)

    def _tokenize(self, text):
      return model.encode(text, add_special_tokens=False).tokens

    def _convert_token_to_id(self, token):
      return vocab.get(token, vocab["<unk>"])

    def _convert_id_to_token(self, index):
      return inverse[index]

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
      assert token_ids_1 is None
      return [self.bos_token_id] + token_ids_0

  tok = BpeSlowTokenizer(model_max_length=512, padding_side="right")
  tok.sanitize_special_tokens()  # as from_pretrained does: <s> </s> <unk> become unsplittable
  tok.pad_token = tok.unk_token
  for token_name in MEDPLIB_TOKENS:
    tok.add_tokens(token_name, special_tokens=True)
  tok.add_tokens([utils.DEFAULT_IM_START_TOKEN, utils.DEFAULT_IM_END_TOKEN], special_tokens=True)
  return tok


def _train_sentencepiece(path: str) -> None:
  """A tiny BPE sentencepiece model with LLaMA's trainer settings (byte fallback, split digits)."""
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus()), model_writer=model, model_type="bpe", vocab_size=SPM_VOCAB,
      character_coverage=0.9995, normalization_rule_name="identity", add_dummy_prefix=True,
      remove_extra_whitespaces=False, split_digits=True, byte_fallback=True,
      allow_whitespace_only_pieces=True, split_by_unicode_script=True, split_by_whitespace=True,
      max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
      minloglevel=2)
  with open(path, "wb") as f:
    f.write(model.getvalue())


def _conversation_records(tok, fns, conversation, tokenizer_kind):
  """The reference's prompt, ids and labels for each conversation, per template."""
  data_args = types.SimpleNamespace(is_multimodal=True, mm_use_im_start_end=True)
  colon = tok.convert_tokens_to_ids(":")
  out = []
  for template, conv in itertools.product(TEMPLATES, CONVERSATIONS):
    conversation.default_conversation = conversation.conv_templates[template]
    has_image = any("<image>" in t["value"] for t in conv)
    sources = copy.deepcopy([conv])
    if has_image:
      sources = fns["preprocess_multimodal"](sources, data_args)
    data = fns["preprocess_v1"](sources, tok, has_image=has_image)
    ids = [int(i) for i in data["input_ids"][0]]
    # vqa_infer.py answers from these ids cut after the last ':' (its id 29901 in LLaMA's vocab).
    cut = max(i for i, t in enumerate(ids) if t == colon) + 1
    out.append({"template": template, "tokenizer": tokenizer_kind, "conversations": conv,
                "has_image": has_image, "prompt": data["conversations"][0], "input_ids": ids,
                "labels": [int(i) for i in data["labels"][0]], "generation_ids": ids[:cut]})
  return out


def make_reference(out: str, medplib: str) -> None:
  import sentencepiece
  import tokenizers
  import transformers
  assert transformers.__version__ == "4.31.0", transformers.__version__
  fns, conversation, utils = _reference_dataset_functions(medplib)
  llama_dir, medplib_dir, bpe_dir = (os.path.join(out, k) for k in ("llama", "medplib", "bpe"))
  os.makedirs(llama_dir, exist_ok=True)
  model_file = os.path.join(out, "tiny_llama_sp.model")
  _train_sentencepiece(model_file)
  transformers.LlamaTokenizer(vocab_file=model_file, legacy=True).save_pretrained(llama_dir)
  os.remove(model_file)  # the copy in llama/ is the one committed
  sp_tok = _medplib_tokenizer(llama_dir, utils)
  sp_tok.save_pretrained(medplib_dir)  # what a MedPLIB checkpoint directory carries
  reloaded = transformers.AutoTokenizer.from_pretrained(  # as vqa_infer.py loads it
      medplib_dir, cache_dir=None, model_max_length=2048, padding_side="right", use_fast=False,
      legacy=True)
  bpe_tok = _bpe_reference(bpe_dir, utils)
  texts = strings()
  record = {"versions": {"transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__,
                         "sentencepiece": sentencepiece.__version__},
            "strings": texts, "ids": {}, "image_ids": {}, "decode": {}, "conversations": []}
  for kind, tok in (("sentencepiece", sp_tok), ("bpe", bpe_tok)):
    ids = [tok(s).input_ids for s in texts]
    if kind == "sentencepiece":
      assert ids == [reloaded(s).input_ids for s in texts], "a saved checkpoint tokenizes otherwise"
      # Decoded text, for the answer-text item of issue #17 (not compared by the tokenizer test).
      record["decode"] = {"keep_special": [tok.decode(i) for i in ids],
                          "skip_special": [tok.decode(i, skip_special_tokens=True) for i in ids]}
    record["ids"][kind] = ids
    record["image_ids"][kind] = [fns["tokenizer_image_token"](s, tok) for s in texts]
    record["conversations"] += _conversation_records(tok, fns, conversation, kind)
  with open(os.path.join(out, "reference.json"), "w") as f:
    json.dump(record, f, ensure_ascii=False, separators=(",", ":"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("step", choices=["bpe", "reference"])
  parser.add_argument("--medplib", help="a checkout of github.com/ShawnHuang497/MedPLIB (reference)")
  parser.add_argument("--out", default=FIXTURE)
  args = parser.parse_args()
  if args.step == "bpe":
    make_bpe(args.out)
  else:
    if not args.medplib:
      parser.error("the reference step needs --medplib")
    make_reference(args.out, args.medplib)


if __name__ == "__main__":
  main()
