"""Fills what a config leaves to be derived, so that config.json is complete.

- ``data.data_dir``: '' -> ``$VSRLLM_DATA_DIR`` or ~/.cache/vsrllm_jax/tensorflow_datasets
- ``llm.tokenizer_path``: '' -> the LLM checkpoint's tokenizer, else the
  synthetic data's word-level tokenizer (built on first use)
- ``llm.vocab_size``: 0 -> the tokenizer's size (random-init LLM only)
- the tokenizer's special tokens are checked (``tokenizer.special_tokens``),
  and one without a pad token gets the documented fallback (unk, else EOS).
- ``loss_weights`` are checked against what the model will produce.
"""
from __future__ import annotations

import ml_collections

from vsrllm_jax.data import synthetic_lips, tokenizer as tokenizer_lib


def resolve_config(config: ml_collections.ConfigDict):
  """Returns (resolved copy of ``config``, tokenizer)."""
  config = ml_collections.ConfigDict(config.to_dict())
  with config.unlocked():
    if not config.data.data_dir:
      config.data.data_dir = synthetic_lips.default_data_dir()
    if not config.llm.tokenizer_path:
      config.llm.tokenizer_path = (config.llm.path or tokenizer_lib.default_tokenizer_dir(
          config.data.data_dir, config.data.instruction))
    tok = tokenizer_lib.load_tokenizer(config.llm.tokenizer_path)
    # Fails now, not at the first batch, if data.chat_template asks for a
    # template the tokenizer lacks (or a checkpoint lists bad eos ids).
    tokenizer_lib.special_tokens(tok, chat_template=bool(config.data.get("chat_template", False)))
    if not config.llm.path and config.llm.vocab_size <= 0:
      config.llm.vocab_size = len(tok)
  return config, tok
