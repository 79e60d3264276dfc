"""LoRA adapters on the LLM's projections: ``y = x W (+ b) + dropout(x) A B * alpha / r``.

The frozen kernel keeps its name and layout; a targeted projection gains
``lora_a`` [*in, r] (peft's kaiming-uniform init) and ``lora_b`` [r, *out]
(zeros, so a fresh adapter changes nothing) next to it, e.g.
``llm/layers/self_attn/q_proj/lora_a``: params like any other, so param groups
train them, checkpoints hold them and inference uses them. They shard like the
kernel they adapt (A: its input axes + None; B: None + its output axes) and are
stacked on 'layers' by the scan. ``merge`` folds them into the kernels (the
export to a plain Hugging Face directory); ``formats/peft.py`` writes them as a
PEFT adapter.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vsrllm_jax.models.layers import Dense, with_axes

# Config name -> (block, module) of a decoder layer, the names Hugging Face uses too.
TARGETS = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"),
           "v": ("self_attn", "v_proj"), "o": ("self_attn", "o_proj"),
           "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"), "down": ("mlp", "down_proj")}
ADAPTER_NAMES = ("lora_a", "lora_b")
# The param group that trains adapters: what config.optim.param_groups must not freeze.
ADAPTER_PATTERN = "/lora_[ab]$"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get adapters, their rank, scale (alpha / rank) and input dropout."""
  targets: tuple[str, ...] = ("q", "k", "v")
  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.05

  def __post_init__(self):
    targets = tuple(self.targets)
    unknown = [t for t in targets if t not in TARGETS]
    if not targets or unknown or len(set(targets)) != len(targets):
      raise ValueError(f"config.llm.lora.targets={targets}: expected distinct names from "
                       f"{list(TARGETS)}")
    if int(self.rank) < 1:
      raise ValueError(f"config.llm.lora.rank={self.rank} must be >= 1")
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"config.llm.lora.dropout={self.dropout} must be in [0, 1)")
    object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))  # canonical
    object.__setattr__(self, "rank", int(self.rank))
    object.__setattr__(self, "alpha", float(self.alpha))
    object.__setattr__(self, "dropout", float(self.dropout))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def modules(self) -> tuple[tuple[str, str], ...]:
    """(block, module) of each target, in TARGETS order."""
    return tuple(TARGETS[t] for t in self.targets)


def from_config(config) -> LoraConfig | None:
  """``config.llm.lora`` -> LoraConfig, or None when absent or not enabled. With adapters,
  ``config.optim.param_groups`` must train them (a frozen zero B would do nothing)."""
  cfg = config.llm.get("lora")
  if not cfg or not cfg.get("enabled", False):
    return None
  lora = LoraConfig(targets=tuple(cfg.get("targets", ("q", "k", "v"))),
                    rank=cfg.get("rank", 16), alpha=cfg.get("alpha", 32.0),
                    dropout=cfg.get("dropout", 0.05))
  probe = "llm/layers/{}/{}/lora_a".format(*lora.modules()[0])
  for pattern, label in config.optim.param_groups:
    if re.search(pattern, probe):
      if label is None:
        raise ValueError(f"config.llm.lora.enabled, but config.optim.param_groups freezes the "
                         f"adapters ({probe!r} first matches {pattern!r}); put "
                         f"({ADAPTER_PATTERN!r}, 'main') (or a schedule of their own) before it")
      break
  return lora


class LoraDense(Dense):
  """``Dense`` plus a rank-``lora.rank`` update when ``lora`` is set (else exactly Dense).

  ``dropout_key``: drops inputs of the adapter path only (peft's lora_dropout);
  None (eval, decoding) keeps them all.
  """
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x, dropout_key=None):
    y = super().__call__(x)
    if self.lora is None:
      return y
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % x.ndim for a in axis)
    n_in, r = len(axis), self.lora.rank
    in_shape = tuple(x.shape[a] for a in axis)
    out_shape = tuple(y.shape[x.ndim - n_in:])
    # peft's init of A (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                              in_axis=tuple(range(n_in)), out_axis=-1)
    a = self.param("lora_a", with_axes(a_init, tuple(self.kernel_axes[:n_in]) + (None,)),
                   in_shape + (r,), self.param_dtype)
    b = self.param("lora_b", with_axes(nn.initializers.zeros,
                                       (None,) + tuple(self.kernel_axes[n_in:])),
                   (r,) + out_shape, self.param_dtype)
    x = jnp.asarray(x, self.dtype)
    if dropout_key is not None and self.lora.dropout > 0:
      keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.lora.dropout), 0).astype(self.dtype)
    h = jax.lax.dot_general(x, jnp.asarray(a, self.dtype), ((axis, tuple(range(n_in))),
                                                            ((), ())))        # [..., r]
    h = jax.lax.dot_general(h, jnp.asarray(b, self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return y + h * jnp.asarray(self.lora.scale, self.dtype)


def layer_dropout_key(key, layer, target: str):
  """The dropout key of one target in one layer (None stays None)."""
  if key is None:
    return None
  return jax.random.fold_in(jax.random.fold_in(key, layer), list(TARGETS).index(target))


def is_adapter(path: tuple) -> bool:
  return bool(path) and str(path[-1]) in ADAPTER_NAMES


def split_adapters(params) -> tuple[dict, dict]:
  """LLM params -> (base params without adapters, adapters only), nested dicts."""
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(params))
  base = {k: v for k, v in flat.items() if not is_adapter(k)}
  adapters = {k: v for k, v in flat.items() if is_adapter(k)}
  return (flax.traverse_util.unflatten_dict(base),
          flax.traverse_util.unflatten_dict(adapters) if adapters else {})


def merge(lora: LoraConfig, params) -> dict:
  """LLM params with adapters -> the same function without them: each targeted kernel
  W + scale * A @ B (per layer, computed in float32 and stored in W's dtype). Host numpy."""
  base, adapters = split_adapters(jax.device_get(params))
  flat = flax.traverse_util.flatten_dict(base)
  for block, module in lora.modules():
    path = ("layers", block, module)
    ad = adapters.get("layers", {}).get(block, {}).get(module)
    if ad is None:
      raise ValueError(f"params have no adapters at {'/'.join(path)} although "
                       f"config.llm.lora.targets names it")
    w = np.asarray(flat[path + ("kernel",)])
    a, b = np.asarray(ad["lora_a"], np.float32), np.asarray(ad["lora_b"], np.float32)
    layers, r = a.shape[0], a.shape[-1]
    delta = np.matmul(a.reshape(layers, -1, r), b.reshape(layers, r, -1))   # [L, in, out]
    flat[path + ("kernel",)] = (w.astype(np.float32) + lora.scale * delta.reshape(w.shape)
                                ).astype(w.dtype)
  return flax.traverse_util.unflatten_dict(flat)


def with_adapters(llm_params: Mapping[str, Any], model: nn.Module, rng, *, mesh=None,
                  rules=None) -> dict:
  """``llm_params`` (a base LLM: pretrained, or a merged export) plus freshly initialised
  adapters of ``model`` (the LlamaModel with LoRA; A random, B zero: the function is
  unchanged), placed by ``rules`` on ``mesh`` when given. Only the adapters are
  initialised (XLA drops the rest of the init)."""
  from vsrllm_jax import sharding  # pylint: disable=g-import-not-at-top
  ids = jnp.zeros((1, 1), jnp.int32)
  only = lambda params: split_adapters(params)[1]
  boxed = jax.eval_shape(lambda r: model.init(r, ids)["params"], rng)
  shardings = None
  if mesh is not None:
    shardings = only(sharding.logical_shardings(boxed, mesh, rules))
  adapters = jax.jit(lambda r: only(model.init(r, ids)["params"]), out_shardings=shardings)(rng)
  flat = flax.traverse_util.flatten_dict(dict(llm_params))
  flat.update(flax.traverse_util.flatten_dict(adapters))
  return flax.traverse_util.unflatten_dict(flat)
