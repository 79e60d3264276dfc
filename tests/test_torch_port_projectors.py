"""The PyTorch port (vsrllm_jax/torch_port) against ours: exported params, same outputs.

Params are random (``random_params``), so that zero-initialised parts (adapter
up-projections, FiLM, gates) are not the identity, and the masks include a
clip with no real frame and an instruction with no real token.
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.helpers.numerics import assert_close
from tests.helpers.torch_port_parity import (ATOL_FRAC, RTOL, assert_config_fields_match, assert_matches, load,
                                             projector_case_fixture, random_params, to_torch)
from vsrllm_jax.formats import torch_layout
from vsrllm_jax.models import layers as jax_layers
from vsrllm_jax.models.projectors import blocks as jax_blocks
from vsrllm_jax.torch_port import blocks, layers
from vsrllm_jax.torch_port import projectors as torch_projectors

NAMES = ["linear", "mlp", "temporal_pool_mlp", "conv_abstractor", "self_aggregating_linear",
         "self_aggregating_mlp", "pevl_adapter", "text_pevl_adapter"]
# (name, config fields): the defaults, then non-default fields (an even kernel pads 'SAME'
# unevenly; a stride that does not divide the frames pads the last window).
CASES = [(name, {}) for name in NAMES] + [
    ("mlp", dict(depth=3, hidden_dim=24)),
    ("temporal_pool_mlp", dict(stride=5, hidden_dim=8)),
    ("conv_abstractor", dict(kernel_size=4, stride=5, depth=1, hidden_dim=16)),
    ("self_aggregating_mlp", dict(num_output_tokens=3, num_heads=2, time_embedding_dim=0)),
    ("text_pevl_adapter", dict(hidden_dim=12, num_adapters=3, bottleneck_dim=5)),
]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


projector_case = projector_case_fixture(CASES)


def test_projector_matches_ours(projector_case, torch_single_thread):
  label, want, got, _ = projector_case
  assert_matches(label, want, got)


@pytest.mark.parametrize("name", NAMES)
def test_config_fields_match_ours(name):
  assert_config_fields_match(name)


def test_bad_configs_are_named():
  with pytest.raises(ValueError, match="no_such_projector.*linear"):
    torch_projectors.build("no_such_projector", {}, 8, 4)
  with pytest.raises(ValueError, match=r"\['dpth'\].*depth"):
    torch_projectors.build("mlp", {"name": "mlp", "dpth": 3}, 8, 4)
  with pytest.raises(ValueError, match="depth must be >= 1"):
    torch_projectors.build("mlp", {"depth": 0}, 8, 4)
  module = torch_projectors.build("text_pevl_adapter", {}, 8, 4)
  with pytest.raises(ValueError, match="text_pevl_adapter.*needs text"):
    module(torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.bool))


# Blocks the ported projectors do not all use (the query family's), checked one by one.
B, S, T, L, W, C, E = 3, 4, 5, 3, 8, 12, 10   # batch, rows, frames, text, width, context, text


def _block_inputs(seed=3):
  rng = np.random.default_rng(seed)
  mask = lambda n: np.arange(n)[None] < np.array([[0], [n], [2]])   # row 0: nothing real
  return dict(x=rng.standard_normal((B, S, W)).astype(np.float32),
              ctx=rng.standard_normal((B, T, C)).astype(np.float32), ctx_mask=mask(T),
              text=rng.standard_normal((B, L, E)).astype(np.float32),
              text_mask=mask(L)[::-1].copy(), x_mask=mask(S))


def _block_cases():
  """name -> (flax module, torch module, args(inputs))."""
  return {
      "transformer_stack": (
          jax_layers.TransformerStack(2, 2, 6, 16, cross_attention=True),
          layers.TransformerStack(2, W, 2, 6, 16, cross_attention=True, context_dim=C),
          lambda i: (i["x"], i["x_mask"], i["ctx"], i["ctx_mask"])),
      "query_block_gated_text": (
          jax_blocks.QueryBlock(2, 2, self_attention=True, gated=True),
          blocks.QueryBlock(W, 2, 2, self_attention=True, gated=True, context_dim=C, text_dim=E),
          lambda i: (i["x"], i["ctx"], i["ctx_mask"], i["text"], i["text_mask"])),
      "cross_self_block": (
          jax_blocks.CrossSelfBlock(2, 2, self_layers=2, self_first=True, gated=True),
          blocks.CrossSelfBlock(W, 2, 2, self_layers=2, self_first=True, gated=True,
                                context_dim=C, text_dim=E),
          lambda i: (i["x"], i["ctx"], i["ctx_mask"], i["text"], i["text_mask"])),
      "post_ln_query_block": (
          jax_blocks.PostLNQueryBlock(2, 2),
          blocks.PostLNQueryBlock(W, 2, 2, context_dim=C, text_dim=E),
          lambda i: (i["x"], i["ctx"], i["ctx_mask"], i["text"], i["text_mask"])),
      "joint_query_layer": (
          jax_blocks.JointQueryLayer(2, 2, num_queries=2),
          blocks.JointQueryLayer(W, 2, 2, 2, text_dim=E),
          lambda i: (i["x"], i["x_mask"][:, :S - 2], i["text"], i["text_mask"])),
      "input_projection": (
          jax_blocks.InputProjection(W, time_embedding_dim=6),
          blocks.InputProjection(C, W, time_embedding_dim=6),
          lambda i: (i["ctx"], i["ctx_mask"])),
      "reconstruction_loss": (
          jax_blocks.ReconstructionLoss(W, num_heads=2, time_embedding_dim=6),
          blocks.ReconstructionLoss(E, C, W, num_heads=2, time_embedding_dim=6),
          lambda i: (i["text"], i["text_mask"], i["ctx"], i["ctx_mask"])),
      "gated_mlp_gelu_tanh": (
          jax_layers.Mlp(16, out_dim=6, activation="gelu_tanh", gated=True),
          layers.Mlp(W, 16, 6, activation="gelu_tanh", gated=True),
          lambda i: (i["x"],)),
      "dense_multi_axis": (      # contracts (width, rows) in that order -> [B, 3, 2]
          jax_layers.Dense((3, 2), ("embed", None, "heads", "head_dim"), axis=(-1, 1)),
          layers.Dense((W, S), (3, 2), axis=(-1, 1)),
          lambda i: (i["x"],)),
  }


@pytest.mark.parametrize("case", sorted(_block_cases()))
def test_block_matches_ours(case, torch_single_thread):
  ours, theirs, args = _block_cases()[case]
  inputs = args(_block_inputs())
  jargs = tuple(jnp.asarray(a) for a in inputs)
  boxed = jax.eval_shape(lambda: ours.init(jax.random.key(0), *jargs))
  params = random_params(boxed["params"], seed=4)
  want, state = ours.apply({"params": params}, *jargs, mutable=["intermediates"])
  rules = torch_layout.plan(ours, boxed["params"], variables={"params": params}, args=jargs)
  load(theirs, torch_layout.to_state_dict(params, rules))
  with torch.no_grad():
    got = theirs(*(to_torch(a) for a in inputs))
  if case == "reconstruction_loss":    # (loss, reconstruction); ours sows the latter
    want = (want, state["intermediates"]["reconstruction"][0])
  want = want[0] if isinstance(want, tuple) and want[1] is None else want
  want, got = (want, got) if isinstance(got, tuple) else ((want,), (got,))
  for w, g in zip(want, got):
    w = np.asarray(w)
    assert np.abs(w).max() > 0.1
    assert_close(g.numpy(), w, rtol=RTOL, atol_frac=ATOL_FRAC, err_msg=case)


_NO_JAX = textwrap.dedent("""
    import sys

    class NoJax:
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "flax"):
          raise ImportError(f"{name} is blocked: the torch port must not import it")
        return None

    sys.meta_path.insert(0, NoJax())
    import torch
    torch.set_num_threads(1)
    import vsrllm_jax.torch_port
    from vsrllm_jax.torch_port import blocks, layers, projectors
    from vsrllm_jax.torch_port.projectors import (adapters, conv_abstractor, linear, mlp,
                                                  pooling, text_aware)
    x, mask = torch.randn(2, 6, 4), torch.arange(6)[None] < torch.tensor([[3], [6]])
    text, text_mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    for name in projectors.names():
      for dtype in (torch.float32, torch.bfloat16):
        module = projectors.build(name, {"num_heads": 2} if "aggregating" in name else {}, 8, 4)
        out = module.to(dtype)(x, mask, text, text_mask)
        assert out.tokens.shape[-1] == 8 and out.mask.shape == out.tokens.shape[:2], name
        assert out.tokens.dtype == dtype and out.mask.dtype == torch.bool, name
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax"))
    assert not loaded, loaded
    try:
      import jax
    except ImportError:
      print("ok", len(projectors.names()))
""")


def test_torch_port_never_imports_jax():
  run = subprocess.run([sys.executable, "-c", _NO_JAX], cwd=REPO, capture_output=True, text=True,
                       timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  from vsrllm_jax.torch_port import projectors as torch_projectors  # pylint: disable=g-import-not-at-top
  assert set(NAMES) <= set(torch_projectors.names())
  assert run.stdout.split() == ["ok", str(len(torch_projectors.names()))], run.stdout
