"""Each supported checkpoint family against transformers: logits, greedy decoding, export.

Tiny random transformers models (fp32, eager attention) are saved to tmp dirs
and loaded with our ``from_pretrained``; no network. The prompt batch is right
padded and its longest row (300 tokens) exceeds the llama3 rope's original
context and the sliding windows, so RoPE scaling and windows both matter.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
import transformers

from tests.helpers.numerics import assert_close
from vsrllm_jax.inference import generation
from vsrllm_jax.formats import hf_llm
from vsrllm_jax.models import llm

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
              max_position_embeddings=512)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)
FAMILIES = {  # name -> (config class, extra config fields)
    "llama_gqa": (transformers.LlamaConfig, {}),
    "llama3_rope": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE)),
    # Layer 0 full, layer 1 windowed (layers >= max_window_layers slide).
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True, use_sliding_window=True,
                                             sliding_window=48, max_window_layers=1)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=64)),
    "gemma": (transformers.GemmaConfig, dict(head_dim=32, hidden_act="gelu_pytorch_tanh",
                                             tie_word_embeddings=True)),
}
LENGTHS, SEQ = [300, 137, 9], 300
NEW_TOKENS = 32


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _hf_logits(hf, ids, mask):
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)
  with torch.no_grad():
    return hf(input_ids=t(ids), attention_mask=t(mask), position_ids=t(positions)).logits.numpy()


def _tiny_hf_model(name):
  """A random fp32 model whose norm weights and biases are non-trivial too."""
  cls, extra = FAMILIES[name]
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(
      cls(**COMMON, **extra), attn_implementation="eager").eval()
  with torch.no_grad():  # HF initialises norms to 1 (Gemma: 0) and biases to 0
    for pname, p in hf.named_parameters():
      if pname.endswith("norm.weight") or pname.endswith(".bias"):
        p.add_(0.3 * torch.randn_like(p))
  return hf


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
  """One family: the HF model, ours loaded from its checkpoint, a batch and HF's logits."""
  name = request.param
  hf = _tiny_hf_model(name)
  path = tmp_path_factory.mktemp(name)
  hf.save_pretrained(path)
  model, params = hf_llm.from_pretrained(path)

  @jax.jit
  def forward(params, ids, mask):
    return model.apply({"params": params}, ids, attention_mask=mask)

  rng = np.random.default_rng(0)
  ids = rng.integers(3, COMMON["vocab_size"], size=(len(LENGTHS), SEQ))
  mask = (np.arange(SEQ)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
  return dict(name=name, hf=hf, model=model, params=params, forward=forward, ids=ids, mask=mask,
              expected=_hf_logits(hf, ids, mask))


def test_config_is_read_as_the_family(family):
  cfg = family["model"].config
  windows = {"qwen2": (llm.NO_WINDOW, 48), "mistral": (64, 64)}.get(
      family["name"], (llm.NO_WINDOW,) * 2)
  assert cfg.layer_windows() == windows
  assert (cfg.embedding_scale, cfg.norm_offset, cfg.mlp_activation, cfg.head_dim) == (
      (True, 1.0, "gelu_pytorch_tanh", 32) if family["name"] == "gemma" else
      (False, 0.0, "silu", 16))
  assert cfg.attention_bias == (family["name"] == "qwen2")
  assert (cfg.rope_scaling is not None) == (family["name"] == "llama3_rope")


def test_logits_match_transformers_right_padded(family):
  got = np.asarray(family["forward"](family["params"], family["ids"], family["mask"]))
  expected, real = family["expected"], family["mask"].astype(bool)
  assert got.shape == expected.shape and got.dtype == np.float32
  assert np.abs(expected[real]).max() > 0.3  # logits O(1): the tolerance means something
  assert_close(got[real], expected[real], rtol=1e-4, atol_frac=1e-5)


def test_greedy_generation_matches_transformers(family):
  """Prompts longer than the windows / original rope context; EOS disabled on both sides."""
  hf, model = family["hf"], family["model"]
  ids = family["ids"][:2, :80]
  eos, hf.generation_config.eos_token_id = hf.generation_config.eos_token_id, None
  try:
    with torch.no_grad():
      out = hf.generate(torch.as_tensor(ids), attention_mask=torch.ones_like(torch.as_tensor(ids)),
                        do_sample=False, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS,
                        pad_token_id=0)
  finally:
    hf.generation_config.eos_token_id = eos
  expected = out[:, ids.shape[1]:].numpy()
  assert expected.shape == (2, NEW_TOKENS)
  gen = jax.jit(functools.partial(generation.greedy_generate_from_ids, model,
                                  max_new_tokens=NEW_TOKENS, eos_id=-1, pad_id=0))
  np.testing.assert_array_equal(np.asarray(gen(family["params"], ids, np.ones_like(ids))),
                                expected)


def test_save_pretrained_loads_back_in_transformers(family, tmp_path):
  model, params = family["model"], family["params"]
  hf_llm.save_pretrained(tmp_path, model.config, params)
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
  assert hf.config.model_type == family["hf"].config.model_type
  ids, mask, real = family["ids"], family["mask"], family["mask"].astype(bool)
  assert_close(_hf_logits(hf.eval(), ids, mask)[real], family["expected"][real], rtol=1e-4,
               atol_frac=1e-5)
  model2, params2 = hf_llm.from_pretrained(tmp_path)
  assert model2.config == model.config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_windowed_cached_decoding_matches_full_forward(family):
  """With padding on the left and inside, windows count real tokens in both paths."""
  if family["model"].config.sliding_window is None:
    pytest.skip("runs for the sliding-window families (test_llm.py covers the rest)")
  model, params, ids = family["model"], family["params"], family["ids"]
  mask = np.ones((3, SEQ), np.int32)
  mask[1, :40] = 0            # left padding
  mask[2, 100:170] = 0        # a gap longer than the windows
  mask[2, 280:] = 0           # padding decoded step by step
  full = np.asarray(family["forward"](params, ids, mask))

  @jax.jit
  def step(params, ids, mask, cache, logit_positions=None):
    return model.apply({"params": params}, ids, attention_mask=mask, cache=cache,
                       logit_positions=logit_positions)

  prefill, real = 256, mask.astype(bool)
  cache = llm.init_cache(model.config, 3, SEQ)
  logits, cache = step(params, ids[:, :prefill], mask[:, :prefill], cache)
  # Only some rows wanted: logits at those rows, the same cache.
  keep = np.array([[0, 131, 255], [40, 100, 255], [5, 99, 200]])
  kept, kept_cache = step(params, ids[:, :prefill], mask[:, :prefill],
                          llm.init_cache(model.config, 3, SEQ), keep)
  assert_close(kept, np.take_along_axis(full, keep[..., None], axis=1), rtol=1e-4,
               atol_frac=1e-5)
  jax.tree.map(functools.partial(assert_close, rtol=1e-5, atol_frac=1e-6), kept_cache, cache)
  pieces = [np.asarray(logits)]
  for t in range(prefill, SEQ):
    logits, cache = step(params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
    pieces.append(np.asarray(logits))
  cached = np.concatenate(pieces, axis=1)
  assert_close(cached[real], full[real], rtol=1e-4, atol_frac=1e-5)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  np.testing.assert_array_equal(np.asarray(cache["key_positions"])[real], positions[real])


# --- config.json parsing -----------------------------------------------------------


def _hf_dict(family_name):
  cls, extra = FAMILIES[family_name]
  return cls(**COMMON, **extra).to_dict()


@pytest.mark.parametrize("base,field,value", [
    ("gemma", "model_type", "gemma2"), ("gemma", "model_type", "gemma3_text"),
    ("llama_gqa", "model_type", "phi3"),
    ("gemma", "attn_logit_softcapping", 50.0), ("gemma", "final_logit_softcapping", 30.0),
    ("gemma", "query_pre_attn_scalar", 64), ("gemma", "hidden_act", "silu"),
    ("gemma", "hidden_activation", "silu"), ("gemma", "use_bidirectional_attention", True),
    ("gemma", "sliding_window", 64),
    ("llama_gqa", "partial_rotary_factor", 0.5),
    ("llama_gqa", "rope_parameters", dict(rope_type="default", rope_theta=1e4,
                                          partial_rotary_factor=0.5)),
    ("llama_gqa", "rope_parameters", dict(rope_type="yarn", rope_theta=1e4, factor=4.0)),
    ("qwen2", "rope_parameters", dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)),
    ("llama_gqa", "rope_parameters", dict(full_attention=dict(rope_type="default"),
                                          sliding_attention=dict(rope_type="default"))),
    ("llama_gqa", "mlp_bias", True), ("llama_gqa", "hidden_act", "gelu"),
    ("mistral", "hidden_act", "gelu_pytorch_tanh"), ("qwen2", "hidden_act", "relu"),
    ("llama_gqa", "sliding_window", 64),
    ("llama_gqa", "layer_types", ["sliding_attention", "full_attention"]),
    ("qwen2", "layer_types", ["chunked_attention", "full_attention"]),
    ("qwen2", "layer_types", ["full_attention"]),
    ("mistral", "layer_types", ["sliding_attention", "full_attention"]),
    ("mistral", "sliding_window", 0),
])
def test_unsupported_config_fields_raise(base, field, value):
  hf = _hf_dict(base)
  hf[field] = value
  with pytest.raises(ValueError, match=f"my/config.json: field '{field}'"):
    llm.LlmConfig.from_hf_config(hf, source="my/config.json")


def test_qwen2_sliding_layers_without_window_raise():
  hf = dict(_hf_dict("qwen2"), use_sliding_window=False)
  hf["layer_types"] = ["full_attention", "sliding_attention"]
  with pytest.raises(ValueError, match="field 'layer_types'.*disable the window"):
    llm.LlmConfig.from_hf_config(hf, source="my/config.json")


def test_sliding_window_fields_per_family():
  n, full = 3, llm.NO_WINDOW
  qwen = dict(_hf_dict("qwen2"), num_hidden_layers=n, sliding_window=32, max_window_layers=2)
  del qwen["layer_types"]
  assert llm.LlmConfig.from_hf_config(qwen).layer_windows() == (full, full, 32)
  assert llm.LlmConfig.from_hf_config(
      dict(qwen, use_sliding_window=False)).layer_windows() == (full,) * n
  types = dict(qwen, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
  cfg = llm.LlmConfig.from_hf_config(types)  # layer_types wins over max_window_layers
  assert cfg.layer_windows() == (32, full, 32)
  assert llm.LlmConfig.from_hf_config(cfg.to_hf_config()) == cfg
  mistral = dict(_hf_dict("mistral"), sliding_window=None)
  assert llm.LlmConfig.from_hf_config(mistral).sliding_window is None
  same = dict(_hf_dict("mistral"), layer_types=["sliding_attention"] * 2)
  assert llm.LlmConfig.from_hf_config(same).layer_windows() == (64, 64)
  gemma = dict(_hf_dict("gemma"), hidden_act="gelu", hidden_activation="gelu_pytorch_tanh",
               query_pre_attn_scalar=32)  # legacy spellings that agree
  assert llm.LlmConfig.from_hf_config(gemma).mlp_activation == "gelu_pytorch_tanh"


@pytest.mark.parametrize("fields,message", [
    (dict(norm_offset=1.0), "only export as transformers' Gemma"),
    (dict(mlp_activation="gelu_pytorch_tanh"), "only export as transformers' Gemma"),
    (dict(embedding_scale=True, norm_offset=1.0, mlp_activation="gelu_pytorch_tanh",
          sliding_window=8), "only export as transformers' Gemma"),
    (dict(sliding_window=8, layer_types=("full_attention", "sliding_attention")),
     "per-layer windows"),
    (dict(sliding_window=8, attention_bias=True, attention_out_bias=True), "has no biases"),
])
def test_configs_without_transformers_equivalent_refuse_export(fields, message):
  cfg = llm.LlmConfig(vocab_size=32, hidden_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=8, mlp_dim=24, **fields)
  with pytest.raises(ValueError, match=message):
    cfg.to_hf_config()


def test_layer_types_are_validated_and_canonical():
  kw = dict(vocab_size=32, hidden_dim=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
            mlp_dim=24)
  with pytest.raises(ValueError, match="layer_types must list 2"):
    llm.LlmConfig(**kw, sliding_window=8, layer_types=("sliding_attention",))
  with pytest.raises(ValueError, match="sliding_window is None"):
    llm.LlmConfig(**kw, layer_types=["sliding_attention", "full_attention"])
  everywhere = llm.LlmConfig(**kw, sliding_window=8, layer_types=["sliding_attention"] * 2)
  assert everywhere == llm.LlmConfig(**kw, sliding_window=8)
  assert llm.LlmConfig(**kw, sliding_window=8, layer_types=["full_attention"] * 2) == \
      llm.LlmConfig(**kw)
