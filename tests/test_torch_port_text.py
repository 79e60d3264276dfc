"""The PyTorch ports of ``text_hierarchical_moe`` and ``text_multiscale_contrastive``.

Random (not init) params exported with ``torch_layout``, so the zero-initialised
``text_router`` is not zero; the shared padded batch has a clip with no real
frame (clip 0) and an instruction with no real token (instruction 1).
"""
import functools

import jax
import numpy as np
import pytest
import torch

from tests.helpers.numerics import assert_close
from tests.helpers.torch_port_parity import (ATOL_FRAC, RTOL, assert_config_fields_match, assert_matches,
                                             case_id, run_case)
from vsrllm_jax.models import projectors as jax_projectors
from vsrllm_jax.torch_port import projectors as torch_projectors
from vsrllm_jax.torch_port.projectors import moe as torch_moe

MOE, MSC = "text_hierarchical_moe", "text_multiscale_contrastive"
NAMES = [MOE, MSC]
# The defaults (the MoE's top_k is 2), then non-default fields: top-1 (Switch gates) with
# 3 experts, one stage of two blocks and no time embedding; odd scales, 2 heads.
CASES = [(name, {}) for name in NAMES] + [
    (MOE, dict(hidden_dim=16, num_stages=1, layers_per_stage=2, num_experts=3, top_k=1,
               num_heads=2, mlp_ratio=1, time_embedding_dim=0)),
    (MSC, dict(scales=(3, 1), num_output_tokens=5, num_heads=2, mlp_ratio=1,
               time_embedding_dim=6, visual_text_temperature=0.2)),
]
IDS = [case_id(*c) for c in CASES]
NO_TEXT_ROW = 1      # encoded_batch: instruction 1 has no real token


@pytest.fixture(scope="module")
def results(encoded, torch_single_thread):
  """case index -> (want, got, MoE FFN calls [(module, x, router_bias)]), each run once."""
  del torch_single_thread
  cache = {}

  def get(i):
    if i not in cache:
      calls = []

      def record(module, args):
        if isinstance(module, torch_moe.MoeFfn):
          calls.append((module,) + tuple(args))

      handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
      try:
        want, got, _ = run_case(*CASES[i], encoded)
      finally:
        handle.remove()
      cache[i] = want, got, calls
    return cache[i]
  return get


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_projector_matches_ours(i, results):
  want, got, _ = results(i)
  assert_matches(IDS[i], want, got)


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_instruction_without_real_token_matches_ours(i, results, encoded):
  """Instruction 1 has no real token: a zero text mean / all keys masked, finite as ours."""
  assert not np.asarray(encoded["instruction_mask"])[NO_TEXT_ROW].any()
  (want, want_mask), (got, got_mask) = results(i)[:2]
  assert np.all(np.isfinite(got[NO_TEXT_ROW])) and want_mask[NO_TEXT_ROW].any()
  real = want_mask[NO_TEXT_ROW]
  err = float(np.abs(got[NO_TEXT_ROW][real] - want[NO_TEXT_ROW][real]).max())
  print(f"\n{IDS[i]} (instruction without a real token): max abs error {err:.3g} on "
        f"{int(real.sum())} real tokens")
  assert_close(got[NO_TEXT_ROW][real], want[NO_TEXT_ROW][real], rtol=RTOL, atol_frac=ATOL_FRAC)


@pytest.mark.parametrize("i", [i for i, (name, _) in enumerate(CASES) if name == MOE],
                         ids=[IDS[i] for i, (name, _) in enumerate(CASES) if name == MOE])
def test_text_bias_changes_routing(i, results, encoded):
  """The text bias reaches every MoE layer and flips top-k choices of real frames (the
  parity above then shows ours flips them the same way)."""
  _, _, calls = results(i)
  fields = CASES[i][1]
  layers_per_run = fields.get("num_stages", 2) * fields.get("layers_per_stage", 1)
  assert len(calls) == layers_per_run
  frames = torch.from_numpy(np.array(encoded["features_mask"]))
  flipped = 0
  for module, x, bias in calls:
    assert bias is not None and bias.abs().min() > 0
    assert not torch.equal(bias[0], bias[2])                       # per clip
    if x.shape[1] != frames.shape[1]:
      continue                                                      # a pooled stage
    with torch.no_grad():
      logits = module.router(x.float())
      chosen = torch_moe.route(logits + bias[:, None, :], module.top_k) > 0
      unbiased = torch_moe.route(logits, module.top_k) > 0
    flipped += int((chosen != unbiased).any(-1)[frames].sum())
  print(f"\n{IDS[i]}: the text bias changes the experts of {flipped} real frame-rate tokens")
  assert flipped > 0


@pytest.mark.parametrize("name", NAMES)
def test_config_fields_match_ours(name):
  assert_config_fields_match(name)
  assert "visual_text_temperature" in torch_projectors.config_fields(MSC)


# Bad input: (name, fields, call) -> the same ValueError as ours; widths 8 (LLM), 4 (features).
B, T, L, E, D = 2, 6, 3, 8, 4
TEXT = dict(text=np.zeros((B, L, E), np.float32), text_mask=np.ones((B, L), bool))
BAD = [                                                    # + a fragment of the message
    (MOE, {}, {}, "'text_hierarchical_moe' is text-aware: it needs text"),
    (MSC, {}, dict(text=TEXT["text"], text_mask=None), "'text_multiscale_contrastive' is text"),
    (MSC, {}, dict(TEXT, text_mask=np.ones((B, L + 1), bool)), "text_mask [B, L]; got"),
    (MSC, dict(num_heads=3), TEXT, "output_dim 8 must be a multiple of num_heads 3"),
    (MSC, dict(visual_text_temperature=0.0), TEXT, "visual_text_temperature must be > 0"),
    (MOE, dict(num_experts=2, top_k=3), TEXT, "top_k <= num_experts; got num_experts=2"),
    (MOE, dict(num_heads=3), TEXT, "width 8 is not divisible by num_heads 3"),
]


def _message(fn) -> str:
  with pytest.raises(ValueError) as info:
    fn()
  return str(info.value)


def _ours(name, fields, call):
  module = jax_projectors.build(name, fields, output_dim=E)
  args = (np.zeros((B, T, D), np.float32), np.ones((B, T), bool))
  jax.eval_shape(functools.partial(module.init, jax.random.key(0)), *args, **call)


def _torch(name, fields, call):
  module = torch_projectors.build(name, fields, E, D)
  call = {k: None if v is None else torch.from_numpy(v) for k, v in call.items()}
  module(torch.zeros(B, T, D), torch.ones(B, T, dtype=torch.bool), **call)


@pytest.mark.parametrize("name,fields,call,fragment", BAD,
                         ids=[f"{n}-{sorted(f)}-{sorted(c)}" for n, f, c, _ in BAD])
def test_bad_input_errors_match_ours(name, fields, call, fragment):
  ours = _message(lambda: _ours(name, fields, call))
  assert fragment in ours
  # The message names the type of the text given: a tracer in ours, a Tensor here.
  assert _message(lambda: _torch(name, fields, call)) == ours.replace("DynamicJaxprTracer",
                                                                      "Tensor")


@pytest.mark.parametrize("name", NAMES)
def test_runs_in_bfloat16(name):
  """bf16 params, fp32 inputs; a text width other than the LLM's; clip 0 has no real frame,
  instruction 1 no real token."""
  module = torch_projectors.build(name, {}, 8, 4, text_dim=6).to(torch.bfloat16)
  x, mask = torch.randn(2, 6, 4), torch.arange(6)[None] < torch.tensor([[0], [5]])
  text, text_mask = torch.randn(2, 3, 6), torch.arange(3)[None] < torch.tensor([[2], [0]])
  with torch.no_grad():
    out = module(x, mask, text=text, text_mask=text_mask)
  assert out.tokens.dtype == torch.bfloat16 and out.mask.dtype == torch.bool
  assert out.tokens.shape[-1] == 8 and tuple(out.mask.shape) == tuple(out.tokens.shape[:2])
  assert torch.isfinite(out.tokens.float()).all()
