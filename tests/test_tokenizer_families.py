"""Special tokens, instruction/label ids and chat templates for each LLM family.

No network: each family's tokenizer is rebuilt locally in its style (the
family's transformers class or tokenizer.json layout, special tokens, BOS
behaviour, pad token, chat template, eos_token_id lists in config.json and
generation_config.json) from a tiny BPE trained on GRID-like text, then
saved with ``save_pretrained`` and loaded back through ``load_tokenizer``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

from vsrllm_jax.configs import common
from vsrllm_jax.run import setup as setup_lib
from vsrllm_jax.data.synthetic import grid_grammar
from vsrllm_jax.data import examples
from vsrllm_jax.data import tokenizer as tokenizer_lib

INSTRUCTION = "Recognize this speech in English. Input:"
SENTENCES = ("bin blue at f two now", "place red by g nine soon", "Lay White with Z 8 please")

LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def _corpus():
  rng = np.random.default_rng(0)
  grid = [" ".join(grid_grammar.sample_sentence(rng)) for _ in range(50)]
  extra = [INSTRUCTION, *SENTENCES, "You are a helpful assistant.", "system\nuser\nassistant\n",
           "model\n[INST] [/INST] hello", "0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ <>/|"]
  return grid + extra * 3


def _train_bpe(pre_tokenizer, specials, *, normalizer=None, byte_level=False):
  """(vocab, merges) of a tiny BPE; ``specials`` take ids 0, 1, ... in order."""
  tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
  tok.pre_tokenizer = pre_tokenizer
  if normalizer is not None:
    tok.normalizer = normalizer
  alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
  tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
      vocab_size=500, special_tokens=list(specials), initial_alphabet=alphabet,
      show_progress=False))
  model = json.loads(tok.to_str())["model"]
  return model["vocab"], [tuple(m) for m in model["merges"]], tok


def _sentencepiece_style(specials):
  return _train_bpe(pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"),
                    specials)


def _llama2(chat_template=None):
  vocab, merges, _ = _sentencepiece_style(["<unk>", "<s>", "</s>"])
  tok = transformers.LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
  tok.chat_template = chat_template
  return tok, {"eos_token_id": 2}, None


def _llama3():
  specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
              "<|end_header_id|>", "<|eot_id|>"]
  _, _, backend = _train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), specials,
                             byte_level=True)
  backend.decoder = decoders.ByteLevel()
  # Llama 3's tokenizer.json adds BOS through its post-processor, not add_bos_token.
  backend.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
      special_tokens=[("<|begin_of_text|>", 0)])
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
      clean_up_tokenization_spaces=False)
  tok.chat_template = LLAMA3_TEMPLATE
  # Llama 3.1 instruct: config.json and generation_config.json list the turn end.
  return tok, {"eos_token_id": [1, 4]}, {"bos_token_id": 0, "eos_token_id": [1, 4]}


def _qwen2():
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  vocab, merges, _ = _train_bpe(pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"\s?\w+|\s?[^\s\w]+|\s+"), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), specials,
      byte_level=True)
  tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>",
                                    pad_token="<|endoftext|>")
  tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials],
                 special_tokens=True)
  tok.chat_template = QWEN2_TEMPLATE
  # Qwen2.5 instruct: config.json names <|endoftext|>, generation_config both.
  return tok, {"bos_token_id": 0, "eos_token_id": 0}, {"eos_token_id": [2, 0]}


def _gemma():
  specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
  vocab, merges, _ = _train_bpe(
      pre_tokenizers.Split("\u2581", behavior="merged_with_next"), specials,
      normalizer=normalizers.Replace(" ", "\u2581"))
  tok = transformers.GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
  tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials[5:]],
                 special_tokens=True)
  tok.chat_template = GEMMA_TEMPLATE
  return tok, {"eos_token_id": 1}, {"eos_token_id": [1, 6]}


FAMILIES = {
    "llama2": lambda: _llama2(),
    "mistral_instruct": lambda: _llama2(MISTRAL_TEMPLATE),
    "llama3_instruct": _llama3,
    "qwen2_instruct": _qwen2,
    "gemma_instruct": _gemma,
}
# (BOS, EOS, pad, chat end-of-turn token (None: no template), all eos tokens).
EXPECTED = {
    "llama2": ("<s>", "</s>", "<unk>", None, ["</s>"]),
    "mistral_instruct": ("<s>", "</s>", "<unk>", "</s>", ["</s>"]),
    "llama3_instruct": ("<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                        ["<|end_of_text|>", "<|eot_id|>"]),
    "qwen2_instruct": (None, "<|im_end|>", "<|endoftext|>", "<|im_end|>",
                       ["<|im_end|>", "<|endoftext|>"]),
    "gemma_instruct": ("<bos>", "<eos>", "<pad>", "<end_of_turn>", ["<eos>", "<end_of_turn>"]),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
  dirs = {}
  for name, build in FAMILIES.items():
    path = tmp_path_factory.mktemp(name)
    tok, config, generation_config = build()
    tok.save_pretrained(str(path))
    for file, content in (("config.json", config), ("generation_config.json", generation_config)):
      if content is not None:
        (path / file).write_text(json.dumps(content))
    dirs[name] = str(path)
  return dirs


@pytest.fixture(scope="module")
def loaded(family_dirs):
  return {name: tokenizer_lib.load_tokenizer(path) for name, path in family_dirs.items()}


def _id(tok, token):
  return None if token is None else tok.convert_tokens_to_ids(token)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_special_tokens_follow_the_family(loaded, family):
  tok = loaded[family]
  bos, eos, pad, _, all_eos = EXPECTED[family]
  special = tokenizer_lib.special_tokens(tok)
  assert special.bos_id == _id(tok, bos)
  assert special.eos_ids[0] == _id(tok, eos) == tok.eos_token_id
  assert set(special.eos_ids) == {_id(tok, t) for t in all_eos}
  assert special.pad_id == _id(tok, pad) == tok.pad_token_id  # load_tokenizer's fallback
  assert 0 <= special.pad_id < len(tok)
  bos_, eos_, pad_ = special  # unpacks as (bos, eos_ids, pad)
  assert (bos_, eos_, pad_) == (special.bos_id, special.eos_ids, special.pad_id)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_bos_and_labels_end_in_one_eos(loaded, family):
  tok = loaded[family]
  special = tokenizer_lib.special_tokens(tok)
  ids = tokenizer_lib.instruction_ids(tok, INSTRUCTION, special)
  # The same as the family's own special-token insertion (BOS or not) ...
  assert ids == tok(INSTRUCTION)["input_ids"]
  body = ids if special.bos_id is None else ids[1:]
  if special.bos_id is not None:
    assert ids[0] == special.bos_id and ids.count(special.bos_id) == 1
  assert tok.decode(body) == INSTRUCTION
  for text in SENTENCES:
    label = tokenizer_lib.label_ids(tok, text, special)
    assert label[-1] == special.eos_ids[0]
    assert not set(label[:-1]) & set(special.eos_ids) and special.bos_id not in label
    assert tok.unk_token_id not in label or tok.unk_token_id is None
    assert tok.decode(label[:-1]) == text
  # ... and a transcript spelling a special token cannot end the label early.
  label = tokenizer_lib.label_ids(tok, f"bin {tok.eos_token} blue", special)
  assert label.count(special.eos_ids[0]) == 1 and label[-1] == special.eos_ids[0]


@pytest.mark.parametrize("family", [f for f in FAMILIES if EXPECTED[f][3] is not None])
def test_chat_template_renders_user_turn(loaded, family):
  tok = loaded[family]
  bos, _, _, end_of_turn, all_eos = EXPECTED[family]
  special = tokenizer_lib.special_tokens(tok, chat_template=True)
  assert special.eos_ids[0] == _id(tok, end_of_turn)
  assert set(special.eos_ids) == {_id(tok, t) for t in all_eos + [end_of_turn]}
  ids = tokenizer_lib.instruction_ids(tok, INSTRUCTION, special, chat_template=True)
  rendered = tok.apply_chat_template([{"role": "user", "content": INSTRUCTION}],
                                     add_generation_prompt=True, tokenize=False)
  if bos is None:
    assert tok.decode(ids) == rendered
  else:  # the template prints bos_token itself; still exactly one BOS
    assert rendered.startswith(bos) and ids[0] == special.bos_id
    assert ids.count(special.bos_id) == 1
    assert bos + tok.decode(ids[1:]) == rendered
  assert INSTRUCTION in rendered and len(ids) > len(tok(INSTRUCTION)["input_ids"])
  label = tokenizer_lib.label_ids(tok, SENTENCES[0], special)
  assert label[-1] == _id(tok, end_of_turn) and tok.decode(label[:-1]) == SENTENCES[0]


def test_missing_chat_template_is_a_clear_error(loaded, family_dirs):
  with pytest.raises(ValueError, match=r"data\.chat_template.*" + family_dirs["llama2"]):
    tokenizer_lib.special_tokens(loaded["llama2"], chat_template=True)
  config = common.get_base_config()
  config.llm.path = ""
  config.llm.tokenizer_path = family_dirs["llama2"]
  config.data.chat_template = True
  with pytest.raises(ValueError, match=r"data\.chat_template"):
    setup_lib.resolve_config(config)
  config.llm.tokenizer_path = family_dirs["gemma_instruct"]
  _, tok = setup_lib.resolve_config(config)
  assert tok.pad_token_id == _id(tok, "<pad>")


def test_bad_eos_list_in_generation_config_names_the_file(family_dirs, tmp_path):
  tok = transformers.AutoTokenizer.from_pretrained(family_dirs["gemma_instruct"])
  tok.save_pretrained(str(tmp_path))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 10**6]}))
  with pytest.raises(ValueError, match="generation_config.json"):
    tokenizer_lib.special_tokens(tokenizer_lib.load_tokenizer(tmp_path))


def _data_cfg(chat_template, max_instruction_tokens=48):
  cfg = common.get_base_config().data
  cfg.update(dict(image_size=8, max_frames=4, max_label_tokens=16, chat_template=chat_template,
                  max_instruction_tokens=max_instruction_tokens))
  return cfg


@pytest.mark.parametrize("family,chat", [("llama3_instruct", False), ("llama3_instruct", True),
                                         ("qwen2_instruct", True), ("llama2", False)])
def test_pipeline_encoder_uses_family_ids(loaded, family, chat):
  tok = loaded[family]
  special = tokenizer_lib.special_tokens(tok, chat_template=chat)
  encoder = examples.ExampleEncoder(_data_cfg(chat), tok)
  record = {"id": "x", "text": SENTENCES[1], "video": np.zeros((3, 8, 8, 1), np.uint8)}
  example = encoder(0, record)
  instr = tokenizer_lib.instruction_ids(tok, INSTRUCTION, special, chat_template=chat)
  label = tokenizer_lib.label_ids(tok, SENTENCES[1], special)
  for key, want in (("instruction", instr), ("label", label)):
    n = len(want)
    assert example[f"{key}_mask"].sum() == n and example[f"{key}_mask"][:n].all()
    assert example[f"{key}_ids"][:n].tolist() == want
    assert (example[f"{key}_ids"][n:] == special.pad_id).all()
  filler = encoder.filler()
  assert (filler["label_ids"] == special.pad_id).all() and not filler["label_mask"].any()
  with pytest.raises(ValueError, match="data.max_instruction_tokens"):
    examples.ExampleEncoder(_data_cfg(chat, len(instr) - 1), tok)


def test_embedded_word_tokenizer_ids_unchanged(tmp_path):
  """The word tokenizer's ids equal the word list's indices, as before the family code."""
  tok = tokenizer_lib.load_tokenizer(tokenizer_lib.default_tokenizer_dir(tmp_path, INSTRUCTION))
  words = tokenizer_lib.word_vocabulary((INSTRUCTION,))
  index = {w: i for i, w in enumerate(words)}
  special = tokenizer_lib.special_tokens(tok)
  assert special == (index["<s>"], (index["</s>"],), index["<pad>"])
  expected = [index["<s>"]] + [index[w] for w in
                               "recognize this speech in english . input :".split()]
  assert tokenizer_lib.instruction_ids(tok, INSTRUCTION, special) == expected
  assert expected == [tok.bos_token_id] + tok(INSTRUCTION, add_special_tokens=False)["input_ids"]
  rng = np.random.default_rng(1)
  for _ in range(5):
    words_ = grid_grammar.sample_sentence(rng)
    label = tokenizer_lib.label_ids(tok, " ".join(words_), special)
    assert label == [index[w] for w in words_] + [index["</s>"]]
  embedded = tokenizer_lib.load_tokenizer(common.EMBEDDED_DIR + "/llm")
  assert tokenizer_lib.special_tokens(embedded) == special

