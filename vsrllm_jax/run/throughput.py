"""Tokens/s, MFU and HFU of the train step.

MFU counts *model* FLOPs analytically, so figures compare across codebases:
the frozen LLM costs 2N forward plus 2N activation-gradient FLOPs per token
(N = its matmul weights; no weight gradients), plus attention (QK^T and AV
over the full square, forward and both backward products), plus the LM head
at the label positions only (ours computes no other logits). The encoder adds
its forward when it runs (not on cached features), the projector its full
training FLOPs (3x its forward). Encoder and projector forwards are counted by
XLA on their lowered, unrolled programs (convolutions and attention of ~25
designs do not fit one formula).

HFU counts *hardware* FLOPs: XLA's cost analysis of the whole lowered train
step with every layer scan unrolled (XLA counts a loop body once), so remat
recomputation and elementwise work are included.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax

from vsrllm_jax.models import layers
from vsrllm_jax.models.llm import LlmConfig
from vsrllm_jax.models.vsr_model import VSRModel

# Dense bf16 peak per chip (FLOP/s), by jax device_kind prefix. The README
# states these; config.peak_flops_per_device overrides (e.g. for fp32 runs).
PEAK_FLOPS = (
    ("NVIDIA H100", 989e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),   # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),        # v5p reports "TPU v5"
    ("TPU v6 lite", 918e12),   # v6e (Trillium)
    ("TPU v6e", 918e12),
)


def peak_flops_per_device(device=None, override: float = 0.0) -> float | None:
  """The chip's dense bf16 peak, or ``override`` when > 0; None when unknown (CPU)."""
  if override > 0:
    return float(override)
  kind = (device or jax.devices()[0]).device_kind
  for prefix, peak in PEAK_FLOPS:
    if kind.startswith(prefix):
      return peak
  return None


def llm_matmul_params(cfg: LlmConfig) -> int:
  """Matmul weights of one decoder layer (q, k, v, o, gate, up, down; biases aside)."""
  q = cfg.num_heads * cfg.head_dim
  kv = cfg.num_kv_heads * cfg.head_dim
  return cfg.hidden_dim * (2 * q + 2 * kv) + 3 * cfg.hidden_dim * cfg.mlp_dim


def llm_step_flops(cfg: LlmConfig, batch: int, seq: int, logit_positions: int, *,
                   weight_grads: bool = False) -> dict[str, float]:
  """Model FLOPs of the LLM in one train step: forward, activation and (if trained)
  weight gradients, for ``batch`` sequences of ``seq`` positions with logits at
  ``logit_positions`` of them."""
  tokens = batch * seq
  dense = 2.0 * tokens * cfg.num_layers * llm_matmul_params(cfg)
  attention = 4.0 * batch * cfg.num_layers * seq * seq * cfg.num_heads * cfg.head_dim
  head = 2.0 * batch * logit_positions * cfg.hidden_dim * cfg.vocab_size
  out = {"forward": dense + attention + head,
         "activation_grad": dense + 2 * attention + head}
  out["weight_grad"] = dense + head if weight_grads else 0.0
  return out


def lowered_flops(fn, *args) -> float:
  """XLA's FLOP count of ``fn(*args)`` with layer scans unrolled; see ``xla_flops``."""
  return xla_flops(jax.jit(fn), *args)


def xla_flops(jitted, *args) -> float:
  """XLA's FLOP count of a jitted function, traced with layer scans unrolled.

  The lowered program's cost analysis where the backend gives one (CPU, TPU);
  GPU gives none before compiling and leaves cuBLAS/cuDNN calls out after, so
  there CPU's cost analysis counts the lowered program.
  """
  with layers.unrolled_scans():
    traced = jitted.trace(*args)
  lowered = traced.lower()
  flops = _flops(lowered.cost_analysis())
  return flops if flops > 0 else _cpu_cost_analysis(lowered)


def _cpu_cost_analysis(lowered) -> float:
  """The HLO cost analysis of CPU's XLA applied to a lowered program of any backend
  (jax exposes it only through a private module; 0.0 where that fails)."""
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    cpu = jax.local_devices(backend="cpu")[0].client
    return _flops(_jax.hlo_module_cost_analysis(cpu, lowered.compiler_ir("hlo").as_hlo_module()))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("no XLA FLOP count on this backend (%s); HFU is not reported", e)
    return 0.0


def counting_model(model):
  """``model`` with XLA attention: fused attention is a custom call XLA cannot count."""
  if model.llm_config.attention_impl == "xla":
    return model
  return model.clone(llm_config=dataclasses.replace(model.llm_config, attention_impl="xla"))


def _flops(cost) -> float:
  if isinstance(cost, (list, tuple)):   # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def model_flops(model, params, model_state, batch, *, llm_trained: bool = False
                ) -> dict[str, float]:
  """Analytic model FLOPs of one train step on ``batch`` (shapes only are read).

  ``batch``: arrays or ShapeDtypeStructs of the model's inputs. Returns the
  parts (llm, projector, encoder), their ``total`` and ``llm_tokens`` (the
  sequence positions the LLM runs: instruction + visual tokens + label).
  """
  variables = {"params": params, **model_state}
  embeds, _, _ = jax.eval_shape(
      lambda v, b: model.apply(v, b, train=False, method=VSRModel.prompt), variables, batch)
  b, prompt_len = embeds.shape[:2]
  label_len = batch["label_ids"].shape[1]
  llm = llm_step_flops(model.llm_config, b, prompt_len + label_len, label_len,
                       weight_grads=llm_trained)

  def encode(v, x):
    return model.apply(v, x, method=VSRModel.encode)

  def project(v, x):
    return model.apply(v, x, train=False, method=VSRModel.project)[1]

  encoder = 0.0 if "features" in batch else lowered_flops(encode, variables, batch)
  projector = max(lowered_flops(project, variables, batch) - encoder, 0.0)
  parts = {"llm": llm["forward"] + llm["activation_grad"] + llm["weight_grad"],
           "projector": 3 * projector, "encoder": encoder}
  return {**parts, "total": sum(parts.values()), "llm_tokens": float(b * (prompt_len + label_len))}


def hardware_flops(make_step, state, batch) -> float:
  """XLA's FLOP count of the whole train step, layer scans unrolled.

  ``make_step()`` returns a fresh jitted step (a new function, so no trace
  made without unrolling is reused), of ``counting_model`` (fused attention
  counted as the XLA attention it replaces, without its recomputation).
  """
  return xla_flops(make_step(), state, batch)


class Meter:
  """Step throughput between log steps. Work outside steps (evaluation,
  checkpoints, a new shape's compilation) is left out: ``pause()`` before it,
  ``resume()`` after. ``count(per_step)`` adds one timed step's amounts
  (``model_flops``, ``hardware_flops``, ``llm_tokens``); ``report()`` returns
  their rates since the last report and, given a peak, MFU and HFU.
  """

  def __init__(self, num_devices: int, peak_per_device: float | None):
    self._peak = peak_per_device * num_devices if peak_per_device else None
    self._reset()

  def _reset(self) -> None:
    self._busy, self._steps, self._sums = 0.0, 0, {}
    self._since = time.perf_counter()

  def pause(self) -> None:
    self._busy += time.perf_counter() - self._since

  def resume(self) -> None:
    self._since = time.perf_counter()

  def count(self, per_step: dict[str, float]) -> None:
    self._steps += 1
    for k, v in per_step.items():
      self._sums[k] = self._sums.get(k, 0.0) + v

  def report(self) -> dict[str, float]:
    elapsed = self._busy + time.perf_counter() - self._since
    steps, sums = self._steps, self._sums
    self._reset()
    if steps <= 0 or elapsed <= 0:
      return {}
    out = {"perf/step_time_s": elapsed / steps,
           "perf/tokens_per_s": sums.get("llm_tokens", 0.0) / elapsed}
    for name, key in (("model_flops", "mfu"), ("hardware_flops", "hfu")):
      if sums.get(name):
        out[f"perf/{name}_per_s"] = sums[name] / elapsed
        if self._peak:
          out[f"perf/{key}"] = sums[name] / elapsed / self._peak
    return out


class StepFlops:
  """FLOPs of one train step per batch shape, counted once per shape (a new shape is a
  new compilation): ``model_flops`` (analytic), ``hardware_flops`` (XLA's count;
  0 unless ``log_hfu``) and ``llm_tokens``.

  ``state``: the train state, abstract (``StateLayout.abstract()``): only shapes
  are read. ``make_counting_step()`` returns a fresh jitted train step of
  ``counting_model(model)``, with a single micro-batch (XLA would count a
  micro-batch loop's body once).
  """

  def __init__(self, model, state, *, llm_trained: bool, make_counting_step=None):
    self._model, self._state = model, state
    self._llm_trained = llm_trained
    self._make_step = make_counting_step
    self._flops: dict[Any, dict[str, float]] = {}

  def __call__(self, batch) -> dict[str, float]:
    key = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
    if key not in self._flops:
      abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
                  for k, v in batch.items()}
      model = model_flops(self._model, self._state.params, self._state.model_state, abstract,
                          llm_trained=self._llm_trained)
      hardware = (hardware_flops(self._make_step, self._state, abstract)
                  if self._make_step is not None else 0.0)
      self._flops[key] = dict(model_flops=model["total"], hardware_flops=hardware,
                              llm_tokens=model["llm_tokens"])
      logging.info("train step FLOPs for %s: model %.4g (llm %.4g, projector %.4g, encoder "
                   "%.4g), hardware (XLA) %.4g", dict(key), model["total"], model["llm"],
                   model["projector"], model["encoder"], hardware)
    return self._flops[key]
