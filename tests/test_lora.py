"""LoRA adapters on the LLM (``models/lora.py``), per supported family: the function of
merged kernels, gradients, scan + remat, sharding names, dropout, and both exports
(a merged Hugging Face directory; a PEFT adapter that ``peft.PeftModel`` loads).

The tiny families are those of ``test_llm_families`` (transformers models saved to
tmp dirs, no network). Adapters are random with B nonzero, on every target.
"""
from __future__ import annotations

import dataclasses
import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.helpers.numerics import assert_close
from tests.test_llm_families import COMMON, FAMILIES, _hf_logits, _tiny_hf_model
from vsrllm_jax import sharding
from vsrllm_jax.formats import hf_llm, peft as peft_format
from vsrllm_jax.models import llm, lora

ALL = tuple(lora.TARGETS)
LENGTHS, SEQ = (29, 17, 6), 29        # right padded
# fp32 on both sides; the merged kernels differ from ours only by rounding (W + s A B),
# amplified by two layers of random (init range 0.3) weights: errors seen up to ~1.4e-5
# of the largest logit (|logit| <= 10).
RTOL, ATOL_FRAC = 1e-4, 5e-5

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _random_adapters(params, seed: int, scale: float = 0.3):
  """Every adapter random (B nonzero), everything else unchanged."""
  rng = np.random.default_rng(seed)
  def one(path, x):
    if lora.is_adapter(tuple(k.key for k in path)):
      return (scale * rng.standard_normal(x.shape)).astype(x.dtype)
    return np.asarray(x)
  return jax.tree_util.tree_map_with_path(one, jax.device_get(params))


def _with_lora(model, params, targets=ALL, seed=1, **kw):
  """(config with LoRA on ``targets``, params with random adapters added)."""
  cfg = dataclasses.replace(model.config, lora=lora.LoraConfig(targets=targets, rank=4,
                                                               alpha=8.0, **kw))
  params = lora.with_adapters(params, cfg, jax.random.key(0))
  return cfg, _random_adapters(params, seed)


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, COMMON["vocab_size"], size=(len(LENGTHS), SEQ))
  mask = (np.arange(SEQ)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
  return ids, mask


def _logits(cfg, params, ids, mask, **kw):
  return np.asarray(jax.jit(lambda p: llm.LlamaModel(cfg).apply(
      {"params": p}, ids, attention_mask=mask, **kw))(params))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
  """One family's HF model (saved), ours with random adapters on every target, and
  our fp32 logits on a right-padded batch."""
  name = request.param
  hf = _tiny_hf_model(name)
  path = tmp_path_factory.mktemp(name)
  hf.save_pretrained(path)
  model, base = hf_llm.from_pretrained(path, param_dtype="float32")
  cfg, params = _with_lora(model, base)
  ids, mask = _batch()
  return dict(name=name, path=path, hf=hf, base_config=model.config, base=base, config=cfg,
              params=params, ids=ids, mask=mask, ours=_logits(cfg, params, ids, mask))


def test_logits_equal_those_of_the_merged_kernels(family):
  cfg, params, ids, mask = family["config"], family["params"], family["ids"], family["mask"]
  real = mask.astype(bool)
  merged = lora.merge(cfg.lora, params)
  assert set(flax.traverse_util.flatten_dict(merged)) == set(
      flax.traverse_util.flatten_dict(family["base"]))
  theirs = _logits(family["base_config"], merged, ids, mask)
  ours = family["ours"]
  base = _logits(family["base_config"], family["base"], ids, mask)
  assert np.abs(ours[real] - base[real]).max() > 0.1       # the adapters matter
  print(f"{family['name']}: ours vs merged kernels, max abs error "
        f"{np.abs(ours[real] - theirs[real]).max():.2e} (max |logit| "
        f"{np.abs(theirs[real]).max():.2f})")
  assert_close(ours[real], theirs[real], rtol=RTOL, atol_frac=ATOL_FRAC)


def test_merged_export_loads_in_transformers(family, tmp_path):
  """``hf_llm.save_pretrained`` of a LoRA model writes W + scale * A @ B."""
  hf_llm.save_pretrained(tmp_path, family["config"], family["params"])
  hf, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  assert not any(info.values()), info
  real = family["mask"].astype(bool)
  theirs = _hf_logits(hf.eval(), family["ids"], family["mask"])
  print(f"{family['name']}: merged export in transformers, max abs error "
        f"{np.abs(family['ours'][real] - theirs[real]).max():.2e}")
  assert_close(family["ours"][real], theirs[real], rtol=RTOL, atol_frac=ATOL_FRAC)


def test_peft_adapter_loads_onto_the_base_model(family, tmp_path):
  import peft  # pylint: disable=g-import-not-at-top
  peft_format.save(tmp_path, family["config"], family["params"],
                   base_model_name_or_path=str(family["path"]))
  written = json.loads((tmp_path / peft_format.ADAPTER_CONFIG).read_text())
  assert (written["r"], written["lora_alpha"], written["task_type"]) == (4, 8, "CAUSAL_LM")
  assert written["target_modules"] == [m for _, m in lora.TARGETS.values()]
  base = transformers.AutoModelForCausalLM.from_pretrained(
      family["path"], dtype=torch.float32, attn_implementation="eager")
  model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
  real = family["mask"].astype(bool)
  theirs = _hf_logits(model, family["ids"], family["mask"])
  print(f"{family['name']}: base + PEFT adapter, max abs error "
        f"{np.abs(family['ours'][real] - theirs[real]).max():.2e}")
  assert_close(family["ours"][real], theirs[real], rtol=RTOL, atol_frac=ATOL_FRAC)
  # And back: the adapter directory reads into exactly our adapters.
  back = peft_format.load(tmp_path, family["config"])
  want = flax.traverse_util.flatten_dict(lora.split_adapters(family["params"])[1])
  got = flax.traverse_util.flatten_dict(back)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))
