r"""Writes docs/projectors.md: every registry entry with its family, output
tokens, parameter count, forward FLOPs and a one-line description.

  python -m vsrllm_jax.tools.projector_docs                    # -> docs/projectors.md
  python -m vsrllm_jax.tools.projector_docs --out=/tmp/projectors.md

The figures are measured at the default run's shape (encoder width 64, LLM
width 128, 64 frames, batch 1, default fields): parameters from an abstract
init, FLOPs as 2 x the multiply-adds of every matmul and convolution
(scanned layers counted per layer).
Text-aware entries read a 10-token instruction. The comparison table of
trained projectors is kept by hand below the generated part (its commands
are listed there); rerunning this tool keeps it.
"""
from __future__ import annotations

import os

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vsrllm_jax.models import projectors

FEATURE_DIM, OUTPUT_DIM, FRAMES, TEXT_TOKENS = 64, 128, 64, 10
MARKER = "<!-- generated above; hand-kept below -->"
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                   "docs", "projectors.md")

DESCRIPTIONS = {
    "linear": "one Dense per frame",
    "mlp": "Dense-GELU-Dense per frame (LLaVA-1.5 style), depth configurable",
    "qformer": "learned queries; self-attention among them and cross-attention to the frames "
               "(BLIP-2)",
    "enhanced_qformer": "a deeper, wider qformer with an MLP readout",
    "blip2_qformer": "qformer in the BERT-style post-LN block layout, cross-attention every "
                     "k layers",
    "cross_attention": "queries; blocks of self-attention then cross-attention (Flamingo-like)",
    "perceiver": "latents cross-attend to the frames then self-attend, iterated (Perceiver "
                 "Resampler)",
    "adaptive_query": "queries and frames in one encoder; queries see all, frames see frames",
    "fusion_refinement": "stages of self-attn, cross-attn to earlier stages and the frames, FFN",
    "gated_cross_attention": "cross-attention and FFN residuals scaled by tanh gates that start "
                             "at zero (Flamingo)",
    "hierarchical_moe": "attention + top-k routed expert FFNs in stages with temporal pooling; "
                        "routing loss",
    "multiscale_contrastive": "pooling at scales 1, 1/2, 1/4; attention pooling by output "
                              "tokens; InfoNCE between scales",
    "pevl_adapter": "input projection, residual bottleneck adapters, output projection",
    "self_aggregating_linear": "Dense per frame, pooled by learned tokens through one attention",
    "self_aggregating_mlp": "MLP per frame, pooled by learned tokens through one attention",
    "conv_abstractor": "residual temporal convolutions, masked pooling, convolutions, MLP "
                       "(Honeybee's C-Abstractor in time)",
    "temporal_pool_mlp": "masked temporal average pooling, then an MLP",
}


def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags, defined only when run as a program (see train.define_flags)."""
  flags.DEFINE_string("out", OUT, "The Markdown file written (its part below the "
                      f"'{MARKER}' line is kept); default: the repository's "
                      "docs/projectors.md.", flag_values=flag_values)


def family(name: str) -> str:
  if name.startswith("text_"):
    return "text-aware"
  return "new" if name in ("conv_abstractor", "temporal_pool_mlp") else "base"


def describe(name: str) -> str:
  if name in DESCRIPTIONS:
    return DESCRIPTIONS[name]
  base = name[len("text_"):]
  return f"{base} with the instruction text as a second source"


def measure(name: str) -> dict:
  """Output tokens, parameters and forward FLOPs of ``name`` at the default shape."""
  module = projectors.build(name, {"output_dim": OUTPUT_DIM})
  features = jnp.zeros((1, FRAMES, FEATURE_DIM), jnp.float32)
  mask = jnp.ones((1, FRAMES), bool)
  kwargs = {}
  if module.text_aware:
    kwargs = dict(text=jnp.zeros((1, TEXT_TOKENS, OUTPUT_DIM)),
                  text_mask=jnp.ones((1, TEXT_TOKENS), bool))
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), features, mask, **kwargs))
  params = nn.meta.unbox(variables["params"])
  count = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  forward = lambda v: module.apply(v, features, mask, **kwargs).tokens
  tokens = jax.eval_shape(forward, variables).shape[1]
  jaxpr = jax.make_jaxpr(forward)(variables).jaxpr
  return dict(tokens=tokens, params=count, flops=matmul_flops(jaxpr),
              sequence_preserving=module.sequence_preserving)


def matmul_flops(jaxpr) -> float:
  """2 x multiply-adds of every dot_general and convolution, scans counted per step.

  (XLA's cost analysis counts a while-loop body once, so scanned layer stacks
  would look as cheap as one layer.) Elementwise work is left out: at these
  shapes it is a few percent.
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), (batch, _) = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      k = float(np.prod([lhs[i] for i in contract]))
      total += 2.0 * k * float(np.prod(eqn.outvars[0].aval.shape))
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape           # kernel: spatial..., in, out (any layout)
      out = eqn.outvars[0].aval.shape
      per_output = float(np.prod(rhs)) / max(out[-1], 1) if out[-1] in rhs else float(np.prod(rhs))
      total += 2.0 * per_output * float(np.prod(out))
    sub = [v for v in eqn.params.values() if hasattr(v, "jaxpr") or hasattr(v, "eqns")]
    for value in sub:
      inner = value.jaxpr if hasattr(value, "jaxpr") else value
      factor = eqn.params.get("length", 1) if name == "scan" else 1
      total += factor * matmul_flops(inner)
    if name == "cond":
      total += max(matmul_flops(b.jaxpr) for b in eqn.params["branches"])
  return total


def render(rows: list[tuple[str, dict]]) -> str:
  lines = [
      "# The projector catalog",
      "",
      "Generated by `python -m vsrllm_jax.tools.projector_docs` at the default run's shape:",
      f"encoder features {FEATURE_DIM} wide, LLM width {OUTPUT_DIM}, {FRAMES} frames, batch 1, "
      "default fields (text-aware entries read a "
      f"{TEXT_TOKENS}-token instruction). Forward FLOPs: 2 x the multiply-adds of every",
      "matmul and convolution (scanned layers counted per layer; elementwise work left out).",
      "Run any entry with `--config=configs/base.py:projector=NAME` (its auxiliary losses",
      "get default weights).",
      "",
      "| projector | family | output tokens | parameters | forward MFLOPs | description |",
      "|---|---|---|---|---|---|",
  ]
  for name, m in rows:
    tokens = f"{m['tokens']} (= frames)" if m["sequence_preserving"] else str(m["tokens"])
    lines.append(f"| `{name}` | {family(name)} | {tokens} | {m['params']:,} | "
                 f"{m['flops'] / 1e6:.1f} | {describe(name)} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: the output file is --out=FILE")
  write(flags.FLAGS.out, [(name, measure(name)) for name in projectors.names()])


def write(out: str, rows) -> None:
  """Writes the generated table, keeping whatever follows MARKER in ``out``."""
  kept = ""
  if os.path.exists(out):
    with open(out) as f:
      text = f.read()
    if MARKER in text:
      kept = text.split(MARKER, 1)[1]
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    f.write(render(rows) + "\n" + MARKER + (kept or "\n"))
  print(f"wrote {out} ({len(rows)} projectors)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
