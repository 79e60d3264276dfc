"""Word-level tokenizer of the synthetic data, saved in Hugging Face format.

One token per GRID word keeps the default LLM tiny and makes token accuracy
equal word accuracy. It is saved with ``save_pretrained`` so the code that
loads a real LLM's tokenizer (``AutoTokenizer``) loads this one unchanged.
BOS/EOS are not added by the tokenizer: the input pipeline adds them.

Real LLM tokenizers (Llama 2/3, Mistral, Qwen2, Gemma) load through the same
``load_tokenizer``; ``special_tokens``, ``instruction_ids`` and ``label_ids``
give every family the same sequence layout (one BOS where the family has
one, labels ending in EOS, a real pad id), optionally through the
checkpoint's chat template.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import NamedTuple

from vsrllm_jax.data.synthetic import grid_grammar

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3


def _pre_tokenizer():
  from tokenizers import pre_tokenizers
  return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                  pre_tokenizers.Punctuation()])


def word_vocabulary(extra_texts=()) -> list[str]:
  """Special tokens, the grammar's words, then new words/punctuation of ``extra_texts``."""
  words = list(SPECIAL_TOKENS) + list(grid_grammar.VOCABULARY)
  seen = set(words)
  pre = _pre_tokenizer()
  for text in extra_texts:
    for piece, _ in pre.pre_tokenize_str(text.lower()):
      if piece not in seen:
        seen.add(piece)
        words.append(piece)
  return words


def build_word_tokenizer(out_dir, extra_texts=()):
  """Builds the WordLevel tokenizer, saves it to ``out_dir``, returns the HF tokenizer."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, normalizers

  vocab = {w: i for i, w in enumerate(word_vocabulary(extra_texts))}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = _pre_tokenizer()
  # Joins tokens with single spaces: decode(encode(s)) == s for GRID sentences.
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
      clean_up_tokenization_spaces=False, padding_side="right")
  hf.save_pretrained(str(out_dir))
  return hf


def load_tokenizer(path):
  """The HF tokenizer saved at ``path``; a clear error if missing or incomplete.

  A tokenizer without a pad token (Llama 2, Mistral, Llama 3) gets the
  fallback of ``special_tokens`` as its ``pad_token``, so ``pad_token_id`` is a
  real id everywhere; padded positions are always masked.
  """
  import transformers

  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist (expected "
                            "tokenizer files written by save_pretrained)")
  try:
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise ValueError(f"could not load a tokenizer from {str(path)!r}: {e}") from e
  if tok.eos_token_id is None:
    raise ValueError(f"tokenizer at {str(path)!r} defines no eos_token; the input pipeline "
                     "ends every label with EOS so decoding can stop")
  if tok.pad_token_id is None:
    tok.pad_token = tok.convert_ids_to_tokens(_fallback_pad_id(tok))
  return tok


# ------------------------------------ special tokens and encoding, per LLM family
#
# What the rules below give for real checkpoints (nothing is keyed on family
# names: they read the tokenizer and the checkpoint's config files):
#   Llama 2, Mistral  BOS <s>; EOS </s>; no pad token -> <unk>
#   Llama 3 / 3.x     BOS <|begin_of_text|>; EOS <|end_of_text|>, instruct turns end
#                     with <|eot_id|> (in generation_config.json's list); no pad, no
#                     unk -> pad = EOS
#   Qwen2 / 2.5       no BOS; EOS <|endoftext|> (instruct: <|im_end|>); pad <|endoftext|>
#   Gemma             BOS <bos>; EOS <eos> (instruct turns end with <end_of_turn>); pad <pad>
# Labels and instructions are built explicitly (never through the tokenizer's
# own special-token insertion), so every family gets exactly one BOS (none
# where it has none) before the instruction and one EOS after the label.

_CONFIG_FILES = ("generation_config.json", "config.json")
_REPLY_MARKER = "vsrllmassistantreply"  # stands in for the reply when probing a template


class SpecialTokens(NamedTuple):
  """The ids the input pipeline and decoding need from a tokenizer."""
  bos_id: int | None         # before every instruction; None: the family has no BOS
  eos_ids: tuple[int, ...]   # decoding stops at any; eos_ids[0] ends every label
  pad_id: int                # a real id (embedding lookup); padding is always masked


def _fallback_pad_id(tok) -> int:
  """pad, else unk, else EOS: any real id will do, as padded positions are masked."""
  for token_id in (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id):
    if token_id is not None:
      return int(token_id)
  raise ValueError(f"tokenizer at {tok.name_or_path!r} defines none of pad, unk, eos tokens")


def _config_eos_ids(tok) -> list[int]:
  """``eos_token_id`` (an int or a list) of the checkpoint's generation_config/config.json."""
  directory = pathlib.Path(str(tok.name_or_path or ""))
  ids = []
  for name in _CONFIG_FILES:
    file = directory / name
    if not directory.is_dir() or not file.is_file():
      continue
    with open(file) as f:
      cfg = json.load(f)
    for value in (cfg.get("eos_token_id"), (cfg.get("text_config") or {}).get("eos_token_id")):
      values = value if isinstance(value, list) else [] if value is None else [value]
      for token_id in values:
        if not isinstance(token_id, int) or not 0 <= token_id < len(tok):
          raise ValueError(f"{str(file)!r}: eos_token_id {value!r} is not a token id (or a list "
                           f"of them) in [0, {len(tok)}) of the tokenizer there")
        ids.append(token_id)
  return ids


def _require_chat_template(tok) -> None:
  if not getattr(tok, "chat_template", None):
    raise ValueError(f"data.chat_template is true but the tokenizer at {tok.name_or_path!r} "
                     "has no chat template (none in tokenizer_config.json or "
                     "chat_template.jinja); use an instruct checkpoint's tokenizer or set "
                     "data.chat_template=False")


def render_chat_prompt(tok, instruction: str) -> str:
  """``instruction`` as one user turn plus the assistant-turn header (generation prompt)."""
  _require_chat_template(tok)
  return tok.apply_chat_template([{"role": "user", "content": instruction}],
                                 add_generation_prompt=True, tokenize=False)


def chat_end_of_turn_id(tok) -> int:
  """The first special token after an assistant reply in the template, else EOS.

  Found by rendering a probe conversation, so it follows the template rather
  than a per-family table: <|eot_id|> (Llama 3), <|im_end|> (Qwen2),
  <end_of_turn> (Gemma), </s> (Llama 2, Mistral).
  """
  _require_chat_template(tok)
  text = tok.apply_chat_template([{"role": "user", "content": "hello"},
                                  {"role": "assistant", "content": _REPLY_MARKER}],
                                 tokenize=False)
  if _REPLY_MARKER not in text:
    raise ValueError(f"the chat template of the tokenizer at {tok.name_or_path!r} does not "
                     "render the assistant's reply; data.chat_template needs one that does")
  suffix = text[text.rindex(_REPLY_MARKER) + len(_REPLY_MARKER):]
  special = set(tok.all_special_ids) | {
      i for i, added in tok.added_tokens_decoder.items() if added.special}
  for token_id in tok(suffix, add_special_tokens=False)["input_ids"]:
    if token_id in special:
      return int(token_id)
  return int(tok.eos_token_id)


def special_tokens(tok, *, chat_template: bool = False) -> SpecialTokens:
  """BOS (or None), EOS ids and pad id of ``tok``; see the family table above.

  BOS is the tokenizer's ``bos_token`` whenever it defines one (every family
  above that has one starts sequences with it; transformers 5 does not keep
  ``add_bos_token`` as a reliable attribute, so it is not consulted).

  ``eos_ids`` = the label terminator (the template's end-of-turn token when
  ``chat_template``, else the tokenizer's EOS), the tokenizer's EOS, then the
  ``eos_token_id`` lists of generation_config.json and config.json in the
  tokenizer's directory, without repeats.
  """
  if tok.eos_token_id is None:
    raise ValueError(f"tokenizer at {tok.name_or_path!r} defines no eos_token; labels end "
                     "with EOS so decoding can stop")
  label_end = chat_end_of_turn_id(tok) if chat_template else int(tok.eos_token_id)
  eos_ids = tuple(dict.fromkeys([label_end, int(tok.eos_token_id), *_config_eos_ids(tok)]))
  bos_id = None if tok.bos_token_id is None else int(tok.bos_token_id)
  return SpecialTokens(bos_id, eos_ids, _fallback_pad_id(tok))


def text_ids(tok, text: str) -> list[int]:
  """Ids of plain text: no special tokens added, and none recognised inside it."""
  return [int(i) for i in
          tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]]


def instruction_ids(tok, instruction: str, special: SpecialTokens, *,
                    chat_template: bool = False) -> list[int]:
  """``[BOS] + instruction``, or ``[BOS] + <user turn> + <assistant header>`` from the template.

  Templates that print ``bos_token`` themselves (Llama 2/3, Mistral, Gemma)
  have it stripped, so exactly one BOS starts the sequence (none for Qwen2).
  """
  if chat_template:
    ids = [int(i) for i in
           tok(render_chat_prompt(tok, instruction), add_special_tokens=False)["input_ids"]]
    while special.bos_id is not None and ids and ids[0] == special.bos_id:
      ids.pop(0)
  else:
    ids = text_ids(tok, instruction)
  return ([] if special.bos_id is None else [special.bos_id]) + ids


def label_ids(tok, text: str, special: SpecialTokens) -> list[int]:
  """``text + EOS`` (the end-of-turn token under a chat template: ``special.eos_ids[0]``)."""
  return text_ids(tok, text) + [special.eos_ids[0]]


def vocabulary_hash(extra_texts=()) -> str:
  return hashlib.sha256(json.dumps(word_vocabulary(extra_texts)).encode()).hexdigest()[:12]


def default_tokenizer_dir(data_dir, instruction: str) -> str:
  """Builds (once) the word tokenizer under ``<data_dir>/tokenizers``; returns its path.

  The directory name hashes the vocabulary, so a new instruction gets a new
  tokenizer. Written to a temp dir and renamed, so readers never see half a
  tokenizer and concurrent builders do not clash.
  """
  root = pathlib.Path(data_dir) / "tokenizers"
  final = root / f"grid_word_{vocabulary_hash((instruction,))}"
  if final.is_dir():
    return str(final)
  root.mkdir(parents=True, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp_grid_word_", dir=str(root))
  try:
    build_word_tokenizer(tmp, extra_texts=(instruction,))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
      os.rename(tmp, final)
    except OSError:
      if not final.is_dir():  # not a lost race with another builder
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return str(final)


# ------------------------------------------------- the embedded LLM's tokenizer

# Instructions the embedded LLM is pretrained with. The first is the default
# ``c.data.instruction``: listing it first keeps every id of the data's own
# tokenizer (``default_tokenizer_dir``) unchanged in the embedded one.
INSTRUCTION_TEMPLATES: tuple[str, ...] = (
    "Recognize this speech in English. Input:",
    "Transcribe the lip movements. Input:",
    "Read the lips and write the sentence. Input:",
)

# Silence/filler word of the pretraining spans (the viseme module's name for a
# closed, still mouth); appended last so the ids above stay put.
SILENCE_WORD = "sil"


def build_embedded_tokenizer(out_dir):
  """The embedded LLM's word tokenizer: grammar + all templates + the silence word."""
  return build_word_tokenizer(out_dir, extra_texts=INSTRUCTION_TEMPLATES + (SILENCE_WORD,))
