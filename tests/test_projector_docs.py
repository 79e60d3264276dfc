"""The catalog doc generator: FLOP counting that sees through scans, and the table."""
import jax
import jax.numpy as jnp

from vsrllm_jax.tools import projector_docs


def test_matmul_flops_counts_every_scan_step():
  w = jnp.ones((3, 16, 16))

  def stacked(x):
    return jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]

  flops = projector_docs.matmul_flops(jax.make_jaxpr(stacked)(jnp.ones((4, 16))).jaxpr)
  assert flops == 3 * 2 * 4 * 16 * 16


def test_linear_projector_row_is_exact():
  m = projector_docs.measure("linear")
  f, e, t = projector_docs.FEATURE_DIM, projector_docs.OUTPUT_DIM, projector_docs.FRAMES
  assert m["params"] == f * e + e and m["tokens"] == t and m["sequence_preserving"]
  assert m["flops"] == 2 * t * f * e


def test_generated_doc_keeps_the_hand_written_part(tmp_path):
  out = tmp_path / "docs" / "projectors.md"
  out.parent.mkdir()
  out.write_text("old table\n" + projector_docs.MARKER + "\n## Comparison\nkept\n")
  projector_docs.write(str(out), [("linear", projector_docs.measure("linear"))])
  text = out.read_text()
  assert "old table" not in text
  assert "| `linear` | base | 64 (= frames) | 8,320 | 1.0 |" in text
  assert text.endswith(projector_docs.MARKER + "\n## Comparison\nkept\n")
