"""The LLM's config: shape and numerics of the decoder, and how a Hugging Face
``config.json`` maps onto it (per family; unsupported fields raise, naming the
field and the file). Hashable, so a model can be a jit static argument.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from vsrllm_jax.models import rope
from vsrllm_jax.models.lora import LoraConfig

_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")
ACTIVATIONS = {"silu": nn.silu, "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True)}
_LAYER_TYPES = ("full_attention", "sliding_attention")
NO_WINDOW = np.iinfo(np.int32).max  # window of a full-attention layer


def _freeze(d: Mapping[str, Any]) -> tuple[tuple[str, Any], ...] | None:
  """A dict as sorted (key, value) pairs, so the config stays hashable (jit static)."""
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items())) or None


@dataclasses.dataclass(frozen=True)
class LlmConfig:
  """Shape and numerics of the decoder; hashable so a model can be a jit static arg."""
  vocab_size: int
  hidden_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  attention_bias: bool = False        # bias on q/k/v (Qwen2; Llama's attention_bias=True)
  attention_out_bias: bool = False    # bias on o_proj (Llama's attention_bias=True only)
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # frozen dict, see rope.py
  embedding_scale: bool = False       # Gemma: token embeddings * sqrt(hidden_dim)
  norm_offset: float = 0.0            # Gemma: RMSNorm scales by (offset + w), w init 0
  mlp_activation: str = "silu"        # gated MLP: 'silu' (SwiGLU) | 'gelu_pytorch_tanh' (GeGLU)
  sliding_window: int | None = None   # a query sees keys less than this many positions back
  layer_types: tuple[str, ...] | None = None  # per layer; None: all sliding if a window is set
  remat_policy: str = "none"
  # Training-time attention: 'xla' (einsums + softmax, any backend) or 'cudnn'
  # (fused flash attention on NVIDIA GPUs, bf16/fp16). Decoding uses 'xla'.
  attention_impl: str = "xla"
  scan_unroll: int = 1                # decoder layers per scan iteration (see layers.scan_layers)
  lora: LoraConfig | None = None      # adapters on the projections (models/lora.py); None: none
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
    rope.inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)  # validates
    if self.mlp_activation not in ACTIVATIONS:
      raise ValueError(f"mlp_activation={self.mlp_activation!r}; expected one of "
                       f"{sorted(ACTIVATIONS)}")
    if self.attention_impl not in ("xla", "cudnn"):
      raise ValueError(f"attention_impl={self.attention_impl!r}; expected 'xla' or 'cudnn'")
    if self.sliding_window is not None and int(self.sliding_window) < 1:
      raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window}")
    types = None if self.layer_types is None else tuple(self.layer_types)
    if types is not None:
      if len(types) != self.num_layers or any(t not in _LAYER_TYPES for t in types):
        raise ValueError(f"layer_types must list {self.num_layers} entries from {_LAYER_TYPES}, "
                         f"got {types}")
      if "sliding_attention" in types and self.sliding_window is None:
        raise ValueError("layer_types has 'sliding_attention' layers but sliding_window is None")
      if "sliding_attention" not in types:  # canonical form: no window at all
        object.__setattr__(self, "sliding_window", None)
      if len(set(types)) == 1:
        types = None
    object.__setattr__(self, "layer_types", types)

  def layer_windows(self) -> tuple[int, ...]:
    """Per-layer attention window in positions (a huge number for full attention)."""
    if self.sliding_window is None:
      return (NO_WINDOW,) * self.num_layers
    types = self.layer_types or ("sliding_attention",) * self.num_layers
    return tuple(int(self.sliding_window) if t == "sliding_attention" else NO_WINDOW
                 for t in types)

  @classmethod
  def from_config_dict(cls, cfg_llm, vocab_size: int, **overrides) -> "LlmConfig":
    """From the ``c.llm`` ConfigDict (shape keys) plus e.g. dtype/param_dtype kwargs."""
    names = ("hidden_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
             "rope_theta", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
             "remat_policy", "scan_unroll", "attention_bias", "attention_out_bias", "rope_scaling",
             "embedding_scale", "norm_offset", "mlp_activation", "sliding_window", "layer_types")
    kw = {n: cfg_llm[n] for n in names if n in cfg_llm}
    if kw.get("rope_scaling") is not None:
      kw["rope_scaling"] = _freeze(dict(kw["rope_scaling"]))
    kw.update(overrides)
    return cls(vocab_size=vocab_size, **kw)

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], *, source: str = "config.json",
                     **overrides) -> "LlmConfig":
    """From a transformers Llama/Mistral/Qwen2/Gemma config.json dict.

    Anything that would change the math and that we do not implement raises
    ValueError naming the field and ``source`` (rather than loading silently wrong).
    """
    def bad(field, why):
      raise ValueError(f"{source}: field {field!r} = {hf.get(field)!r} is not supported ({why})")

    model_type = hf.get("model_type", "llama")
    if str(model_type).startswith(("gemma2", "gemma3", "gemma4")):
      bad("model_type", "Gemma 2/3 (soft-capping, local/global layers, extra norms) are not "
          "implemented; Gemma 1 ('gemma') is")
    if model_type not in _MODEL_TYPES:
      bad("model_type", f"expected one of {_MODEL_TYPES}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
      if hf.get(field) is not None:
        bad(field, "logit soft-capping is not implemented")
    if hf.get("query_pre_attn_scalar") not in (None, head_dim):
      bad("query_pre_attn_scalar", f"attention is scaled by head_dim={head_dim} ** -0.5 only")
    if hf.get("mlp_bias", False):
      bad("mlp_bias", "MLP biases are not implemented")
    if hf.get("use_bidirectional_attention"):
      bad("use_bidirectional_attention", "the decoder is causal")
    theta, scaling = rope.from_hf_config(hf, bad)
    gemma = model_type == "gemma"
    window, layer_types = _hf_sliding_window(hf, model_type, bad)
    # transformers hard-codes q/k/v bias for Qwen2 and none for Mistral.
    bias = {"qwen2": True, "mistral": False}.get(model_type, bool(hf.get("attention_bias", False)))
    kw = dict(vocab_size=hf["vocab_size"], hidden_dim=hf["hidden_size"],
              num_layers=hf["num_hidden_layers"], num_heads=heads,
              num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
              mlp_dim=hf["intermediate_size"], rope_theta=theta,
              rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
              tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
              max_position_embeddings=hf.get("max_position_embeddings", 2048),
              attention_bias=bias, attention_out_bias=bias and model_type != "qwen2",
              rope_scaling=None if scaling is None else _freeze(scaling),
              embedding_scale=gemma, norm_offset=1.0 if gemma else 0.0,
              mlp_activation=_hf_activation(hf, gemma, bad), sliding_window=window,
              layer_types=layer_types)
    kw.update(overrides)
    return cls(**kw)

  def _hf_family(self) -> str:
    """The transformers model_type that computes what this config does (or raise)."""
    gemma = (self.embedding_scale, self.norm_offset, self.mlp_activation) != (False, 0.0, "silu")
    if gemma:
      if (self.embedding_scale, self.norm_offset, self.mlp_activation) != (
          True, 1.0, "gelu_pytorch_tanh") or self.sliding_window is not None or (
          self.attention_bias != self.attention_out_bias):
        raise ValueError("embedding_scale / norm_offset / mlp_activation only export as "
                         "transformers' Gemma: all three Gemma-style, no sliding window, "
                         "attention_bias == attention_out_bias")
      return "gemma"
    if self.attention_out_bias and not self.attention_bias:
      raise ValueError("attention_out_bias without attention_bias has no transformers equivalent")
    if self.attention_bias and not self.attention_out_bias:
      return "qwen2"
    if self.sliding_window is not None:
      if self.attention_bias or self.layer_types is not None:
        raise ValueError("transformers' Mistral windows every layer and has no biases; "
                         "per-layer windows export only with q/k/v-only bias (Qwen2)")
      return "mistral"
    return "llama"

  def to_hf_config(self) -> dict[str, Any]:
    """A config.json dict transformers loads (Llama, Mistral, Qwen2 or Gemma, as the math asks)."""
    family = self._hf_family()
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}[family]
    rope_params = dict(self.rope_scaling or {"rope_type": "default"})
    hf = dict(model_type=family, architectures=[arch],
              vocab_size=self.vocab_size, hidden_size=self.hidden_dim,
              intermediate_size=self.mlp_dim, num_hidden_layers=self.num_layers,
              num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
              head_dim=self.head_dim, hidden_act=self.mlp_activation,
              max_position_embeddings=self.max_position_embeddings,
              rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
              rope_theta=self.rope_theta, rope_scaling=dict(self.rope_scaling or {}) or None,
              rope_parameters=dict(rope_params, rope_theta=self.rope_theta),
              dtype=self.param_dtype, torch_dtype=self.param_dtype)
    if family == "qwen2":
      types = [t == "sliding_attention" for t in self.layer_types or ()] or \
          [self.sliding_window is not None] * self.num_layers
      full = types.index(True) if True in types else self.num_layers
      hf.update(use_sliding_window=self.sliding_window is not None,
                sliding_window=self.sliding_window, max_window_layers=full,
                layer_types=[_LAYER_TYPES[t] for t in types])
    elif family == "mistral":
      hf.update(sliding_window=self.sliding_window)
    else:
      hf.update(attention_bias=self.attention_bias, mlp_bias=False)
    if family == "gemma":
      hf.update(hidden_activation=self.mlp_activation)  # what transformers 4.x reads
    return hf


def _hf_activation(hf: Mapping[str, Any], gemma: bool, bad) -> str:
  """The gated MLP's activation from config.json's hidden_act (and Gemma's legacy field)."""
  act = hf.get("hidden_act", "gelu_pytorch_tanh" if gemma else "silu")
  if not gemma:
    if act != "silu":
      bad("hidden_act", "only 'silu' (SwiGLU) for Llama/Mistral/Qwen2")
    return act
  # Gemma's "gelu" always meant the tanh form. transformers 4.x read hidden_activation
  # (default gelu_pytorch_tanh) and ignored hidden_act; 5.x reads hidden_act: accept
  # only values both agree on.
  tanh = lambda a: "gelu_pytorch_tanh" if a == "gelu" else a
  legacy = hf.get("hidden_activation")
  if legacy is not None and tanh(legacy) != tanh(act):
    bad("hidden_activation", f"disagrees with hidden_act={act!r}")
  if tanh(act) != "gelu_pytorch_tanh":
    bad("hidden_act", "Gemma's MLP is GeGLU with gelu_pytorch_tanh (transformers 4.x ignored "
        "hidden_act for Gemma, so other values are ambiguous)")
  return "gelu_pytorch_tanh"


def _hf_sliding_window(hf: Mapping[str, Any], model_type: str, bad):
  """(sliding_window, layer_types) as transformers applies them for ``model_type``."""
  n = hf["num_hidden_layers"]
  types = hf.get("layer_types")
  if types is not None and (len(types) != n or any(t not in _LAYER_TYPES for t in types)):
    bad("layer_types", f"expected {n} entries from {_LAYER_TYPES}")
  window = hf.get("sliding_window")
  if model_type == "qwen2":  # layer_types wins; else layers >= max_window_layers slide
    window = window if hf.get("use_sliding_window", False) else None
    if types is None and window is not None:
      types = ["sliding_attention" if i >= hf.get("max_window_layers", 28) else
               "full_attention" for i in range(n)]
    if window is None and "sliding_attention" in (types or ()):
      bad("layer_types", "sliding layers but use_sliding_window/sliding_window disable the window")
  elif model_type == "mistral":  # every layer; transformers ignores layer_types
    if types is not None and set(types) != {_LAYER_TYPES[window is not None]}:
      bad("layer_types", "transformers' Mistral applies sliding_window to every layer and ignores "
          "layer_types (alternating layers are Ministral)")
  else:
    if window is not None:
      bad("sliding_window", f"transformers' {model_type} has no sliding-window attention "
          "(it ignores the field); use model_type 'mistral' or 'qwen2'")
    if "sliding_attention" in (types or ()):
      bad("layer_types", f"transformers' {model_type} has no sliding-window attention")
  if window is not None and (not isinstance(window, int) or window < 1):
    bad("sliding_window", "expected a positive int or null")
  return window, None if types is None else tuple(types)
