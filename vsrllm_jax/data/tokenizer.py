"""Word-level tokenizer of the synthetic data, saved in Hugging Face format.

One token per GRID word keeps the default LLM tiny and makes token accuracy
equal word accuracy. It is saved with ``save_pretrained`` so the code that
loads a real LLM's tokenizer (``AutoTokenizer``) loads this one unchanged.
BOS/EOS are not added by the tokenizer: the input pipeline adds them.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile

from vsrllm_jax.data import grid_grammar

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
  """The HF tokenizer saved at ``path``; a clear error if missing or incomplete."""
  import transformers

  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist (expected "
                            "tokenizer files written by save_pretrained)")
  try:
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise ValueError(f"could not load a tokenizer from {str(path)!r}: {e}") from e
  missing = [name for name in ("pad_token_id", "bos_token_id", "eos_token_id")
             if getattr(tok, name) is None]
  if missing:
    raise ValueError(f"tokenizer at {str(path)!r} defines no {', '.join(missing)}; the input "
                     "pipeline needs pad, BOS and EOS tokens")
  return tok


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
