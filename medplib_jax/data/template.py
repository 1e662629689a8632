"""Conversation templates (`llava_v1`, `vicuna_v1`, `plain`) and the reference's label masking.

Tokenisation follows the reference exactly (LLaVA `tokenizer_image_token` as modified by MedPLIB,
and `preprocess_v1` / `preprocess_plain`):

* the prompt is split at `<image>`; each chunk is tokenised with a BOS, the BOS of every chunk but
  the first is dropped, and the image placeholder `IMAGE_TOKEN_INDEX` (-200) goes between chunks;
* a `REGION_TOKEN_INDEX` (-300) placeholder is inserted between each adjacent `<region>` `</region>`;
* labels (`llava_v1`/`vicuna_v1`): the conversation is split at `</s>` into rounds; per round
  `round_len = len(tok(round))` (its BOS stands for the round's `</s>`) and the instruction
  `len(tok(round up to "ASSISTANT: ")) - 2` positions are masked (-2: the BOS, and the lone word
  marker that the trailing space forms before it merges with the answer's first word); so only
  answers and their `</s>` are supervised (text after `</s>` starts a new chunk with its own word
  marker, as the legacy tokenizer the reference trained with encodes it). A length mismatch masks the whole sample (counted, as the reference prints a warning).
* `plain` (stage 1): `<image>` + caption + `\\n`, only the caption and the newline supervised.
"""

import dataclasses

from medplib_jax.data.batch import IGNORE_INDEX
from medplib_jax.data.tokenizer import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX

IM_START, IM_END = "<im_start>", "<im_end>"
HUMAN, GPT = "human", "gpt"


class ConversationError(ValueError):
  """A conversation that the template cannot lay out (roles out of order, no answer, ...)."""


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  system: str
  roles: tuple[str, str]
  sep: str
  sep2: str
  plain: bool = False

  def prompt(self, turns: list[tuple[str, str | None]]) -> str:
    """The conversation text; a final assistant turn of None leaves the prompt open ("ASSISTANT:")."""
    if self.plain:
      return "".join(text or "" for _, text in turns) + (self.sep if turns[-1][1] else "")
    seps = (self.sep, self.sep2)
    out = self.system + seps[0]
    for i, (role, text) in enumerate(turns):
      out += f"{role}: {text}{seps[i % 2]}" if text is not None else f"{role}:"
    return out


_LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")

TEMPLATES = {
    "llava_v1": Template("llava_v1", _LLAVA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
    "vicuna_v1": Template("vicuna_v1", _VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
    "plain": Template("plain", "", ("", ""), "\n", "\n", plain=True),
}


def get_template(name: str) -> Template:
  if name not in TEMPLATES:
    raise ValueError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATES)}")
  return TEMPLATES[name]


def place_image_token(text: str, use_im_start_end: bool = True) -> str:
  """Moves `<image>` to the front of a turn followed by a newline, wrapped in <im_start>/<im_end>."""
  if IMAGE_TOKEN not in text:
    return text
  text = IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()
  text = text.strip()
  if use_im_start_end:
    text = text.replace(IMAGE_TOKEN, IM_START + IMAGE_TOKEN + IM_END)
  return text


def tokenizer_image_token(prompt: str, tok) -> list[int]:
  """Token ids of `prompt` with -200 for each `<image>` and -300 inside each `<region></region>`."""
  chunks = [tok.encode(c) for c in prompt.split(IMAGE_TOKEN)]
  ids: list[int] = []
  offset = 0
  if chunks and chunks[0] and chunks[0][0] == tok.bos_id:
    offset = 1
    ids.append(chunks[0][0])
  for i, chunk in enumerate(chunks):
    if i:
      ids.append(IMAGE_TOKEN_INDEX)
    ids.extend(chunk[offset:])
  out: list[int] = []
  for i, t in enumerate(ids):
    out.append(t)
    if t == tok.region_start_id and i + 1 < len(ids) and ids[i + 1] == tok.region_end_id:
      out.append(REGION_TOKEN_INDEX)
  return out


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """ids may hold IMAGE_TOKEN_INDEX / REGION_TOKEN_INDEX placeholders; labels align with ids."""
  input_ids: list[int]
  labels: list[int]
  prompt: str
  mismatch: bool  # the reference's "tokenization mismatch": every label masked


def _turns(conversations: list[dict], template: Template) -> list[tuple[str, str]]:
  if conversations and conversations[0].get("from") != HUMAN:
    conversations = conversations[1:]  # the reference drops a leading non-human turn
  roles = {HUMAN: template.roles[0], GPT: template.roles[1]}
  turns = []
  for j, turn in enumerate(conversations):
    speaker = turn.get("from")
    if speaker not in roles:
      raise ConversationError(f"turn {j}: speaker {speaker!r} is neither 'human' nor 'gpt'")
    if speaker != (HUMAN, GPT)[j % 2]:
      raise ConversationError(f"turn {j}: expected a {(HUMAN, GPT)[j % 2]!r} turn, got {speaker!r}")
    turns.append((roles[speaker], str(turn["value"])))
  if not any(r == template.roles[1] for r, _ in turns):
    raise ConversationError("conversation has no assistant ('gpt') turn")
  return turns


def tokenize_conversation(conversations: list[dict], tok, template: Template | str = "llava_v1",
                          use_im_start_end: bool = True) -> Tokenized:
  """Tokenises a LLaVA-format conversation and masks labels as the reference does.

  `conversations` is the record's list of {"from": "human"|"gpt", "value": str} with any
  `<mask>path</mask>` already removed and `<region></region>` already emptied.
  """
  template = get_template(template) if isinstance(template, str) else template
  if template.plain:
    return _tokenize_plain(conversations, tok)
  turns = _turns([dict(t, value=place_image_token(str(t["value"]), use_im_start_end))
                  for t in conversations], template)
  prompt = template.prompt(turns)
  ids = tokenizer_image_token(prompt, tok)
  labels = list(ids)
  sep = template.sep + template.roles[1] + ": "
  cur = 1
  labels[:cur] = [IGNORE_INDEX] * cur
  for i, rnd in enumerate(prompt.split(template.sep2)):
    if rnd == "":
      break
    parts = rnd.split(sep)
    if len(parts) != 2:
      break
    round_len = len(tokenizer_image_token(rnd, tok))
    instruction_len = len(tokenizer_image_token(parts[0] + sep, tok)) - 2
    labels[cur:cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur:cur + instruction_len])
    cur += round_len
  labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
  # The reference counts non-pad ids (pad = unk) as the total length.
  total = sum(1 for t in ids if t != tok.pad_id)
  mismatch = cur != total
  if mismatch:
    labels = [IGNORE_INDEX] * len(ids)
  return Tokenized(ids, labels, prompt, mismatch)


def _tokenize_plain(conversations: list[dict], tok) -> Tokenized:
  if len(conversations) < 2 or IMAGE_TOKEN not in str(conversations[0].get("value", "")):
    raise ConversationError("plain template needs an <image> turn followed by a caption turn")
  caption = conversations[1]
  if caption.get("from") != GPT:
    raise ConversationError("plain template: the second turn must be the 'gpt' caption")
  prompt = IMAGE_TOKEN + str(caption["value"]) + TEMPLATES["plain"].sep
  ids = tokenizer_image_token(prompt, tok)
  head = len(tokenizer_image_token(IMAGE_TOKEN, tok))
  labels = [IGNORE_INDEX] * head + ids[head:]
  return Tokenized(ids, labels, prompt, False)


def generation_prompt(conversations: list[dict], template: Template | str = "llava_v1",
                      use_im_start_end: bool = True) -> str:
  """Prompt for answering the last human turn: earlier turns in full, cut after "ASSISTANT:"."""
  template = get_template(template) if isinstance(template, str) else template
  convs = [dict(t, value=place_image_token(str(t["value"]), use_im_start_end)) for t in conversations]
  if convs and convs[0].get("from") != HUMAN:
    convs = convs[1:]  # the reference drops a leading non-human turn (as `_turns` does)
  if convs and convs[-1].get("from") == GPT:
    convs = convs[:-1]
  if template.plain:
    return IMAGE_TOKEN
  roles = {HUMAN: template.roles[0], GPT: template.roles[1]}
  turns = [(roles[t["from"]], str(t["value"])) for t in convs] + [(template.roles[1], None)]
  return template.prompt(turns)


def template_texts() -> list[str]:
  """The fixed text of every template, for a tokenizer's training corpus."""
  out = []
  for t in TEMPLATES.values():
    if not t.plain:
      out.append(t.prompt([(t.roles[0], "Q"), (t.roles[1], "A")]))
  return out
